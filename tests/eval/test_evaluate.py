"""evaluate: its bootstrap CIs against the per-resample sklearn loop, and `fasttrain evaluate --by
--calibrate` end to end on SYNTHETIC phantoms packed with their metadata."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fasttrain.config import build_config
from fasttrain.metrics import bootstrap_auc
from fasttrain.metrics import bootstrap_auc_matrix_reference


def test_bootstrap_auc_cis_unchanged_for_a_seed():
    """evaluate's CIs are those the per-resample sklearn loop gives for the same seed."""
    rng = np.random.default_rng(0)
    y = (rng.random((120, 3)) < 0.4).astype(float)
    s = np.clip(y * 0.3 + rng.random((120, 3)), 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = bootstrap_auc(y, s, ["a", "b", "c"], n_boot=200, seed=3)
    ref = bootstrap_auc_matrix_reference(y, s, [0, 1, 2], n_boot=200, seed=3)
    for j, name in enumerate("abc"):
        lo, hi = np.percentile(ref[:, j], [2.5, 97.5])
        assert res["labels"][name]["ci95"] == pytest.approx([lo, hi], abs=1e-12)
    lo, hi = np.percentile(ref.mean(axis=1), [2.5, 97.5])
    assert res["mauc_ci95"] == pytest.approx([lo, hi], abs=1e-12)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, packed_phantoms, tiny_yaml):
    from fasttrain.train.checkpoint import save_atomic
    from fasttrain.train.finetune import run_finetune
    root = tmp_path_factory.mktemp("subgroups")
    packed = packed_phantoms(root, 120, seed=3)
    (root / "ft.yaml").write_text(tiny_yaml("vit", model={"num_classes": 14}, data={"val_split": "val"},
                                            optim={"epochs": 1}))
    cfg = build_config(root / "ft.yaml", [f"--data.path={packed}", f"--run.out={root / 'ft'}"])
    summary = run_finetune(cfg)
    # one epoch leaves the head near its init; spread the scores so that calibration has work to do
    ck = torch.load(summary["last"], map_location="cpu", weights_only=True)
    ck["model"]["head.weight"] *= 500.0
    save_atomic(ck, summary["last"])
    return packed, Path(summary["last"])


def test_evaluate_by_and_calibrate_end_to_end(finetuned, tmp_path, capsys, plain_ece):
    from fasttrain.cli import main
    from fasttrain.format.packed import open_packed
    packed, ckpt = finetuned
    assert main(["evaluate", "--ckpt", str(ckpt), "--data", str(packed), "--out", str(tmp_path), "--bootstrap", "30",
                 "--by", "sex,age,view", "--age-bins", "0,50,70", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "calibration (15 equal-width bins)" in out and "worst sex:" in out and "[50,70)" in out
    res = json.loads((tmp_path / "results_test.json").read_text())
    scores = np.load(tmp_path / "scores_test.npy").astype(np.float64)
    test = open_packed(packed, "test")
    assert scores.shape == test.labels.shape
    # the groups are the packed metadata's, scored on the saved scores
    for sex in ("M", "F"):
        rows = np.flatnonzero(test.metadata["sex"] == sex)
        assert res["subgroups"]["groups"]["sex"][sex]["n"] == rows.size
        for n, auc in res["subgroups"]["groups"]["sex"][sex]["auc"].items():
            j = test.label_names.index(n)
            assert auc == pytest.approx(roc_auc_score(test.labels[rows, j], scores[rows, j]), abs=1e-6)
    cal = res["calibration"]
    assert cal["ece"] == pytest.approx(np.mean([plain_ece(test.labels[:, j], scores[:, j]) for j in range(14)]),
                                       abs=1e-6)
    temp = json.loads((ckpt.parent / (ckpt.name + ".temperature.json")).read_text())
    assert set(temp["temperature"]) == set(test.label_names) and temp["fitted_on"]["split"] == "val"
    assert cal["temperature"]["ece"] is not None and res["subgroups"]["thresholds_from"] == "val"
    assert (tmp_path / "reliability_test.png").stat().st_size > 1000
    assert main(["evaluate", "--ckpt", str(ckpt), "--data", str(packed), "--out", str(tmp_path),
                 "--bootstrap", "5", "--by", "race"]) == 2
    assert "--by race" in capsys.readouterr().err
