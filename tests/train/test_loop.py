"""Trainer: schedule, checkpoints, resume (kill -9 then --resume == uninterrupted), NaN stop,
bad-input errors before training, evaluation with bootstrap CIs, per-rank randomness, and a clean
exit (code 0, no thread left) of every finished run."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain.config import ConfigError, build_config
from fasttrain.train.checkpoint import load_checkpoint, save_atomic
from fasttrain.metrics import bootstrap_auc
from fasttrain.train.optim import Schedule, lr_at

PY = sys.executable


@pytest.fixture(scope="module")
def packed(tmp_path_factory, packed_phantoms) -> Path:
    """A tiny packed phantom dataset (train/val/test) through the real converters."""
    return packed_phantoms(tmp_path_factory.mktemp("phantoms"), 80)


@pytest.fixture(scope="module")
def cfg_yaml(tmp_path_factory, tiny_yaml) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(tiny_yaml(run={"ckpt_every": 2}))
    return p


# ----------------------------------------------------------------------------- schedule

def test_warmup_then_cosine_per_step():
    kw = dict(base_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    vals = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay after warm-up


def test_schedule_applies_layer_decay_scales():
    from fasttrain.models import create_model, param_groups_layer_decay
    from fasttrain.train.optim import build_optimizer
    clf = create_model("vit_tiny_patch16", img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2,
                       num_heads=2, num_classes=3)
    groups = param_groups_layer_decay(clf, 0.05, 0.5)
    cfg = build_config(None, ["--optim.betas=[0.9, 0.999]"])
    opt = build_optimizer(groups, 1.0, cfg.optim)
    Schedule(opt, base_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10).apply(0)
    by_layer = {g["layer_id"]: g["lr"] for g in opt.param_groups}
    assert by_layer[3] == pytest.approx(1.0)  # head: full lr
    assert by_layer[0] == pytest.approx(0.5 ** 3)  # patch embedding: decay ** (depth + 1)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert opt.defaults.get("fused") is True  # the fused AdamW kernel on CPU (torch >= 2.4)


# ----------------------------------------------------------------------------- checkpoints

def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.ones(2)}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(Exception):
        save_atomic({"model": {"w": torch.zeros(2)}, "x": Boom()}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_unreadable_checkpoint_error_names_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


# ----------------------------------------------------------------------------- runs

def _pretrain(cfg_yaml, packed, out, *extra, resume=False):
    from fasttrain.train.pretrain import run_pretrain
    cfg = build_config(cfg_yaml, [f"--data.path={packed}", f"--run.out={out}", *extra])
    return run_pretrain(cfg, resume=resume)


def test_pretrain_run_dir_contents(cfg_yaml, packed, tmp_path):
    out = tmp_path / "run"
    s = _pretrain(cfg_yaml, packed, out, "--run.tensorboard=true")
    for f in ("config.yaml", "provenance.json", "metrics.jsonl", "summary.json", "checkpoints/last.pt"):
        assert (out / f).is_file(), f
    assert list((out / "tb").iterdir()), "no TensorBoard events"
    prov = json.loads((out / "provenance.json").read_text())
    assert "torch" in prov["versions"] and prov["device"]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["phase"] == "train"]
    assert train and all({"loss_mae", "loss_dist", "lr", "images_per_s"} <= set(r) for r in train)
    val = [r for r in recs if r["phase"] == "val"]
    assert len(val) == 2 and all({"loss_mae", "loss_dist"} <= set(r) for r in val)  # val curves, per epoch
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["kind"] == "pretrain" and ck["step"]["opt_step"] == s["steps"] > 0
    assert build_config(out / "config.yaml").to_dict() == ck["config"]


def test_nan_loss_stops_naming_step_and_last_checkpoint(cfg_yaml, packed, tmp_path):
    """A loader that starts yielding NaN images at batch 5: the run stops at that step and names
    the last checkpoint written before it (step 4, ckpt_every=2)."""
    from fasttrain.data import build_loader
    from fasttrain.train import loop
    from fasttrain.train.builders import build_pretrain_model
    from fasttrain.train.optim import param_groups_weight_decay
    cfg = build_config(cfg_yaml, [f"--data.path={packed}", f"--run.out={tmp_path / 'run'}", "--run.log_every=3"])
    info = loop.setup(cfg)
    real = build_loader(cfg.data, "train", True, img_size=32, in_chans=1)

    class Poisoned:
        label_names, num_samples = real.label_names, real.num_samples

        def __len__(self):
            return len(real)

        def set_epoch(self, epoch, start_step=0):
            self.epoch = epoch
            real.set_epoch(epoch, start_step)

        def __iter__(self):
            for i, (x, y) in enumerate(real):
                yield (x * float("nan") if self.epoch * len(real) + i >= 5 else x), y

    model = build_pretrain_model(cfg)
    tr = loop.Trainer(cfg, "pretrain", model, Poisoned(), info,
                      groups=param_groups_weight_decay(model, 0.05))
    with pytest.raises(loop.TrainingDiverged, match=r"non-finite loss at step 5 .*last.pt \(step 4\)"):
        tr.fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"]["opt_step"] == 4
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_missing_and_wrong_teacher_fail_before_training(cfg_yaml, packed, tmp_path):
    from fasttrain.models.checkpoints import CheckpointError
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found: .*nope.pt"):
        _pretrain(cfg_yaml, packed, tmp_path / "a", f"--distill.teacher_ckpt={tmp_path / 'nope.pt'}")
    # a Xiao-layout file of a different width than the named teacher: strict load lists the keys
    from fasttrain.models import create_model
    other = create_model("mae_vit_small_patch16", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    torch.save({"model": other.state_dict()}, tmp_path / "teacher.pth")
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight"):
        _pretrain(cfg_yaml, packed, tmp_path / "b", f"--distill.teacher_ckpt={tmp_path / 'teacher.pth'}",
                  "--distill.teacher=mae_vit_small_patch16", "--distill.teacher_embed_dim=64",
                  "--distill.teacher_depth=2", "--distill.teacher_num_heads=2",
                  "--distill.student_blocks=[1]", "--distill.teacher_blocks=[1]")
    with pytest.raises(ConfigError, match="distill.teacher"):
        _pretrain(cfg_yaml, packed, tmp_path / "c", f"--distill.teacher_ckpt={tmp_path / 'teacher.pth'}")
    assert not (tmp_path / "b" / "checkpoints").exists() and not (tmp_path / "c").exists()


def test_label_count_mismatch_fails_before_training(cfg_yaml, packed, tmp_path):
    from fasttrain.train.finetune import run_finetune
    cfg = build_config(cfg_yaml, [f"--data.path={packed}", f"--run.out={tmp_path / 'ft'}",
                                   "--model.name=vit_tiny_patch16", "--model.num_classes=5"])
    with pytest.raises(ConfigError, match="14 labels but model.num_classes = 5"):
        run_finetune(cfg)
    assert not (tmp_path / "ft").exists()
    cfg = build_config(cfg_yaml, [f"--data.path={packed}", f"--run.out={tmp_path / 'ft'}",
                                   "--model.name=vit_tiny_patch16", "--model.num_classes=14",
                                   "--data.val_split=valid"])
    with pytest.raises(ConfigError, match="split 'valid' is not in"):
        run_finetune(cfg)


def _final_weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(cfg_yaml, packed, tmp_path):
    """Distillation run (teacher from a first run), run.deterministic=true, checkpoint every
    2 steps: SIGKILL mid-run, --resume, and the final weights equal the uninterrupted run's."""
    teacher = tmp_path / "teacher"
    _pretrain(cfg_yaml, packed, teacher, "--optim.epochs=1")
    args = [PY, "-m", "fasttrain.cli", "pretrain", "--config", str(cfg_yaml),
            "--teacher", str(teacher / "checkpoints" / "last.pt"), f"--data.path={packed}",
            "--distill.student_blocks=[1]", "--distill.teacher_blocks=[1]", "--run.deterministic=true",
            "--optim.epochs=8", "--run.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(args + ["--out", str(full)], check=True, env=env, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and load_checkpoint(ckpt)["step"]["opt_step"] >= 3:
            break
        time.sleep(0.005)
    time.sleep(random.uniform(0, 0.05))  # somewhere between checkpoints
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt)["step"]["opt_step"]
    total = load_checkpoint(full / "checkpoints" / "last.pt")["step"]["opt_step"]
    assert killed_at < total
    r = subprocess.run(args + ["--out", str(killed), "--resume"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # metrics.jsonl reads as one run: each logged step once
    recs = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    for phase in ("train", "val"):
        steps = [r["step"] for r in recs if r["phase"] == phase]
        assert steps and steps == sorted(set(steps)), phase
    full_recs = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    val = lambda rs: [(r["step"], r["loss_mae"], r["loss_dist"]) for r in rs if r["phase"] == "val"]  # noqa: E731
    assert val(recs) == val(full_recs)  # validation curves of the resumed run match too


# ----------------------------------------------------------------------------- evaluation

def test_bootstrap_auc_known_values_and_undefined_label():
    # label 0: perfectly separated (AUC 1); label 1: AUC = 0.75 by hand; label 2: only negatives
    y = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [1, np.nan, 0], [0, 0, 0]], dtype=float)
    s = np.array([[0.9, 0.8, 0.1], [0.8, 0.7, 0.2], [0.2, 0.3, 0.3], [0.1, 0.1, 0.4], [0.7, 0.9, 0.5],
                  [0.3, 0.2, 0.6]])
    # label 1, known rows: pos scores {0.8, 0.3}, neg {0.7, 0.1, 0.2}: 5 of 6 pairs ordered -> 5/6
    with pytest.warns(RuntimeWarning, match="undefined"):
        res = bootstrap_auc(y, s, ["a", "b", "c"], n_boot=200, seed=0)
    assert res["labels"]["a"]["auc"] == 1.0 and res["labels"]["b"]["auc"] == pytest.approx(5 / 6)
    assert res["labels"]["c"]["defined"] is False and res["labels"]["c"]["ci95"] is None
    assert res["undefined_labels"] == ["c"]
    assert res["mauc"] == pytest.approx((1 + 5 / 6) / 2)
    lo, hi = res["labels"]["b"]["ci95"]
    assert 0 <= lo <= 5 / 6 <= hi <= 1
    assert res["mauc_ci95"][0] <= res["mauc"] <= res["mauc_ci95"][1]
    with pytest.warns(RuntimeWarning):
        again = bootstrap_auc(y, s, ["a", "b", "c"], n_boot=200, seed=0)
    assert again == res  # seeded resampling


