"""Issue #12: the vectorised bootstrap AUC against the sklearn loop it replaces."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from fasttrain.metrics import bootstrap_auc_matrix, bootstrap_auc_matrix_reference


@pytest.mark.parametrize("n,ties,chunk", [(1, False, 4), (2, True, 3), (7, True, 5), (53, True, 16), (211, False, 64)])
def test_vectorised_bootstrap_matches_sklearn_loop(n, ties, chunk):
    rng = np.random.default_rng(n)
    y = (rng.random((n, 4)) < 0.3).astype(float)
    y[rng.random((n, 4)) < 0.2] = np.nan  # unknown labels are left out per label
    y[:, 3] = 1.0  # a single-class label: undefined on every resample
    s = rng.random((n, 4))
    if ties:
        s = np.round(s, 1)  # many tied scores: the 0.5 credit of Mann-Whitney
    fast = bootstrap_auc_matrix(y, s, [0, 1, 2, 3], n_boot=37, seed=5, chunk=chunk)
    ref = bootstrap_auc_matrix_reference(y, s, [0, 1, 2, 3], n_boot=37, seed=5)
    assert fast.shape == (37, 4)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
    np.testing.assert_allclose(fast[~np.isnan(fast)], ref[~np.isnan(ref)], rtol=0, atol=1e-12)


def test_bootstrap_auc_cis_unchanged_for_a_seed():
    """evaluate's CIs are those the per-resample sklearn loop gives for the same seed."""
    from fasttrain.eval.evaluate import bootstrap_auc
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
