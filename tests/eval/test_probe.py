"""`fasttrain probe` (cached features, MAE's head) against sklearn; the cache; bad input."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain.eval.probe import ProbeError, ProbeSettings, head_scores, run_probe, train_head


@pytest.fixture(scope="module")
def packed(tmp_path_factory, packed_phantoms) -> Path:
    return packed_phantoms(tmp_path_factory.mktemp("phantoms"), 60)


@pytest.fixture(scope="module")
def student(tmp_path_factory, packed, tiny_yaml) -> Path:
    from fasttrain.config import build_config
    from fasttrain.train.pretrain import run_pretrain
    root = tmp_path_factory.mktemp("pre")
    (root / "tiny.yaml").write_text(tiny_yaml(optim={"epochs": 1, "warmup_epochs": 0}, run={"ckpt_every": 100}))
    cfg = build_config(root / "tiny.yaml", [f"--data.path={packed}", f"--run.out={root / 'run'}"])
    return Path(run_pretrain(cfg)["last"])


def _linear_problem(seed=0, n=1200, d=24, c=4):
    """Features with a known linear-logistic label structure, badly scaled, 10% unknown labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.2, 5, size=d) + rng.normal(size=d) * 3
    xs = (x - x.mean(0)) / x.std(0)
    w = rng.normal(size=(d, c)) / np.sqrt(d)
    y = (rng.random((n, c)) < 1 / (1 + np.exp(-(xs @ w * 2 - 1)))).astype(np.float32)
    y[rng.random((n, c)) < 0.1] = np.nan
    return x.astype(np.float32), xs, y


def test_probe_head_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from fasttrain.metrics import mean_auc
    x, xs, y = _linear_problem()
    tr, te = slice(0, 900), slice(900, None)
    names = list("abcd")
    head = train_head(x[tr], y[tr], ProbeSettings(epochs=90, batch_size=256), "cpu")
    ours = mean_auc(y[te], head_scores(head, x[te], "cpu"), names)
    ref = np.zeros((300, 4))
    for j in range(4):
        keep = ~np.isnan(y[tr][:, j])
        ref[:, j] = LogisticRegression(max_iter=2000).fit(xs[tr][keep], y[tr][keep, j]).decision_function(xs[te])
    sk = mean_auc(y[te], ref, names)
    assert sk > 0.75  # the problem is learnable
    assert abs(ours - sk) < 0.02


def test_probe_end_to_end_cache_reused_and_invalidated(student, packed, tmp_path):
    from fasttrain.train.checkpoint import load_checkpoint, save_atomic
    s = ProbeSettings(epochs=3, batch_size=16)
    kw = dict(train_split="train", test_split="test", out=tmp_path / "p", settings=s, n_boot=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = run_probe(str(student), packed, **kw)
        again = run_probe(str(student), packed, **kw)
    assert not first["cache"]["train_hit"] and not first["cache"]["test_hit"]
    assert again["cache"]["train_hit"] and again["cache"]["test_hit"]
    assert again["mauc"] == first["mauc"]  # same cached features, same seed
    assert json.loads((tmp_path / "p" / "probe_test.json").read_text())["n_images"] == first["n_images"]
    # a changed checkpoint (one encoder weight moved) misses the cache
    ck = load_checkpoint(student)
    ck["model"]["blocks.0.mlp.fc1.weight"] += 0.1
    changed = tmp_path / "changed.pt"
    save_atomic(ck, changed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = run_probe(str(changed), packed, **kw)
    assert not other["cache"]["train_hit"]
    assert len(list((tmp_path / "p" / "features").glob("train-mean-*.npz"))) == 2
    # cls pooling and the random-init floor run through the same path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        floor = run_probe(None, packed, random_init=True, overrides=["--model.img_size=32", "--model.patch_size=8",
                          "--model.embed_dim=32", "--model.depth=2", "--model.num_heads=2", "--data.eval_resize=32"],
                          pool="cls", **kw)
    assert floor["random_init"] and floor["pool"] == "cls" and floor["feature_dim"] == 32