def test_bootstrap_ci_narrows_with_more_images():
    rng = np.random.default_rng(0)

    def ci_width(n):
        y = rng.integers(0, 2, size=(n, 1)).astype(float)
        s = y + rng.normal(0, 1.0, size=(n, 1))
        r = bootstrap_auc(y, s, ["x"], n_boot=300, seed=1)
        lo, hi = r["labels"]["x"]["ci95"]
        assert lo <= r["labels"]["x"]["auc"] <= hi
        return hi - lo
    assert ci_width(2000) < ci_width(100) / 2


def test_out_of_memory_message_names_batch_and_what_to_lower(cfg_yaml, packed, tmp_path, monkeypatch):
    from fasttrain.data import build_loader
    from fasttrain.train import loop
    from fasttrain.train.builders import build_pretrain_model
    from fasttrain.train.engine import TrainStep
    from fasttrain.train.optim import param_groups_weight_decay

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(TrainStep, "__call__", oom)
    cfg = build_config(cfg_yaml, [f"--data.path={packed}", f"--run.out={tmp_path / 'run'}"])
    info = loop.setup(cfg)
    model = build_pretrain_model(cfg)
    loader = build_loader(cfg.data, "train", True, img_size=32, in_chans=1)
    tr = loop.Trainer(cfg, "pretrain", model, loader, info, groups=param_groups_weight_decay(model, 0.05))
    with pytest.raises(RuntimeError, match=r"out of memory at step 0 with 8 images per device.*--data.batch_size"):
        tr.fit()


