"""L1 feature alignment between per-token L2-normalised student and teacher features.

Layout of this file: the pure-torch reference (the semantics), the Triton kernels, their
launchers, the launchers registered as torch custom ops, the autograd.Function and the
dispatching entry point.

Why fuse: the eager loss upcasts both [N, T, D] inputs, computes two norms, two divisions, a
difference, an abs and a mean, each a pass with a temporary, and autograd keeps several of them
for the backward. The kernel reads s and t once per token row (fp32 in registers) and writes one
partial sum per program; the backward re-reads s and t and writes grad_s once.
"""
from __future__ import annotations

import torch

from . import (HAS_TRITON, check_float, check_layout, dense_last, empty, launch, register_op,
               use_triton)

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


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_token_rows(s_ptr, t_ptr, R, T, D, ss_n, ss_t, st_n, st_t,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's BLOCK_R token rows of s and t, in fp32 whatever the input dtype: (rows r
        [BR], lanes d [BD], mask [BR, BD], s [BR, BD], t [BR, BD]); padding lanes read 0. Token
        row r = n*T + t is addressed through the strides of s and t (slices need no copy)."""
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BR]
        d = tl.arange(0, BLOCK_D)  # [BD]
        m = (r < R)[:, None] & (d < D)[None, :]  # [BR, BD]
        n, tk = r // T, r % T
        s = tl.load(s_ptr + (n * ss_n + tk * ss_t)[:, None] + d[None, :], mask=m, other=0.0)
        t = tl.load(t_ptr + (n * st_n + tk * st_t)[:, None] + d[None, :], mask=m, other=0.0)
        return r, d, m, s.to(tl.float32), t.to(tl.float32)

    @triton.jit
    def _l1_align_fwd_kernel(s_ptr, t_ptr, part_ptr, R, T, D, ss_n, ss_t, st_n, st_t, eps,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """part[pid] = sum over BLOCK_R token rows and D of |s/max(|s|,eps) - t/max(|t|,eps)|.
        One row is whole in a tile (BLOCK_D >= D), so each norm is one in-register reduction."""
        r, d, m, s, t = _load_token_rows(s_ptr, t_ptr, R, T, D, ss_n, ss_t, st_n, st_t, BLOCK_R, BLOCK_D)
        ns = tl.maximum(tl.sqrt(tl.sum(s * s, axis=1)), eps)  # [BR]
        nt = tl.maximum(tl.sqrt(tl.sum(t * t, axis=1)), eps)  # [BR]
        diff = tl.abs(s / ns[:, None] - t / nt[:, None])  # [BR, BD]; padding lanes give 0
        tl.store(part_ptr + tl.program_id(0), tl.sum(tl.sum(diff, axis=1), axis=0))

    @triton.jit
    def _l1_align_bwd_kernel(s_ptr, t_ptr, gout_ptr, gs_ptr, R, T, D, ss_n, ss_t, st_n, st_t,
                             eps, inv_numel, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """grad_s of mean|u - v|, u = s/max(|s|,eps), v = t/max(|t|,eps):
        g = sign(u - v) * gout / numel;  grad_s = (g - u (u.g)) / |s|  where |s| >= eps
        (the normalisation's Jacobian (I - u u^T)/|s|), and g / eps where the clamp is active."""
        r, d, m, s, t = _load_token_rows(s_ptr, t_ptr, R, T, D, ss_n, ss_t, st_n, st_t, BLOCK_R, BLOCK_D)
        ns_raw = tl.sqrt(tl.sum(s * s, axis=1))  # [BR]
        ns = tl.maximum(ns_raw, eps)
        nt = tl.maximum(tl.sqrt(tl.sum(t * t, axis=1)), eps)
        u = s / ns[:, None]  # [BR, BD]
        diff = u - t / nt[:, None]
        scale = tl.load(gout_ptr).to(tl.float32) * inv_numel  # d mean / d element, on device
        g = tl.where(diff > 0, scale, tl.where(diff < 0, -scale, 0.0))  # abs' subgradient: 0 at 0
        ug = tl.sum(u * g, axis=1)  # [BR]
        clamped = (ns_raw < eps)[:, None]  # torch's clamp_min passes the gradient at equality
        grad = tl.where(clamped, g / eps, (g - u * ug[:, None]) / ns[:, None])
        tl.store(gs_ptr + r[:, None] * D + d[None, :], grad.to(gs_ptr.dtype.element_ty), mask=m)
else:  # without triton the entry point takes the reference (see kernels.use_triton)
    _l1_align_fwd_kernel = None


def _tiles(R: int, D: int) -> tuple[int, int]:
    """Whole token rows per program (BLOCK_D covers D), ~4K elements per tile."""
    bd = triton.next_power_of_2(D)
    br = max(1, min(triton.next_power_of_2(max(R, 1)), 4096 // bd))
    return br, bd


def _warps(br: int, bd: int) -> int:
    """Two fp32 [BR, BD] tiles (s, t) plus temporaries live in registers: 8 warps hold a
    4K-element tile at 16 values per thread and tensor, 4 warps would need 32 (spill risk).
    A guess until a GPU measures it."""
    return 8 if br * bd >= 4096 else 4


def _check(op: str, s: torch.Tensor, t: torch.Tensor, eps: float) -> None:
    if s.dim() != 3:
        raise ValueError(f"{op}: s must be [N, T, D], got shape {tuple(s.shape)}")
    if tuple(t.shape) != tuple(s.shape):
        raise ValueError(f"{op}: t must have the shape of s {tuple(s.shape)}, got {tuple(t.shape)}")
    check_float(op, "s", s)
    check_float(op, "t", t)
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")
    if s.shape[-1] > 16384:
        raise ValueError(f"{op}: D={s.shape[-1]} is too wide for one tile (at most 16384)")
    check_layout(op, {"s": s, "t": t}, strided=("s", "t"))


def l1_align_fwd_launch(s: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton forward of l1_align: [N, T, D], [N, T, D] -> fp32 scalar."""
    _check("l1_align", s, t, eps)
    N, T, D = s.shape
    R = N * T
    if R * D == 0:
        return torch.full((), float("nan"), dtype=torch.float32, device=s.device)  # mean of nothing
    br, bd = _tiles(R, D)
    nprog = triton.cdiv(R, br)
    part = empty((nprog,), torch.float32, s.device)  # one partial sum per program
    launch(_l1_align_fwd_kernel, (nprog,), s, t, part, R, T, D, *s.stride()[:2], *t.stride()[:2],
           eps, BLOCK_R=br, BLOCK_D=bd, num_warps=_warps(br, bd))
    # Deterministic second stage (no atomics): a few thousand partials at the paper's shapes.
    return part.sum() / (R * D)


def l1_align_bwd_launch(s: torch.Tensor, t: torch.Tensor, grad_out: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """Triton backward of l1_align to s: grad_out (scalar) -> grad_s [N, T, D] in s's dtype."""
    op = "l1_align backward"
    _check(op, s, t, eps)
    if grad_out.numel() != 1:
        raise ValueError(f"{op}: grad must be a scalar, got shape {tuple(grad_out.shape)}")
    N, T, D = s.shape
    R = N * T
    grad_s = empty((N, T, D), s.dtype, s.device)  # [N, T, D]
    if R * D == 0:
        return grad_s
    br, bd = _tiles(R, D)
    g = grad_out.reshape(1).to(device=s.device, dtype=torch.float32)  # stays on device: no sync
    launch(_l1_align_bwd_kernel, (triton.cdiv(R, br),), s, t, g, grad_s, R, T, D,
           *s.stride()[:2], *t.stride()[:2], eps, 1.0 / (R * D), BLOCK_R=br, BLOCK_D=bd,
           num_warps=_warps(br, bd))
    return grad_s


# Custom ops: torch.compile keeps them in its graph (no graph break); see kernels.register_op.
if HAS_TRITON:
    register_op("l1_align_fwd", l1_align_fwd_launch)
    register_op("l1_align_bwd", l1_align_bwd_launch)


class L1AlignFn(torch.autograd.Function):
    """l1_align on the Triton kernels; backward to s only (the teacher is a constant)."""

    @staticmethod
    def forward(ctx, s, t, eps):
        ctx.save_for_backward(s, t)
        ctx.eps = eps
        return torch.ops.fasttrain.l1_align_fwd(s, t, eps)  # [] fp32

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        s, t = ctx.saved_tensors
        return torch.ops.fasttrain.l1_align_bwd(s, t, grad_out, ctx.eps), None, None


def l1_align(s: torch.Tensor, t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """s (student projection), t (teacher) [N, T, D] -> fp32 scalar; see l1_align_reference.

    Triton when kernels.use_triton says so; gradients flow to s only, as in the reference.
    """
    if not use_triton("l1_align", _l1_align_fwd_kernel, s, t):
        return l1_align_reference(s, t, eps)
    return L1AlignFn.apply(dense_last(s), dense_last(t.detach()), float(eps))