def test_probe_bad_input_fails_before_extraction(student, packed, tmp_path):
    from fasttrain.models.checkpoints import CheckpointError
    from fasttrain.train.checkpoint import load_checkpoint, save_atomic
    ck = load_checkpoint(student)
    ft = dict(ck, kind="finetune")
    save_atomic(ft, tmp_path / "ft.pt")
    with pytest.raises(ProbeError, match="fine-tuned classifier"):
        run_probe(str(tmp_path / "ft.pt"), packed, out=tmp_path / "o")
    torch.save({"model": {"decoder_embed.weight": torch.zeros(2, 2)}}, tmp_path / "noenc.pth")
    with pytest.raises(CheckpointError):
        run_probe(str(tmp_path / "noenc.pth"), packed, out=tmp_path / "o", overrides=["--model.img_size=32"])
    with pytest.raises(ProbeError, match="no split 'nope'"):
        run_probe(str(student), packed, test_split="nope", out=tmp_path / "o")
    # a split whose label count differs from the others
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    lab = np.load(bad / "splits" / "test.labels.npy")
    np.save(bad / "splits" / "test.labels.npy", lab[:, :5])
    with pytest.raises(ProbeError, match="split 'test' has labels of shape"):
        run_probe(str(student), bad, out=tmp_path / "o")
    assert not (tmp_path / "o" / "features").exists()


def test_reconstruction_figure_of_a_pretraining_run(student, tmp_path):
    from fasttrain.eval.plots import plot_reconstructions, reconstruct
    run = student.parent.parent
    imgs, masked, recon, pasted, m, cfg = reconstruct(run, n_images=3, seed=0)
    assert imgs.shape == recon.shape == pasted.shape == (3, 1, 32, 32)
    frac = m[:, 0].mean(dim=(1, 2))  # removed fraction per image = the mask ratio
    assert torch.allclose(frac, torch.full((3,), 0.75))
    keep = m == 0
    assert torch.equal(pasted[keep], imgs[keep])  # visible patches pasted back unchanged
    assert torch.equal(pasted[~keep], recon[~keep])
    again = reconstruct(run, n_images=3, seed=0)
    assert torch.equal(again[3], pasted)  # fixed images and masks
    png = plot_reconstructions(run, tmp_path / "recon.png", n_images=3)
    assert png.stat().st_size > 1000


def test_probe_cli_json_and_timm_export_gives_the_same_features(student, packed, tmp_path, capsys):
    """`fasttrain probe --json` end to end; the student exported as a timm safetensors probes with
    the same features as our checkpoint (same encoder, --config-free overrides for its shape)."""
    from fasttrain.cli import main
    from fasttrain.models.checkpoints import export_timm
    from fasttrain.train.builders import build_student
    from fasttrain.train.checkpoint import load_checkpoint
    from fasttrain.config import config_from_dict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["probe", "--ckpt", str(student), "--data", str(packed), "--epochs", "2", "--batch-size", "16",
                     "--bootstrap", "10", "--out", str(tmp_path / "ours"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["kind"] == "probe" and res["synthetic"] and set(res["labels"]) and res["mauc_ci95"] is not None
    ck = load_checkpoint(student)
    mae = build_student(config_from_dict(ck["config"]))
    mae.load_state_dict(ck["model"])
    path = export_timm(mae, tmp_path / "student.safetensors", in_chans=None)
    arch = ["--model.img_size=32", "--model.patch_size=8", "--model.embed_dim=32", "--model.depth=2",
            "--model.num_heads=2", "--data.eval_resize=32"]
    s = ProbeSettings(epochs=2, batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_probe(str(path), packed, overrides=arch, out=tmp_path / "timm", settings=s, n_boot=10)
    ours = sorted((tmp_path / "ours" / "features").glob("test-*.npz"))[0]
    theirs = sorted((tmp_path / "timm" / "features").glob("test-*.npz"))[0]
    np.testing.assert_allclose(np.load(ours)["features"], np.load(theirs)["features"], atol=1e-5)
