"""Losses against their equations computed independently (numpy, float64), and the AUC metric."""
import math
import warnings

import numpy as np
import pytest
import torch

from fasttrain.losses import feature_align_l1, masked_mse
from fasttrain.metrics import mean_auc, mean_of_defined, per_label_auc


# ----------------------------------------------------------------------------- eq. (1)

def eq1_numpy(pred, target, mask, norm_pix):
    """MAE eq. (1) with explicit loops over images and patches."""
    pred, target, mask = (np.asarray(a, dtype=np.float64) for a in (pred, target, mask))
    num, den = 0.0, 0.0
    for n in range(pred.shape[0]):
        for l in range(pred.shape[1]):
            if mask[n, l] == 0:
                continue
            t = target[n, l]
            if norm_pix:
                P = t.size
                mu = t.sum() / P
                var = ((t - mu) ** 2).sum() / (P - 1)  # unbiased, as MAE's torch.var
                t = (t - mu) / math.sqrt(var + 1e-6)
            num += ((pred[n, l] - t) ** 2).mean()
            den += 1
    return num / den


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("shape", [(2, 16, 48), (3, 7, 5), (1, 1, 3)])
def test_masked_mse_equals_eq1(norm_pix, shape):
    g = torch.Generator().manual_seed(sum(shape) + norm_pix)
    pred = torch.randn(*shape, generator=g)
    target = torch.rand(*shape, generator=g) * 3 + 1
    mask = (torch.rand(shape[:2], generator=g) > 0.4).float()
    mask[0, 0] = 1.0  # at least one masked patch
    got = masked_mse(pred, target, mask, norm_pix=norm_pix)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(eq1_numpy(pred, target, mask, norm_pix), rel=1e-5)


def test_masked_mse_only_masked_patches_count():
    pred = torch.zeros(1, 4, 3)
    target = torch.zeros(1, 4, 3)
    target[0, 0] = 100.0  # a huge error on a kept patch must not count
    target[0, 1] = 2.0
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert masked_mse(pred, target, mask, norm_pix=False).item() == pytest.approx((4.0 + 0.0) / 2)


def test_masked_mse_bf16_inputs_compute_in_fp32():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 9, 12, generator=g), torch.randn(2, 9, 12, generator=g)
    mask = torch.ones(2, 9)
    got = masked_mse(pred.bfloat16(), target.bfloat16(), mask, norm_pix=True)
    ref = eq1_numpy(pred.bfloat16().float(), target.bfloat16().float(), mask, True)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_masked_mse_shape_errors():
    with pytest.raises(ValueError, match="pred"):
        masked_mse(torch.zeros(1, 4, 3), torch.zeros(1, 4, 2), torch.ones(1, 4), False)
    with pytest.raises(ValueError, match="mask"):
        masked_mse(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), torch.ones(1, 5), False)


# ----------------------------------------------------------------------------- eq. (2)

def eq2_numpy(s, t):
    """mean over tokens and channels of |s/||s|| - t/||t|||, norms per token over channels."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    N, T, D = s.shape
    total = 0.0
    for n in range(N):
        for i in range(T):
            a = s[n, i] / max(np.sqrt((s[n, i] ** 2).sum()), 1e-6)
            b = t[n, i] / max(np.sqrt((t[n, i] ** 2).sum()), 1e-6)
            total += np.abs(a - b).sum()
    return total / (N * T * D)


@pytest.mark.parametrize("shape", [(2, 5, 8), (1, 1, 100), (3, 13, 7)])
def test_feature_align_l1_equals_eq2(shape):
    g = torch.Generator().manual_seed(shape[2])
    s = torch.randn(*shape, generator=g) * 4
    t = torch.randn(*shape, generator=g) + 1
    got = feature_align_l1(s, t)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(eq2_numpy(s, t), rel=1e-5)
    # scale invariance per token: normalisation removes the feature magnitudes
    assert feature_align_l1(s * 7.0, t * 0.5).item() == pytest.approx(got.item(), rel=1e-5)


def test_feature_align_l1_grad_only_to_student():
    s = torch.randn(2, 3, 6, requires_grad=True)
    t = torch.randn(2, 3, 6, requires_grad=True)
    feature_align_l1(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_feature_align_l1_shape_error():
    with pytest.raises(ValueError, match="project the student"):
        feature_align_l1(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


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
