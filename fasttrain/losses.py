"""Losses as pure functions: the MAE reconstruction loss and the distillation feature alignment."""
from __future__ import annotations

import torch

from fasttrain import kernels

NORM_PIX_EPS = 1e-6  # MAE's eps on the per-patch variance


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MAE reconstruction loss (He et al. 2022, eq. 1), a scalar fp32 tensor.

        t_l   = (x_l - mean(x_l)) / sqrt(var(x_l) + 1e-6)   if norm_pix else x_l
        e_l   = mean_j (pred_lj - t_lj)^2                    per-patch mean squared error
        loss  = sum_l m_l e_l / sum_l m_l                    over the masked (removed) patches only

    pred, target [N, L, P] (P = p*p*C pixels per patch), mask [N, L] with 1 = removed.
    var is the unbiased variance over the P pixels of each target patch, as in MAE's code (so
    checkpoints trained with it and this loss agree). Computed in fp32: under bf16 autocast the
    per-patch normalisation and the sum over ~150 masked patches per image lose too many bits.
    """
    if pred.shape != target.shape:
        raise ValueError(f"masked_mse: pred {list(pred.shape)} and target {list(target.shape)} differ")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"masked_mse: mask {list(mask.shape)} must be [N, L] = {list(pred.shape[:2])}")
    pred = pred.float()
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
        var = target.var(dim=-1, keepdim=True)  # [N, L, 1] unbiased (MAE)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5  # [N, L, P]
    per_patch = (pred - target).pow(2).mean(dim=-1)  # [N, L]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


def feature_align_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distillation feature alignment (eq. 2 as in the paper's reference code), a scalar fp32 tensor.

        L_dist = mean_{n, t, d} | s_nt / ||s_nt||_2 - u_nt / ||u_nt||_2 |_d

    student (projected student features) and teacher [N, T, D], norms per token over D (floored
    at kernels.l1_align's eps). No gradient flows to the teacher. The formula lives once, in
    `kernels/l1_align.py:l1_align_reference`; `kernels.l1_align` dispatches to it or to the fused
    kernel, so this function only checks shapes.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"feature_align_l1: student {list(student.shape)} and teacher "
                         f"{list(teacher.shape)} must match (project the student to the teacher's width first)")
    return kernels.l1_align(student, teacher)