@pytest.mark.slow
def test_torchrun_two_process_gloo_pretrain_and_finetune(cfg_yaml, packed, tmp_path):
    """The real launcher: 2 gloo ranks through torchrun, distillation pre-training then
    fine-tuning with validation gathered across ranks; rank 0 alone writes the run."""
    teacher = tmp_path / "teacher"
    _pretrain(cfg_yaml, packed, teacher, "--optim.epochs=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fasttrain.cli"]
    r = subprocess.run(run + ["pretrain", "--config", str(cfg_yaml), "--out", str(tmp_path / "ddp"),
                              "--teacher", str(teacher / "checkpoints" / "last.pt"), f"--data.path={packed}",
                              "--distill.student_blocks=[1]", "--distill.teacher_blocks=[1]",
                              "--data.batch_size=4", "--run.log_every=1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in recs if x["phase"] == "train"]
    assert steps == sorted(set(steps)) and len(steps) > 2  # one writer, each step once
    ck = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert len(ck["rng"]) == 2  # every rank's RNG state is saved for resume
    r = subprocess.run(run + ["finetune", "--config", str(cfg_yaml), "--out", str(tmp_path / "ft"),
                              "--init", str(tmp_path / "ddp" / "checkpoints" / "last.pt"), f"--data.path={packed}",
                              "--model.name=vit_tiny_patch16", "--model.num_classes=14", "--data.batch_size=4",
                              "--optim.epochs=1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    val = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
           if '"val"' in x]
    assert len(val) == 1 and (tmp_path / "ft" / "checkpoints" / "best.pt").is_file()


def test_finetune_init_from_ours_and_from_exported_safetensors(cfg_yaml, packed, tmp_path):
    """--init takes our pre-training checkpoint or the exported timm .safetensors; both give the
    same encoder weights; a fine-tuned checkpoint is refused."""
    from fasttrain.models.checkpoints import CheckpointError, export_timm
    from fasttrain.train.builders import build_classifier, build_student, init_classifier
    from fasttrain.train.checkpoint import save_atomic
    cfg = build_config(cfg_yaml)
    student = build_student(cfg)
    save_atomic({"kind": "pretrain", "model": student.state_dict(), "config": cfg.to_dict()}, tmp_path / "last.pt")
    export_timm(student, tmp_path / "student.safetensors", in_chans=None)
    ft = build_config(cfg_yaml, ["--model.name=vit_tiny_patch16", "--model.num_classes=14"])
    a, b = build_classifier(ft), build_classifier(ft)
    init_classifier(a, str(tmp_path / "last.pt"), "imagenet")
    init_classifier(b, str(tmp_path / "student.safetensors"), "imagenet")
    for k in ("patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "cls_token"):
        assert torch.equal(a.state_dict()[k], student.state_dict()[k])
        assert torch.allclose(b.state_dict()[k], student.state_dict()[k])
    save_atomic({"kind": "finetune", "model": a.state_dict(), "config": ft.to_dict()}, tmp_path / "ft.pt")
    with pytest.raises(CheckpointError, match="a fine-tuned classifier"):
        init_classifier(build_classifier(ft), str(tmp_path / "ft.pt"), "imagenet")


# ----------------------------------------------------------------------------- per-rank randomness

def _drop_path_rank(rank: int, world: int, port: int, yaml_path: str, overrides: list, outdir: str) -> None:
    """One spawned gloo rank: the fine-tuning Trainer, then one drop-path mask drawn from the
    global RNG as the model's forward draws it; writes outdir/rank<r>.json."""
    from fasttrain.data import build_loader
    from fasttrain.train import loop
    from fasttrain.train.builders import build_classifier
    from fasttrain.train.dist import cleanup
    from fasttrain.train.engine import unwrap
    from fasttrain.train.optim import param_groups_weight_decay
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = build_config(yaml_path, overrides)
    info = loop.setup(cfg)
    try:
        loader = build_loader(cfg.data, cfg.data.train_split, train=True, img_size=cfg.model.img_size,
                              in_chans=cfg.model.in_chans, rank=rank, world_size=world, device=info.device,
                              dtype=torch.float32, seed=cfg.run.seed)
        model = build_classifier(cfg, num_labels=len(loader.label_names)).to(info.device)
        tr = loop.Trainer(cfg, "finetune", model, loader, info, groups=param_groups_weight_decay(model, 0.05))
        net = unwrap(tr.model).train()
        with torch.no_grad():  # the last block has the full rate (timm's rates grow with depth)
            mask = net.blocks[-1].drop_path1(torch.ones(256, 1, 1)).flatten().ne(0).tolist()  # [256] kept samples
            weights = float(sum(p.double().sum() for p in net.parameters()))
        Path(outdir, f"rank{rank}.json").write_text(json.dumps({"mask": mask, "weights": weights}))
    finally:
        cleanup(info)


def test_drop_path_masks_differ_between_ranks(packed, tmp_path, free_port, tiny_yaml):
    """2 gloo ranks build the fine-tuning Trainer from one seed: the same weights on both (DDP), but
    each rank draws its own drop-path mask (a mask shared by every rank correlates the
    regularisation across the global batch)."""
    import torch.multiprocessing as mp

    yaml_path = tmp_path / "vit.yaml"
    yaml_path.write_text(tiny_yaml("vit", model={"drop_path": 0.5, "num_classes": 14}))
    mp.start_processes(_drop_path_rank, args=(2, free_port(), str(yaml_path), [f"--data.path={packed}",
                       f"--run.out={tmp_path / 'run'}"], str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2))
    assert r0["weights"] == r1["weights"]
    assert 0 < sum(r0["mask"]) < 256 and r0["mask"] != r1["mask"]


def test_validation_counts_each_image_once(cfg_yaml, packed):
    """val mAUC over a loader that repeats an image (as FFCV's distributed order padded) is refused:
    the scores would count that image twice."""
    from fasttrain.data import build_loader
    from fasttrain.train.builders import build_classifier
    from fasttrain.train.dist import DistInfo
    from fasttrain.train.finetune import val_metrics
    cfg = build_config(cfg_yaml, [f"--data.path={packed}", "--model.name=vit_tiny_patch16",
                                   "--model.num_classes=14"])
    ld = build_loader(cfg.data, "val", False, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans)
    model = build_classifier(cfg)
    assert set(val_metrics(model, ld, DistInfo(), None)) == {"mauc", "auc", "loss"}  # each image once: scored

    class Padded:  # the last image twice
        label_names, dataset_size = ld.label_names, ld.dataset_size

        def describe(self):
            return "padded"

        def __iter__(self):
            last = None
            for x, y in ld:
                last = (x[-1:], y[-1:])
                yield x, y
            yield last
    with pytest.raises(RuntimeError, match=r"validation scored (\d+) images of a \d+-image split .*each image must count once"):
        val_metrics(model, Padded(), DistInfo(), None)


# ----------------------------------------------------------------------------- clean exit

LEAVE_EARLY = """
import torch
from fasttrain.data.base import Prefetcher

def batches():  # torch work with the GIL released, as the loaders' gather + augmentation plan
    while True:
        x = torch.randn(256, 256)
        for _ in range(20):
            x = torch.mm(x, x).clamp_(-1, 1)
        yield x

prefetched = Prefetcher(batches(), 2)
for i, _ in enumerate(prefetched):
    if i == 1:
        break  # as the kNN bank stops at knn_train_images
assert not prefetched._thread.is_alive(), "the producer still runs after the consumer left"
"""


def test_leaving_a_prefetched_loader_early_then_exiting_exits_zero(tmp_path):
    """A consumer that leaves early, then the interpreter exits at once: the prefetch thread must
    be gone by then (a daemon thread killed inside a torch op aborts the process: 'terminate called
    without an active exception', exit -6, after the work was done)."""
    script = tmp_path / "leave_early.py"
    script.write_text(LEAVE_EARLY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for _ in range(3):
        r = subprocess.run([PY, str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "terminate called" not in r.stderr, (r.returncode, r.stderr[-2000:])


AT_EXIT = """
import atexit, os, runpy, sys

def threads_at_exit():  # after non-daemon Python threads are joined, before the interpreter's teardown
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    print(f"threads at exit on rank {os.environ.get('RANK')}: {len(names)} {names}", file=sys.stderr, flush=True)

atexit.register(threads_at_exit)
sys.argv[0] = "fasttrain"
runpy.run_module("fasttrain.cli", run_name="__main__")
"""


@pytest.mark.parametrize("rounds", [1, pytest.param(6, marks=pytest.mark.slow)])
def test_torchrun_runs_exit_zero_every_time_under_load(cfg_yaml, packed, tmp_path, rounds):
    """2-rank distilling pre-training with the kNN monitor every epoch, then 2-rank fine-tuning,
    `rounds` times in a row beside two busy loops: every finished run exits 0 (a job script or
    SLURM counts anything else as a failure), and when the interpreter's teardown begins each rank
    has one thread left (no gloo run loop, tcp loop or prefetch thread that the teardown could kill
    inside C++)."""
    teacher = tmp_path / "teacher"
    _pretrain(cfg_yaml, packed, teacher, "--optim.epochs=1")
    cli = tmp_path / "cli_at_exit.py"
    cli.write_text(AT_EXIT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(cli)]
    busy = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for i in range(rounds):
            out = tmp_path / f"round{i}"
            pre = subprocess.run(run + ["pretrain", "--config", str(cfg_yaml), "--out", str(out / "pre"),
                                        "--teacher", str(teacher / "checkpoints" / "last.pt"), f"--data.path={packed}",
                                        "--distill.student_blocks=[1]", "--distill.teacher_blocks=[1]",
                                        "--data.batch_size=4", "--optim.epochs=1", "--eval.knn_every=1",
                                        "--eval.knn_train_images=8"],  # the monitor leaves its bank loader early
                                 env=env, capture_output=True, text=True, timeout=300)
            assert pre.returncode == 0, f"round {i}: pretrain exit {pre.returncode}\n{pre.stderr[-3000:]}"
            assert "knn_mauc" in pre.stderr
            ft = subprocess.run(run + ["finetune", "--config", str(cfg_yaml), "--out", str(out / "ft"),
                                       "--init", str(out / "pre" / "checkpoints" / "last.pt"), f"--data.path={packed}",
                                       "--model.name=vit_tiny_patch16", "--model.num_classes=14",
                                       "--data.batch_size=4", "--optim.epochs=1"],
                                env=env, capture_output=True, text=True, timeout=300)
            assert ft.returncode == 0, f"round {i}: finetune exit {ft.returncode}\n{ft.stderr[-3000:]}"
            for r in (pre, ft):
                left = re.findall(r"threads at exit on rank (\d): (\d+) \[", r.stderr)  # ranks share stderr
                assert sorted(k for k, _ in left) == ["0", "1"] and all(n == "1" for _, n in left), r.stderr[-3000:]
    finally:
        for p in busy:
            p.kill()
            p.wait()
