"""What only the evaluation tests use: scores with unknown labels for three labels, and ECE
computed the plain way (a loop over equal-width bins) as the reference for ours."""
from __future__ import annotations

import numpy as np
import pytest

SCORE_NAMES = ["a", "b", "c"]


def scores_with_unknowns(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.3, 0.15, 0.5]).astype(float)
    s = np.clip(0.35 * y + rng.random((n, 3)) * 0.65, 0, 1)
    y[rng.random((n, 3)) < 0.05] = np.nan  # unknown labels
    s[:3, 0] = [0.0, 1.0, 1 / 15]  # bin edges: 0 in bin 0, 1 in the last, an interior edge below it
    return y, s


def ece_by_loop(y, p, n_bins=15):
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for k in range(n_bins):
        m = (p <= edges[k + 1]) & ((p > edges[k]) if k else (p >= 0))
        if m.any():
            total += m.sum() / y.size * abs(y[m].mean() - p[m].mean())
    return total


@pytest.fixture(scope="session")
def score_names() -> list[str]:
    """The three label names of `label_scores`."""
    return SCORE_NAMES


@pytest.fixture(scope="session")
def label_scores():
    """`label_scores(n=400, seed=0) -> (y [n, 3] with ~5% NaN unknowns, s [n, 3] in 0..1)`, scores
    that rank positives higher, and bin edges (0, 1, 1/15) in the first rows."""
    return scores_with_unknowns


@pytest.fixture(scope="session")
def plain_ece():
    """`plain_ece(y, p, n_bins=15) -> float`: expected calibration error over equal-width bins."""
    return ece_by_loop
