"""`fasttrain ablate`: paired CIs on hand-made results, resume, bad grids."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from fasttrain.metrics import bootstrap_auc_matrix_reference
from fasttrain.workflows import ablate as ab


@pytest.fixture(scope="module")
def tiny(tiny_yaml) -> str:
    return tiny_yaml(data={"batch_size": 16}, optim={"epochs": 1, "warmup_epochs": 0}, run={"ckpt_every": 100})


def test_paired_difference_on_hand_made_results():
    rng = np.random.default_rng(0)
    y = (rng.random((90, 3)) < 0.4).astype(float)
    y[rng.random((90, 3)) < 0.1] = np.nan
    a = [np.clip(np.nan_to_num(y) * k + rng.random((90, 3)), 0, 2) for k in (0.8, 0.6)]
    b = [rng.random((90, 3)) for _ in range(2)]
    res = ab.paired_difference(y, a, b, n_boot=60, seed=4)
    # by hand: the same resamples for every run (same seed), mean over seeds of the mAUC difference
    ma = [np.nanmean(bootstrap_auc_matrix_reference(y, s, [0, 1, 2], n_boot=60, seed=4), axis=1) for s in a]
    mb = [np.nanmean(bootstrap_auc_matrix_reference(y, s, [0, 1, 2], n_boot=60, seed=4), axis=1) for s in b]
    diffs = (ma[0] - mb[0] + ma[1] - mb[1]) / 2
    assert res["ci95"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)
    from fasttrain.metrics import mean_auc
    names = ["x", "y", "z"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_seed = [mean_auc(y, s, names) - mean_auc(y, t, names) for s, t in zip(a, b)]
    assert res["per_seed"] == pytest.approx(per_seed)
    assert res["mean_diff"] == pytest.approx(np.mean(per_seed))
    assert res["ci95"][0] > 0  # a is clearly better
    same = ab.paired_difference(y, a, a, n_boot=50, seed=0)
    assert same["mean_diff"] == 0 and same["ci95"] == [0.0, 0.0]


def test_bad_grids_fail_before_any_run(tmp_path, tiny):
    (tmp_path / "t.yaml").write_text(tiny)
    with pytest.raises(ab.AblationError, match="empty grid"):
        ab.parse_grid([])
    with pytest.raises(ab.AblationError, match="no values"):
        ab.parse_grid(["optim.blr="])
    with pytest.raises(ab.AblationError, match="unknown config key 'optim.nope'"):
        ab.Ablation(tmp_path / "o", str(tmp_path / "t.yaml"), ab.parse_grid(["optim.nope=1,2"]), 1, ["pretrain"])
    with pytest.raises(ab.AblationError, match="--finetune-config"):
        ab.Ablation(tmp_path / "o", str(tmp_path / "t.yaml"), ab.parse_grid(["optim.blr=1e-3,2e-3"]), 1,
                    ["pretrain", "finetune"])
    assert not (tmp_path / "o").exists()
    assert ab.arm_name({"distill.teacher_ckpt": "/x/teach/checkpoints/last.pt", "optim.blr": 0.001}) == \
        "teacher_ckpt=teach,blr=0.001"


def test_arms_named_one_by_one(tmp_path, tiny, packed_phantoms, capsys):
    """--arm sets a few keys per arm (arms that are no product of values: MAE only vs a teacher at
    two alphas); each arm gets its own folder, and every pair its paired difference."""
    assert ab.parse_arms(["distill.teacher_ckpt=null", "distill.teacher_ckpt=/r/T/checkpoints/last.pt distill.alpha=2"]) \
        == [{"distill.teacher_ckpt": None}, {"distill.teacher_ckpt": "/r/T/checkpoints/last.pt", "distill.alpha": 2}]
    with pytest.raises(ab.AblationError, match="one value per key"):
        ab.parse_arms(["distill.alpha=1,2"])
    with pytest.raises(ab.AblationError, match="given twice"):
        ab.parse_arms(["optim.blr=1 optim.blr=2"])
    with pytest.raises(ab.AblationError, match="empty --arm"):
        ab.parse_arms(["  "])
    (tmp_path / "t.yaml").write_text(tiny)
    with pytest.raises(ab.AblationError, match="not both"):
        ab.Ablation(tmp_path / "o", str(tmp_path / "t.yaml"), ab.parse_grid(["optim.blr=1,2"]), 1, ["pretrain"],
                    arms=[{"optim.blr": 1}])
    with pytest.raises(ab.AblationError, match="unknown config key 'optim.nope'"):
        ab.Ablation(tmp_path / "o", str(tmp_path / "t.yaml"), [], 1, ["pretrain"], arms=[{"optim.nope": 1}])
    packed = packed_phantoms(tmp_path, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ab.main(["--config", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "abl"), "--seeds", "1",
                        "--stages", "pretrain,probe", "--probe-epochs", "2", "--bootstrap", "20",
                        "--arm", "optim.blr=1e-3", "--arm", "optim.blr=1e-2 optim.weight_decay=0.0",
                        f"--data.path={packed}"]) == 0
    rep = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert list(rep["arms"]) == ["blr=0.001", "blr=0.01,weight_decay=0.0"]
    assert rep["keys"] == ["optim.blr", "optim.weight_decay"]
    assert [(p["a"], p["b"]) for p in rep["pairs"]] == [("blr=0.001", "blr=0.01,weight_decay=0.0")]
    cfg = (tmp_path / "abl" / "blr=0.01,weight_decay=0.0" / "seed0" / "pretrain" / "config.yaml").read_text()
    assert "  blr: 0.01\n" in cfg and "  weight_decay: 0.0\n" in cfg
    assert "ablation over optim.blr, optim.weight_decay" in capsys.readouterr().out


def test_finetuning_variants_take_the_pretrained_encoders_of_another_ablation(tmp_path, tiny, tiny_yaml,
                                                                             packed_phantoms, monkeypatch):
    """--pretrained-from: the pretrain stage of each arm x seed is the other ablation's, never run
    again; fine-tuning starts from that checkpoint; a missing one is an error before any run."""
    packed = packed_phantoms(tmp_path, 60)
    (tmp_path / "t.yaml").write_text(tiny)
    ft = tmp_path / "ft.yaml"
    ft.write_text(tiny_yaml("vit", model={"num_classes": 14}, data={"val_split": None}, optim={"epochs": 1}))
    arms = [{"optim.blr": 1e-3}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = ab.Ablation(tmp_path / "a", str(tmp_path / "t.yaml"), [], 1, ["pretrain"], arms=arms,
                            overrides=[f"--data.path={packed}"], n_boot=20).run_all()
    assert first["arms"]["blr=0.001"]["complete"]
    src = tmp_path / "a" / "blr=0.001" / "seed0"
    ckpt = json.loads((src / "stages" / "pretrain.json").read_text())["last"]
    # the source in an older ablation's layout (one stages.json): read, never rewritten from here
    old = {st: {**json.loads((src / "stages" / f"{st}.json").read_text()), "done": True} for st in ["pretrain"]}
    shutil.rmtree(src / "stages")
    (src / "stages.json").write_text(json.dumps(old))
    before = sorted((p.relative_to(tmp_path / "a"), p.stat().st_mtime_ns) for p in (tmp_path / "a").rglob("*"))

    def no_pretraining(cfg, resume=False):
        raise AssertionError("pre-trained again")
    monkeypatch.setattr(ab, "run_pretrain", no_pretraining)
    with pytest.raises(ab.AblationError, match=r"no finished pretrain stage in .*seed1"):
        ab.Ablation(tmp_path / "b", str(tmp_path / "t.yaml"), [], 2, ["pretrain", "finetune", "evaluate"],
                    finetune_config=str(ft), arms=arms, pretrained_from=tmp_path / "a")
    with pytest.raises(ab.AblationError, match="keep pretrain in --stages"):
        ab.Ablation(tmp_path / "b", str(tmp_path / "t.yaml"), [], 1, ["finetune", "evaluate"],
                    finetune_config=str(ft), arms=arms, pretrained_from=tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ab.Ablation(tmp_path / "b", str(tmp_path / "t.yaml"), [], 1, ["pretrain", "finetune", "evaluate"],
                          finetune_config=str(ft), arms=arms, overrides=[f"--data.path={packed}"], n_boot=20, pretrained_from=tmp_path / "a").run_all()
    assert rep["arms"]["blr=0.001"]["complete"] and rep["arms"]["blr=0.001"]["metrics"]["test_mauc"]["n"] == 1
    run = tmp_path / "b" / "blr=0.001" / "seed0"
    assert f"  init: {ckpt}\n" in (run / "finetune" / "config.yaml").read_text()
    assert json.loads((run / "stages" / "pretrain.json").read_text())["pretrained_from"] == \
        str(tmp_path / "a" / "blr=0.001" / "seed0")
    assert not (run / "pretrain").exists()
    assert sorted((p.relative_to(tmp_path / "a"), p.stat().st_mtime_ns) for p in (tmp_path / "a").rglob("*")) == before


@pytest.mark.slow
def test_ablate_end_to_end_reuses_finished_and_resumes_interrupted(tmp_path, monkeypatch, caplog, packed_phantoms,
                                                                   tiny):
    packed = packed_phantoms(tmp_path, 60)
    (tmp_path / "t.yaml").write_text(tiny)
    from fasttrain.eval.probe import ProbeSettings

    def make():
        return ab.Ablation(tmp_path / "abl", str(tmp_path / "t.yaml"), ab.parse_grid(["optim.blr=1e-3,1e-2"]), 2,
                           ["pretrain", "probe"], overrides=[f"--data.path={packed}"],
                           probe_settings=ProbeSettings(epochs=2, batch_size=16), n_boot=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = make().run_all()
    assert set(rep["arms"]) == {"blr=0.001", "blr=0.01"}
    for a in rep["arms"].values():
        assert a["complete"] and a["metrics"]["probe_mauc"]["n"] == 2 and len(a["metrics"]["probe_mauc"]["values"]) == 2
        assert a["stages"]["pretrain"]["images_per_s"]["mean"] > 0
    assert len(rep["pairs"]) == 1 and rep["pairs"][0]["metric"] == "probe_mauc" and rep["pairs"][0]["ci95"]
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "blr=0.001" in md and "SYNTHETIC" in md
    assert (tmp_path / "abl" / "blr=0.01" / "seed1" / "pretrain" / "metrics.jsonl").is_file()  # a normal run folder

    # interrupt one run: its stage record and summary gone, its last.pt kept -> it resumes, others are reused
    run = tmp_path / "abl" / "blr=0.01" / "seed1"
    shutil.rmtree(run / "stages")
    (run / "pretrain" / "summary.json").unlink()
    calls = []
    real = ab.run_pretrain

    def spy(cfg, resume=False):
        calls.append((cfg.run.out, resume))
        return real(cfg, resume=resume)
    monkeypatch.setattr(ab, "run_pretrain", spy)
    caplog.set_level("INFO", logger="fasttrain.train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = make().run_all()
    assert calls == [(str(run / "pretrain"), "auto")]
    assert f"--resume auto: resuming from {run / 'pretrain' / 'checkpoints' / 'last.pt'}" in caplog.text
    assert again["arms"]["blr=0.01"]["complete"]
    assert json.loads((run / "stages" / "probe.json").read_text())["probe_mauc"] is not None
    assert json.loads((run / "stages" / "pretrain.json").read_text())["resumed"] is True


def test_seed_mean_ci_matches_a_plain_resampling_loop():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    y = (rng.random((80, 2)) < 0.3).astype(float)
    scores = [y * 0.3 + rng.random((80, 2)) for _ in range(2)]
    mean, ci = ab.seed_mean_ci(y, scores, n_boot=40, seed=5)
    want = np.mean([np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(2)]) for s in scores])
    assert mean == pytest.approx(want, abs=1e-12)
    draws, r = [], np.random.default_rng(5)
    for _ in range(40):
        idx = r.integers(0, 80, 80)
        draws.append(np.mean([np.mean([roc_auc_score(y[idx, j], s[idx, j]) for j in range(2)]) for s in scores]))
    assert ci == pytest.approx([np.percentile(draws, 2.5), np.percentile(draws, 97.5)], abs=1e-9)


def test_label_fraction_grid_gives_a_curve_with_cis(tmp_path, packed_phantoms, tiny_yaml):
    packed = packed_phantoms(tmp_path, 150, seed=6)
    ft = tmp_path / "ft.yaml"
    ft.write_text(tiny_yaml("vit", model={"num_classes": 14}, data={"val_split": None}, optim={"epochs": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = ab.Ablation(tmp_path / "abl", str(ft), ab.parse_grid(["data.label_fraction=0.6,1.0"]), 1,
                          ["finetune", "evaluate"], finetune_config=str(ft), overrides=[f"--data.path={packed}"],
                          n_boot=30).run_all()
    pts = rep["curve"]["points"]["test_mauc"]
    assert rep["curve"]["key"] == "data.label_fraction" and [p["value"] for p in pts] == [0.6, 1.0]
    for p in pts:
        assert p["ci95"][0] <= p["mean"] <= p["ci95"][1]
    assert (tmp_path / "abl" / "curve.png").stat().st_size > 1000
    assert "Curve over data.label_fraction" in (tmp_path / "abl" / "ablation.md").read_text()
    # the 60% arm fine-tuned on a patient-disjoint subset recorded in its provenance
    prov = json.loads((tmp_path / "abl" / "label_fraction=0.6" / "seed0" / "finetune" / "provenance.json").read_text())
    sub = prov["data"][0]["subset"]
    assert sub["label_fraction"] == 0.6 and len(sub["ids"]) == sub["count"] < sub["of"]


def test_records_of_an_older_ablation_folder_are_carried_over(tmp_path):
    """A folder that recorded every stage in seed<k>/stages.json keeps its finished stages (the
    unfinished one runs again); the old file is kept beside, renamed."""
    d = tmp_path / "arm" / "seed0"
    d.mkdir(parents=True)
    (d / "stages.json").write_text(json.dumps({"pretrain": {"done": True, "wall_s": 3.0, "last": "x.pt"},
                                               "probe": {"done": False}}))
    runner = ab.Ablation.stage_runner(d)
    assert runner.record("pretrain") == {"wall_s": 3.0, "last": "x.pt"}
    assert not runner.is_done("probe")
    assert not (d / "stages.json").exists() and (d / "stages.json.carried-over").is_file()
    assert ab.Ablation.stage_runner(d).record("pretrain") == {"wall_s": 3.0, "last": "x.pt"}  # idempotent
