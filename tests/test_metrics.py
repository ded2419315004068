"""The AUC metric against hand computations, and its vectorised bootstrap against the sklearn loop."""
import warnings

import numpy as np
import pytest
import torch

from fasttrain.metrics import (bootstrap_auc_matrix, bootstrap_auc_matrix_reference, mean_auc, mean_of_defined,
                               per_label_auc)

# ----------------------------------------------------------------------------- AUC

LABELS = ["A", "B", "C"]


def test_mean_auc_hand_computed():
    # A: positives {0.35, 0.8}, negatives {0.1, 0.4}: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    # B: positives {0.5, 0.9}, negatives {0.5, 0.2}: tie counts 1/2 -> (0.5 + 1 + 1 + 1)/4 = 0.875
    # C: positives {0.2, 0.3}, negatives {0.6, 0.7}: no pair won -> 0
    y = np.array([[0, 1, 0], [0, 0, 1], [1, 1, 1], [1, 0, 0]], dtype=np.float32)
    s = np.array([[0.1, 0.5, 0.6], [0.4, 0.2, 0.2], [0.35, 0.9, 0.3], [0.8, 0.5, 0.7]], dtype=np.float32)
    aucs = per_label_auc(y, s, LABELS)
    assert aucs == pytest.approx({"A": 0.75, "B": 0.875, "C": 0.0})
    assert mean_auc(y, s, LABELS) == pytest.approx((0.75 + 0.875 + 0.0) / 3)
    # torch tensors are accepted too
    assert mean_auc(torch.from_numpy(y), torch.from_numpy(s), LABELS) == pytest.approx((0.75 + 0.875 + 0.0) / 3)


def test_nan_targets_are_dropped_per_label():
    y = np.array([[0, 1], [np.nan, 0], [1, 1], [1, np.nan], [0, 0]], dtype=np.float64)
    s = np.array([[0.2, 0.9], [0.99, 0.1], [0.7, 0.3], [0.1, 0.0], [0.3, 0.5]])
    aucs = per_label_auc(y, s, ["A", "B"])
    # A without row 1: positives {0.7, 0.1}, negatives {0.2, 0.3}: won 0.7>0.2, 0.7>0.3 -> 2/4
    # B without row 3: positives {0.9, 0.3}, negatives {0.1, 0.5}: won 0.9>0.1, 0.9>0.5, 0.3>0.1 -> 3/4
    assert aucs == pytest.approx({"A": 0.5, "B": 0.75})


def test_undefined_label_is_none_warned_and_left_out_of_mean():
    y = np.array([[0, 1, 0], [1, 1, 0], [0, 1, 1], [1, 1, 0]], dtype=np.float32)
    s = np.array([[0.1, 0.3, 0.2], [0.9, 0.2, 0.1], [0.2, 0.8, 0.9], [0.8, 0.1, 0.3]], dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="B"):
        aucs = per_label_auc(y, s, LABELS)
    assert aucs["B"] is None  # only positives: undefined, not 0
    assert aucs["A"] == pytest.approx(1.0) and aucs["C"] == pytest.approx(1.0)
    with pytest.warns(RuntimeWarning):
        m = mean_auc(y, s, LABELS)
    assert m == pytest.approx(1.0)  # (1 + 1) / 2, not (1 + 0 + 1) / 3
    # a label whose only remaining targets after dropping NaN are one class is undefined too
    y2 = y.copy()
    y2[:, 0] = [np.nan, 1, np.nan, 1]
    with pytest.warns(RuntimeWarning, match="A"):
        assert per_label_auc(y2, s, LABELS)["A"] is None


def test_all_undefined_mean_is_none():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mean_auc(np.ones((3, 2)), np.random.rand(3, 2), ["A", "B"]) is None
    assert mean_of_defined({"A": None}) is None


def test_auc_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        per_label_auc(np.zeros((3, 2)), np.zeros((3, 3)), ["A", "B"])
    with pytest.raises(ValueError, match="label names"):
        per_label_auc(np.zeros((3, 2)), np.zeros((3, 2)), ["A"])
    with pytest.raises(ValueError, match="'A'"):
        per_label_auc(np.array([[0.0], [2.0]]), np.zeros((2, 1)), ["A"])
    with pytest.raises(ValueError, match="non-finite"):
        per_label_auc(np.array([[0.0], [1.0]]), np.array([[0.0], [np.nan]]), ["A"])


# ----------------------------------------------------------------------------- bootstrap

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
