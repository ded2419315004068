"""L1 feature alignment between per-token L2-normalised student and teacher features."""
from __future__ import annotations

import torch

EPS = 1e-6  # floor on each token's L2 norm: x / max(||x||, EPS)


def l1_align_reference(s: torch.Tensor, t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """s, t [N, T, D] -> scalar fp32:  mean_{n,t,d} | s/max(||s||,eps) - t/max(||t||,eps) |.

    Norms are per token over D. Computed in fp32 whatever the input dtype; the teacher is a
    constant (no gradient flows to t).
    """
    s32 = s.float()
    t32 = t.detach().float()
    sn = s32 / s32.norm(dim=-1, keepdim=True).clamp_min(eps)  # [N, T, D]
    tn = t32 / t32.norm(dim=-1, keepdim=True).clamp_min(eps)  # [N, T, D]
    return (sn - tn).abs().mean()


def l1_align(s: torch.Tensor, t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Dispatching entry point; see l1_align_reference for the semantics."""
    return l1_align_reference(s, t, eps)
