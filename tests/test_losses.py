"""Losses against their equations computed independently (numpy, float64)."""
import math

import numpy as np
import pytest
import torch

from fasttrain.losses import feature_align_l1, masked_mse

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
