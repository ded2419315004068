"""Calibration (ECE, Brier, bootstrap ECE CIs, temperature scaling), each checked against a plain
sklearn / numpy computation on the same scores."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from fasttrain.eval.calibration import apply_temperature, calibration_report, fit_temperature
from fasttrain.metrics import bootstrap_ece_matrix


def test_ece_and_brier_match_plain_numpy_and_sklearn(label_scores, score_names, plain_ece):
    y, s = label_scores()
    cal = calibration_report(y, s, score_names, n_boot=50, seed=3)
    for j, n in enumerate(score_names):
        keep = ~np.isnan(y[:, j])
        assert cal["ece_per_label"][n] == pytest.approx(plain_ece(y[:, j], s[:, j]), abs=1e-9)
        assert cal["brier_per_label"][n] == pytest.approx(brier_score_loss(y[keep, j], s[keep, j]), abs=1e-9)
    assert cal["ece"] == pytest.approx(np.mean([plain_ece(y[:, j], s[:, j]) for j in range(3)]), abs=1e-9)
    lo, hi = cal["ece_ci95"]
    assert lo < cal["ece"] < hi


def test_bootstrap_ece_matches_per_resample_loop(label_scores, plain_ece):
    y, s = label_scores(120, seed=1)
    boots = bootstrap_ece_matrix(y, s, n_boot=30, seed=7, chunk=7)
    rng = np.random.default_rng(7)
    for b in range(30):
        idx = rng.integers(0, len(y), size=len(y))
        for j in range(3):
            assert boots[b, j] == pytest.approx(plain_ece(y[idx, j], s[idx, j]), abs=1e-9)


def test_temperature_recovers_a_known_temperature_and_keeps_auc():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, size=(20000, 2))  # the model's logits
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z / np.array([2.0, 0.5])))).astype(float)  # truth: z / T
    p = 1 / (1 + np.exp(-z))
    temps = fit_temperature(y, p, ["x", "y"])
    assert temps["x"] == pytest.approx(2.0, rel=0.08) and temps["y"] == pytest.approx(0.5, rel=0.08)
    q = apply_temperature(p, np.array([temps["x"], temps["y"]]))
    for j in range(2):
        assert roc_auc_score(y[:, j], q[:, j]) == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-12)
    before = calibration_report(y, p, ["x", "y"], n_boot=10)["ece"]
    after = calibration_report(y, q, ["x", "y"], n_boot=10)["ece"]
    assert after < before / 3
    one_class = fit_temperature(np.zeros((5, 1)), np.full((5, 1), 0.2), ["z"])
    assert one_class == {"z": 1.0}
