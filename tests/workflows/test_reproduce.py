"""`fasttrain reproduce`: the paper's experiments end to end on SYNTHETIC phantoms in both source
layouts (NIH and CheXpert, each packed by its real converter), tiny models, fake Xiao-layout teacher
checkpoints; an interrupted run resumes; Table 2 is written and labelled SYNTHETIC; bad input fails
before any work; the dry-run plan at the real datasets' sizes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fasttrain.cli import main
from fasttrain.workflows import reproduce as rp
from fasttrain.workflows import reproduce_estimate, reproduce_plan

IMG, PATCH = 32, 8  # tiny models: 32-px crops of 40-px packed phantoms, 8-px patches (16 tokens)


def chexpert_phantoms(root: Path) -> Path:
    """Phantoms in the CheXpert-v1.0-small layout, written by the synthetic generator."""
    from fasttrain.converters.synthetic import generate_phantoms
    return generate_phantoms(root, 168, seed=7, size=48, layout="chexpert", progress=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, save_mae_style, synth_state, xiao_layout):
    from fasttrain.converters.synthetic import generate_phantoms
    tmp = tmp_path_factory.mktemp("repro")
    nih = generate_phantoms(tmp / "nih_src", 160, seed=3, size=48, progress=False)
    chex = chexpert_phantoms(tmp / "chexpert_src")
    grid = IMG // PATCH
    teacher_s = save_mae_style(tmp / "vit-s_CXR_0.3M_mae.pth",
                               synth_state(xiao_layout(48, 4, 32, 1, L=grid * grid, p=PATCH), seed=1, grid=grid),
                               "mae_vit_small_patch16", prefix="module.")
    teacher_b = save_mae_style(tmp / "vit-b_CXR_0.5M_mae.pth",
                               synth_state(xiao_layout(64, 4, 32, 1, L=grid * grid, p=PATCH), seed=2, grid=grid),
                               "mae_vit_base_patch16")
    return {"tmp": tmp, "nih": nih, "chexpert": chex, "s": teacher_s, "b": teacher_b}


def tiny_overrides() -> list[str]:
    """Architecture and length overrides for every stage (unscoped) and per teacher (scoped)."""
    model = {"img_size": IMG, "patch_size": PATCH, "embed_dim": 32, "depth": 4, "num_heads": 2,
             "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
    over = [f"--model.{k}={v}" for k, v in model.items()]
    over += ["--distill.student_blocks=[2]", "--distill.teacher_blocks=[2]", "--data.eval_resize=40",
             "--data.batch_size=16", "--optim.epochs=2", "--engine.compile=false", "--run.log_every=1",
             "--run.ckpt_every=1", "--run.tensorboard=false", "--data.num_workers=0",
             "--finetune_*:optim.blr=5e-3", "--pretrain_*:optim.blr=1e-3"]
    for t, dim in (("s", 48), ("b", 64)):
        over += [f"--pretrain_{t}:distill.teacher_embed_dim={dim}", f"--pretrain_{t}:distill.teacher_depth=4",
                 f"--pretrain_{t}:distill.teacher_num_heads=2",
                 f"--finetune_teacher_{t}_*:model.embed_dim={dim}"]
    return over


def cmd(inputs, out, *extra) -> list[str]:
    return ["reproduce", "--nih", str(inputs["nih"]), "--chexpert", str(inputs["chexpert"]),
            "--teacher-s", str(inputs["s"]), "--teacher-b", str(inputs["b"]), "--out", str(out),
            "--pack-size", "40", "--bench-steps", "1", "--bootstrap", "20", "--quiet", *extra, *tiny_overrides()]


class Interrupt(BaseException):
    """Stands in for a pre-emption (SIGKILL after a checkpoint): nothing in the code catches it."""


@pytest.mark.slow
def test_reproduce_end_to_end_on_phantoms_with_interruption(inputs, monkeypatch, capsys):
    from fasttrain.train import loop
    out = inputs["tmp"] / "run"
    argv = cmd(inputs, out, "--experiments", "1,2", "--with-teachers")

    # 1st invocation: killed right after pretrain_s wrote its 2nd checkpoint (mid-run).
    real_save, saves = loop.Trainer.save, []

    def save_then_die(self, path):
        real_save(self, path)
        if self.kind == "pretrain":
            saves.append(self.step.opt_step)
            if len(saves) == 2:
                raise Interrupt
    monkeypatch.setattr(loop.Trainer, "save", save_then_die)
    with pytest.raises(Interrupt):
        main(argv)
    monkeypatch.setattr(loop.Trainer, "save", real_save)
    plan = capsys.readouterr().out
    assert "SYNTHETIC" in plan
    for stage in ("convert_nih", "convert_chexpert", "pretrain_s", "finetune_s_nih", "evaluate_s_chexpert",
                  "finetune_teacher_s_nih", "evaluate_teacher_s_chexpert"):
        assert stage in plan, stage
    assert "pretrain_b" not in plan  # experiments 1,2 need the S student only
    assert (out / "stages" / "convert_nih.json").is_file() and (out / "stages" / "convert_chexpert.json").is_file()
    assert not (out / "stages" / "pretrain_s.json").exists()
    assert (out / "runs" / "pretrain_s" / "checkpoints" / "last.pt").is_file()
    manifest_mtime = (out / "packed" / "nih" / "manifest.json").stat().st_mtime_ns

    # 2nd invocation, same command: conversions skipped, pre-training resumed, the rest run.
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "convert_nih: done earlier, skipped" in text
    assert "pretrain_s (resuming)" in text
    assert (out / "packed" / "nih" / "manifest.json").stat().st_mtime_ns == manifest_mtime
    pre = json.loads((out / "stages" / "pretrain_s.json").read_text())
    assert len(pre["attempts_wall_s"]) == 2 and pre["wall_s"] == pytest.approx(sum(pre["attempts_wall_s"]))
    assert not (out / "stages" / "pretrain_s.running.json").exists()
    assert pre["resumed"] is True and pre["steps"] == json.loads(
        (out / "runs" / "pretrain_s" / "summary.json").read_text())["steps"]
    steps = [json.loads(x)["step"] for x in (out / "runs" / "pretrain_s" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("phase") == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == pre["steps"]  # one continuous log, no repeats

    # the paper pre-trains on NIH train + CheXpert train: one mixture, every image of both per epoch
    packed = [out / "packed" / d for d in ("nih", "chexpert")]
    counts = [json.loads((p / "manifest.json").read_text())["splits"]["train"]["count"] for p in packed]
    assert pre["steps"] == 2 * (sum(counts) // 16)
    prov = json.loads((out / "runs" / "pretrain_s" / "provenance.json").read_text())
    assert [(Path(p["path"]).name, p["split"], p["count"]) for p in prov["data"]] == [
        ("nih", "train", counts[0]), ("chexpert", "train", counts[1])]  # both parts in the provenance
    ft_cfg = (out / "runs" / "finetune_s_nih" / "config.yaml").read_text()
    assert "randaug: rand-m6-mstd0.5-inc1" in ft_cfg and "interpolation: bicubic" in ft_cfg  # Xiao's recipe

    table = (out / "table2.md").read_text()
    doc = json.loads((out / "table2.json").read_text())
    assert table.startswith("> **SYNTHETIC") and doc["synthetic"] is True
    assert [r["key"] for r in doc["rows"]] == ["s", "teacher_s"]
    for r in doc["rows"]:
        for d in ("nih", "chexpert"):
            e = r[d]
            assert 0 <= e["mauc"] <= 100 and e["ci95"][0] <= e["mauc"] <= e["ci95"][1]
            assert e["paper"] == reproduce_plan.PAPER[r["key"]][d] and abs(e["diff"] - (e["mauc"] - e["paper"])) < 1e-9
    assert "| ViT-T distilled from ViT-S |" in table and "78.1" in table and "86.9" in table and "82.3" in table
    assert "Per-label AUC (%), NIH" in table and "Pleural Effusion" in table and "Pneumothorax" in table
    assert set(doc["per_label"]) == {"s/nih", "s/chexpert", "teacher_s/nih", "teacher_s/chexpert"}
    assert len(doc["per_label"]["s/chexpert"]) == 5 and len(doc["per_label"]["s/nih"]) == 14
    val = [json.loads(x) for x in (out / "runs" / "finetune_s_nih" / "metrics.jsonl").read_text().splitlines()
           if json.loads(x).get("phase") == "val"]
    assert [r["epoch"] for r in val] == [0, 1] and all(0 < r["loss"] < 5 and r["mauc"] for r in val)
    for rel in ("figures/pretrain/losses.png", "figures/finetune_nih/finetune.png", "figures/finetune_nih/loss_train_val.png",
                "figures/finetune_nih/auc_bars.png", "figures/finetune_chexpert/auc_bars.png"):
        assert rel in doc["figures"] and (out / rel).is_file(), rel
    stages = {s["stage"]: s for s in doc["stages"]}
    assert len(stages) == 15 and doc["gpu_hours_total"] > 0
    assert all(s["images_per_s"] for s in stages.values())
    # external validation: each fine-tune scored on the other dataset's test split, shared labels only
    tr = {(t["key"], t["trained_on"], t["scored_on"]): t for t in doc["transfer"]}
    assert set(tr) == {(r, a, b) for r in ("s", "teacher_s") for a, b in (("nih", "chexpert"), ("chexpert", "nih"))}
    for t in tr.values():
        assert sorted(t["shared_labels"]) == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                              "Pleural Effusion"]
        assert 0 <= t["mauc"] <= 100 and t["ci95"][0] <= t["mauc"] <= t["ci95"][1]
    assert "Hernia" in tr[("s", "nih", "chexpert")]["not_scored"] and tr[("s", "chexpert", "nih")]["not_scored"] == []
    assert "Transfer: fine-tuned on one dataset, scored on the other" in table
    # the CheXpert fine-tune picked best.pt on its carved val split, never on valid.csv
    ev = json.loads((out / "runs" / "finetune_s_chexpert" / "eval" / "results_test.json").read_text())
    test_count = json.loads((out / "packed" / "chexpert" / "manifest.json").read_text())["splits"]["test"]["count"]
    assert ev["checkpoint"].endswith("best.pt") and ev["n_images"] == test_count > 0

    # 3rd invocation: everything done, nothing re-runs, the table is rewritten identically.
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("done earlier, skipped") == 15
    assert json.loads((out / "table2.json").read_text())["rows"] == doc["rows"]


def test_bad_inputs_fail_before_any_work(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    base = cmd(inputs, out, "--experiments", "3", "--dry-run")[1:]

    def fails(argv, match: str):
        with pytest.raises(reproduce_plan.ReproduceError, match=match):
            rp.main(argv)

    # a teacher checkpoint of the wrong size (S given for B): strict load names the flag and keys
    argv = [a if a != str(inputs["b"]) else str(inputs["s"]) for a in base]
    with pytest.raises(reproduce_plan.ReproduceError) as e:
        rp.main(argv)
    assert "--teacher-b" in str(e.value) and str(inputs["s"]) in str(e.value) and "shape" in str(e.value).lower()
    # missing teacher
    fails([a if a != str(inputs["b"]) else str(tmp_path / "nope.pth") for a in base], "--teacher-b .*not found")
    fails([a for a in base if a not in ("--teacher-b", str(inputs["b"]))], "--teacher-b is required for experiments 3")
    # datasets swapped, and a folder that is no release
    fails([str(inputs["chexpert"]) if a == str(inputs["nih"]) else str(inputs["nih"]) if a == str(inputs["chexpert"])
           else a for a in base], "--nih .*pass it as --chexpert")
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty") if a == str(inputs["chexpert"]) else a for a in base],
          "--chexpert .*not the CheXpert v1.0 release")
    # not enough disk: the figure needed is named, and nothing was written
    monkeypatch.setattr(reproduce_plan, "disk_free", lambda path: 1000)
    with pytest.raises(reproduce_plan.ReproduceError, match="not enough disk") as e:
        rp.main(base)
    assert "GB" in str(e.value) and "1000 bytes" not in str(e.value) and "0.0 GB free" in str(e.value)
    assert not out.exists()


def test_bad_input_exits_2_with_one_line(inputs, tmp_path, capsys):
    """Through the `fasttrain` command: ReproduceError -> exit 2 and its message (cli's exception table)."""
    argv = [a for a in cmd(inputs, tmp_path / "out", "--experiments", "3", "--dry-run")
            if a not in ("--teacher-b", str(inputs["b"]))]
    assert main(argv) == 2
    assert "--teacher-b is required for experiments 3" in capsys.readouterr().err


def test_release_checks_name_the_file_that_is_wrong(tmp_path, nih_header, chexpert_columns):
    """The converters' release checks (files, columns, split lists) reach the plan as --nih /
    --chexpert / --nih-split-dir errors naming the file."""
    nih = tmp_path / "nih"
    (nih / "images").mkdir(parents=True)
    (nih / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels\n")
    with pytest.raises(reproduce_plan.ReproduceError, match=r"--nih .*Data_Entry_2017.csv: not NIH's Data_Entry "
                                                           r"CSV: columns \['Patient ID'\] are missing"):
        reproduce_plan.inspect_nih(nih)
    (nih / "Data_Entry_2017.csv").write_text(nih_header + "\n" + "a.png,No Finding,0,1,50,M,PA,1,1,1,1\n" * 5)
    (nih / "train_val_list.txt").write_text("a.png\n" * 4)
    with pytest.raises(reproduce_plan.ReproduceError, match=r"--nih .*test_list.txt is missing"):
        reproduce_plan.inspect_nih(nih)
    (nih / "test_list.txt").write_text("a.png\n\n")
    src = reproduce_plan.inspect_nih(nih)
    assert src.images == 5 and src.splits == {"train": 3, "val": 1, "test": 1} and "5 images" in src.note
    (tmp_path / "xiao").mkdir()
    (tmp_path / "xiao" / "train_official.txt").write_text("a.png\n")
    with pytest.raises(reproduce_plan.ReproduceError, match=r"--nih-split-dir .*val_official.txt is missing"):
        reproduce_plan.inspect_nih(nih, tmp_path / "xiao")
    chex = tmp_path / "chex" / "CheXpert-v1.0-small"
    chex.mkdir(parents=True)
    (chex / "train.csv").write_text(",".join(chexpert_columns) + "\n")
    (chex / "valid.csv").write_text("Path,Sex\n")
    with pytest.raises(reproduce_plan.ReproduceError, match=r"--chexpert .*valid.csv: not CheXpert v1.0's "
                                                           r"valid.csv: columns .*'Frontal/Lateral'"):
        reproduce_plan.inspect_chexpert(tmp_path / "chex")


def _fake_release(root: Path, nih_header: str, chexpert_columns: list[str]) -> tuple[Path, Path]:
    """CSV-only folders with the real releases' row counts: what the plan reads (no images)."""
    nih = root / "NIH"
    (nih / "images_001" / "images").mkdir(parents=True)
    names = [f"{i // 10:08d}_{i % 10:03d}.png" for i in range(112_120)]
    with open(nih / "Data_Entry_2017_v2020.csv", "w") as f:
        f.write(nih_header + "\n")
        f.writelines(f"{n},No Finding,0,{i // 10},50,M,PA,1024,1024,0.14,0.14\n" for i, n in enumerate(names))
    (nih / "train_val_list.txt").write_text("\n".join(names[:86_524]) + "\n")
    (nih / "test_list.txt").write_text("\n".join(names[86_524:]) + "\n")
    chex = root / "CheXpert-v1.0-small"
    chex.mkdir()
    for name, n, frontal in (("train.csv", 223_414, 191_027), ("valid.csv", 234, 202)):
        with open(chex / name, "w") as f:
            f.write(",".join(chexpert_columns) + "\n")
            f.writelines(f"CheXpert-v1.0-small/x/p{i}.jpg,Male,50,{'Frontal' if i < frontal else 'Lateral'},AP"
                         + ",0.0" * 14 + "\n" for i in range(n))
    return nih, chex


@pytest.mark.slow  # writes full-size ViT-S/B checkpoints (0.6 GB) and builds the real models
def test_dry_run_plan_at_the_real_sizes(inputs, tmp_path, capsys, monkeypatch, nih_header, chexpert_columns,
                                        save_mae_style, synth_state, xiao_layout):
    """The paper's configs at full size, 8 GPUs: images and steps from the releases' counts, the
    GPU-hours from FLOPs at the assumed MFU (no step measured), torchrun named; nothing written."""
    nih, chex = _fake_release(tmp_path, nih_header, chexpert_columns)
    monkeypatch.setattr(reproduce_plan, "disk_free", lambda path: 10 ** 12)
    out = tmp_path / "out"
    # the real architectures: fake ViT-S/B teachers in Xiao's full layout (what --teacher-s/-b load)
    s = save_mae_style(tmp_path / "s.pth", synth_state(xiao_layout(384, 12, 512, 8), seed=1), "mae_vit_small_patch16")
    b = save_mae_style(tmp_path / "b.pth", synth_state(xiao_layout(768, 12, 512, 8), seed=2), "mae_vit_base_patch16")
    assert main(["reproduce", "--nih", str(nih), "--chexpert", str(chex), "--teacher-s", str(s), "--teacher-b", str(b),
                 "--out", str(out), "--gpus", "8", "--dry-run", "--bench-steps", "0"]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and "SYNTHETIC" not in text
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.split() and ln.split()[0] in
            ("convert_nih", "convert_chexpert", "pretrain_s", "pretrain_b", "finetune_s_nih", "finetune_b_chexpert",
             "evaluate_s_nih", "evaluate_b_chexpert")}
    assert len(rows) == 8
    nih_train = 86_524 - round(86_524 * 0.13)
    chex_train = 191_027 - round(191_027 * 0.05)
    assert rows["convert_nih"][1] == "112,120" and rows["convert_chexpert"][1] == f"{191_027 + 202:,}"
    assert rows["pretrain_s"][1] == f"{nih_train + chex_train:,}"
    assert rows["pretrain_s"][2] == "100" and rows["pretrain_s"][3] == f"{100 * ((nih_train + chex_train) // 256):,}"
    assert rows["pretrain_s"][4] == "256"  # 32 per GPU x 8
    assert rows["finetune_s_nih"][3] == f"{100 * (nih_train // 256):,}"
    assert rows["evaluate_s_nih"][1] == "25,596" and rows["evaluate_b_chexpert"][1] == "202"
    assert "torch.distributed.run" in text and "--nproc_per_node=8" in text
    assert "~19.9 GB" in text or "GB raw" in text
    # GPU-hours = images x epochs x analytic FLOPs per image / (assumed MFU x H100 bf16 peak)
    from fasttrain.models.distill import build_etmae
    from fasttrain.bench.flops import etmae_step_flops, known_peak
    gpu_h = {k: float(v[-2]) for k, v in rows.items()}
    for t, teacher in (("s", "mae_vit_small_patch16"), ("b", "mae_vit_base_patch16")):
        m = build_etmae("mae_vit_tiny_patch16", teacher, student_blocks=[8], teacher_blocks=[8], img_size=224, in_chans=3)
        flops = etmae_step_flops(m.student, m.teacher, 0.75, 8, m.proj).per_image
        images = 100 * ((nih_train + chex_train) // 256) * 256
        mfu = reproduce_estimate.ASSUMED_MFU
        assert gpu_h[f"pretrain_{t}"] == pytest.approx(images * flops / (mfu * known_peak("H100")) / 3600,
                                                       abs=0.06)
    assert gpu_h["pretrain_s"] < gpu_h["pretrain_b"]


def test_overrides_reach_the_stages_their_glob_names():
    over = reproduce_plan.parse_user_overrides(["--model.depth=2", "--finetune_teacher_*:model.embed_dim=48",
                                    "pretrain_b:distill.teacher_depth=4"])
    assert over == [("*", "model.depth", "2"), ("finetune_teacher_*", "model.embed_dim", "48"),
                    ("pretrain_b", "distill.teacher_depth", "4")]
    for bad in ("--model=2", "--finetune_*:depth=2", "--model.depth"):
        with pytest.raises(reproduce_plan.ReproduceError, match="section.key=value"):
            reproduce_plan.parse_user_overrides([bad])


def test_the_module_entry_point_reports_through_the_cli_table(tmp_path):
    """`python -m fasttrain.workflows.reproduce` with a bad input: one line and exit 2, no traceback."""
    r = subprocess.run([sys.executable, "-m", "fasttrain.workflows.reproduce", "--nih", str(tmp_path / "none"),
                        "--chexpert", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--dry-run"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "fasttrain reproduce: error: --nih" in r.stderr and "folder not found" in r.stderr
