"""Masked-token gather (MAE encoder input) and un-shuffle with mask tokens (MAE decoder input).

Layout of this file: the pure-torch references (the semantics), the Triton kernels, their
launchers (input validation + grid), the launchers registered as torch custom ops, the
autograd.Functions over those ops, and the dispatching entry points the model calls.

Why fuse: eager MAE adds the position embedding to all L tokens, then gathers K = L/4 of them
(two passes over [N, L, D] and a temporary); the decoder concatenates mask tokens and gathers
again. The kernels read each kept row once and write each output row once, and their backwards
write every gradient element exactly once (no zero-fill pass, no atomics: ids are distinct).
"""
from __future__ import annotations

import torch

from . import (HAS_TRITON, block_d, can_check_values, check_float, check_layout, dense_last, empty,
               launch, register_op, use_triton)


# ----------------------------------------------------------------------------------------------
# References (the semantics every backend must equal)
# ----------------------------------------------------------------------------------------------

def masked_gather_reference(x: torch.Tensor, ids_keep: torch.Tensor,
                            pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, L, D], ids_keep [N, K] (int64, distinct per row), pos_embed [1, L, D] or None -> [N, K, D].

    out[n, k] = x[n, ids_keep[n, k]] + pos_embed[0, ids_keep[n, k]]
    """
    if pos_embed is not None:
        x = x + pos_embed  # [N, L, D]
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # [N, K, D]
    return torch.gather(x, 1, idx)  # [N, K, D]


def unshuffle_with_mask_token_reference(x_vis: torch.Tensor, mask_token: torch.Tensor,
                                        ids_restore: torch.Tensor) -> torch.Tensor:
    """x_vis [N, K, D], mask_token [D], ids_restore [N, L] -> [N, L, D].

    Appends L-K mask tokens after the K visible tokens (shuffled order), then un-shuffles:
    out[n, l] = x_vis[n, ids_restore[n, l]] if ids_restore[n, l] < K else mask_token.
    """
    N, K, D = x_vis.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).to(x_vis.dtype).expand(N, L - K, D)  # [N, L-K, D]
    x_ = torch.cat([x_vis, mask_tokens], dim=1)  # [N, L, D] in shuffled order
    idx = ids_restore.unsqueeze(-1).expand(-1, -1, D)  # [N, L, D]
    return torch.gather(x_, 1, idx)  # [N, L, D] in patch order


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_fwd_kernel(x_ptr, ids_ptr, pos_ptr, out_ptr, K, L, D,
                           sx_n, sx_l, si_n, si_k, sp_l,
                           HAS_POS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[n, k, :] = x[n, ids[n, k], :] (+ pos[ids[n, k], :]); one [BLOCK_K, BLOCK_D] tile.
        x, ids and pos are addressed through their strides (last dim of x/pos dense)."""
        n = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
        k_ok = k < K
        m = k_ok[:, None] & (d < D)[None, :]  # [BK, BD]
        idx = tl.load(ids_ptr + n * si_n + k * si_k, mask=k_ok, other=0)  # [BK] int64 source rows
        v = tl.load(x_ptr + (n * sx_n + idx * sx_l)[:, None] + d[None, :], mask=m, other=0.0)
        v = v.to(tl.float32)  # add in fp32, round once to the output dtype (as torch's add does)
        if HAS_POS:
            p = tl.load(pos_ptr + (idx * sp_l)[:, None] + d[None, :], mask=m, other=0.0)
            v += p.to(tl.float32)
        tl.store(out_ptr + (n * K + k)[:, None] * D + d[None, :],
                 v.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gather_bwd_kernel(gout_ptr, inv_ptr, gx_ptr, gpos_part_ptr, N, K, L, D,
                           STORE_X: tl.constexpr, HAS_POS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """For one patch l and BLOCK_N rows: gx[n, l] = gout[n, inv[n, l]] or 0 where l was
        dropped (inv = -1); the pos-embed partial sum over those rows goes to
        gpos_part[n_block, l]. Every gx element is written once: no zero-fill, no atomics."""
        nb = tl.program_id(0)
        l = tl.program_id(1).to(tl.int64)
        n = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
        n_ok = n < N
        d_ok = d < D
        m = n_ok[:, None] & d_ok[None, :]  # [BN, BD]
        k = tl.load(inv_ptr + n * L + l, mask=n_ok, other=-1).to(tl.int64)  # [BN] slot or -1
        kept = (k >= 0)[:, None] & m
        g = tl.load(gout_ptr + (n * K + k)[:, None] * D + d[None, :], mask=kept, other=0.0)
        if STORE_X:
            tl.store(gx_ptr + (n * L + l)[:, None] * D + d[None, :],
                     g.to(gx_ptr.dtype.element_ty), mask=m)
        if HAS_POS:
            part = tl.sum(g.to(tl.float32), axis=0)  # [BD] fp32
            tl.store(gpos_part_ptr + (nb * L + l) * D + d, part, mask=d_ok)

    @triton.jit
    def _unshuffle_fwd_kernel(xv_ptr, tok_ptr, ids_ptr, out_ptr, K, L, D,
                              sv_n, sv_k, si_n, si_l,
                              BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[n, l] = x_vis[n, r] if r = ids_restore[n, l] < K else mask_token.
        x_vis and ids_restore are addressed through their strides (x_vis[:, 1:] needs no copy)."""
        n = tl.program_id(0).to(tl.int64)
        l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
        l_ok = l < L
        d_ok = d < D
        m = l_ok[:, None] & d_ok[None, :]  # [BL, BD]
        r = tl.load(ids_ptr + n * si_n + l * si_l, mask=l_ok, other=0)  # [BL] int64 shuffled slot
        vis = (r < K)[:, None]  # [BL, 1]
        v = tl.load(xv_ptr + (n * sv_n + r * sv_k)[:, None] + d[None, :], mask=vis & m, other=0.0)
        tok = tl.load(tok_ptr + d, mask=d_ok, other=0.0).to(out_ptr.dtype.element_ty)  # [BD]
        out = tl.where(vis, v.to(out_ptr.dtype.element_ty), tok[None, :])
        tl.store(out_ptr + (n * L + l)[:, None] * D + d[None, :], out, mask=m)

    @triton.jit
    def _unshuffle_bwd_kernel(gout_ptr, ids_ptr, gxv_ptr, gtok_part_ptr, K, L, D, si_n, si_l,
                              STORE_X: tl.constexpr, HAS_TOK: tl.constexpr,
                              BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        """gx_vis[n, r] = gout[n, l] for visible slots r = ids_restore[n, l] < K (a permutation, so
        each r is written once); the masked rows' sum goes to gtok_part[n, l_block]."""
        n = tl.program_id(0).to(tl.int64)
        lb = tl.program_id(1)
        l = lb * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
        l_ok = l < L
        d_ok = d < D
        m = l_ok[:, None] & d_ok[None, :]  # [BL, BD]
        r = tl.load(ids_ptr + n * si_n + l * si_l, mask=l_ok, other=0)  # [BL] int64
        vis = (r < K)[:, None]  # [BL, 1]
        g = tl.load(gout_ptr + (n * L + l)[:, None] * D + d[None, :], mask=m, other=0.0)
        if STORE_X:
            tl.store(gxv_ptr + (n * K + r)[:, None] * D + d[None, :],
                     g.to(gxv_ptr.dtype.element_ty), mask=vis & m)
        if HAS_TOK:
            part = tl.sum(tl.where(vis, 0.0, g.to(tl.float32)), axis=0)  # [BD] fp32
            tl.store(gtok_part_ptr + (n * tl.num_programs(1) + lb) * D + d, part, mask=d_ok)
else:  # without triton every entry point takes the reference (see kernels.use_triton)
    _gather_fwd_kernel = _unshuffle_fwd_kernel = None


def _rows_tile(rows: int, bd: int) -> int:
    """Rows per program: tiles of ~4K elements (16 KiB fp32), at most the next power of 2 of rows."""
    return max(1, min(triton.next_power_of_2(max(rows, 1)), 4096 // bd))


# ----------------------------------------------------------------------------------------------
# Launchers (validate, allocate, launch); registered below as custom ops for torch.compile.
# ----------------------------------------------------------------------------------------------

def _check_ids(op: str, name: str, ids: torch.Tensor, rows: int, upper: int, permutation: bool) -> None:
    if ids.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != rows:
        raise ValueError(f"{op}: {name} must be [N={rows}, ...], got shape {tuple(ids.shape)}")
    if can_check_values(ids) and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{op}: {name} values must lie in [0, {upper}), got [{lo}, {hi}]")
        srt = ids.sort(dim=1).values
        if ids.shape[1] > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError(f"{op}: {name} must hold distinct indices in each row "
                             f"({'a permutation of 0..L-1' if permutation else 'no repeats'})")


def masked_gather_fwd_launch(x: torch.Tensor, ids_keep: torch.Tensor,
                             pos_embed: torch.Tensor | None) -> torch.Tensor:
    """Triton forward of masked_gather: [N, L, D], [N, K], [1, L, D]|None -> [N, K, D]."""
    op = "masked_gather"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [N, L, D], got shape {tuple(x.shape)}")
    N, L, D = x.shape
    check_float(op, "x", x)
    if ids_keep.dim() == 2 and ids_keep.shape[1] > L:
        raise ValueError(f"{op}: ids_keep keeps K={ids_keep.shape[1]} tokens of only L={L}")
    _check_ids(op, "ids_keep", ids_keep, N, L, permutation=False)
    K = ids_keep.shape[1]
    named = {"x": x, "ids_keep": ids_keep}
    out_dtype = x.dtype
    if pos_embed is not None:
        check_float(op, "pos_embed", pos_embed)
        if tuple(pos_embed.shape) != (1, L, D):
            raise ValueError(f"{op}: pos_embed must be [1, L={L}, D={D}], got {tuple(pos_embed.shape)}")
        named["pos_embed"] = pos_embed
        out_dtype = torch.promote_types(x.dtype, pos_embed.dtype)  # as x + pos_embed would
    check_layout(op, named, strided=("x", "ids_keep", "pos_embed"))
    out = empty((N, K, D), out_dtype, x.device)  # [N, K, D]
    if out.numel() == 0:
        return out
    bd = block_d(D)
    bk = _rows_tile(K, bd)
    grid = (N, triton.cdiv(K, bk), triton.cdiv(D, bd))
    pos = pos_embed if pos_embed is not None else x  # placeholder pointer when HAS_POS is off
    launch(_gather_fwd_kernel, grid, x, ids_keep, pos, out, K, L, D,
           x.stride(0), x.stride(1), ids_keep.stride(0), ids_keep.stride(1), pos.stride(1),
           HAS_POS=pos_embed is not None, BLOCK_K=bk, BLOCK_D=bd)
    return out


def masked_gather_bwd_launch(grad_out: torch.Tensor, ids_keep: torch.Tensor, L: int,
                             x_dtype: torch.dtype, pos_dtype: torch.dtype, need_x: bool,
                             need_pos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward of masked_gather: grad [N, K, D] -> (grad_x [N, L, D], grad_pos [1, L, D]).

    A gradient that is not needed comes back as an empty tensor (custom ops cannot return None).
    """
    op = "masked_gather backward"
    if grad_out.dim() != 3:
        raise ValueError(f"{op}: grad must be [N, K, D], got shape {tuple(grad_out.shape)}")
    N, K, D = grad_out.shape
    check_float(op, "grad", grad_out)
    _check_ids(op, "ids_keep", ids_keep, N, L, permutation=False)
    check_layout(op, {"grad": grad_out, "ids_keep": ids_keep}, strided=("ids_keep",))
    dev = grad_out.device
    # inverse map: inv[n, l] = k where ids_keep[n, k] == l, else -1 (N*L int32: tiny next to [N, L, D])
    inv = torch.full((N, L), -1, dtype=torch.int32, device=dev)  # [N, L]
    inv.scatter_(1, ids_keep, torch.arange(K, dtype=torch.int32, device=dev).expand(N, K))
    bd = block_d(D)
    bn = max(1, min(triton.next_power_of_2(max(N, 1)), 16, 4096 // bd))  # rows summed per program
    nblocks = triton.cdiv(N, bn)
    grad_x = empty((N, L, D) if need_x else (0,), x_dtype, dev)  # [N, L, D]
    part = empty((nblocks, L, D) if need_pos else (0,), torch.float32, dev)  # [NB, L, D] fp32
    if N * L * D and (need_x or need_pos):
        grid = (nblocks, L, triton.cdiv(D, bd))
        launch(_gather_bwd_kernel, grid,
               grad_out, inv, grad_x if need_x else grad_out, part if need_pos else grad_out,
               N, K, L, D, STORE_X=need_x, HAS_POS=need_pos, BLOCK_N=bn, BLOCK_D=bd)
    if need_pos:
        # Deterministic two-stage reduction over the batch (no atomics). Round through the
        # output's dtype first, as autograd of the reference's `x + pos_embed` does.
        grad_pos = part.sum(0, keepdim=True).to(grad_out.dtype).to(pos_dtype)  # [1, L, D]
    else:
        grad_pos = empty((0,), pos_dtype, dev)
    return grad_x, grad_pos


def unshuffle_fwd_launch(x_vis: torch.Tensor, mask_token: torch.Tensor,
                         ids_restore: torch.Tensor) -> torch.Tensor:
    """Triton forward of unshuffle_with_mask_token: [N, K, D], [D], [N, L] -> [N, L, D]."""
    op = "unshuffle_with_mask_token"
    if x_vis.dim() != 3:
        raise ValueError(f"{op}: x_vis must be [N, K, D], got shape {tuple(x_vis.shape)}")
    N, K, D = x_vis.shape
    check_float(op, "x_vis", x_vis)
    check_float(op, "mask_token", mask_token)
    if mask_token.dim() != 1 or mask_token.shape[0] != D:
        raise ValueError(f"{op}: mask_token must hold D={D} values ([D] or [1, 1, D]), "
                         f"got shape {tuple(mask_token.shape)}")
    if ids_restore.dim() == 2 and ids_restore.shape[1] < K:
        raise ValueError(f"{op}: ids_restore covers L={ids_restore.shape[1]} tokens, fewer than "
                         f"the K={K} visible ones")
    _check_ids(op, "ids_restore", ids_restore, N, ids_restore.shape[-1], permutation=True)
    L = ids_restore.shape[1]
    check_layout(op, {"x_vis": x_vis, "mask_token": mask_token, "ids_restore": ids_restore},
                 strided=("x_vis", "ids_restore"))
    out = empty((N, L, D), x_vis.dtype, x_vis.device)  # [N, L, D]
    if out.numel() == 0:
        return out
    bd = block_d(D)
    bl = _rows_tile(L, bd)
    grid = (N, triton.cdiv(L, bl), triton.cdiv(D, bd))
    launch(_unshuffle_fwd_kernel, grid, x_vis, mask_token, ids_restore, out, K, L, D,
           x_vis.stride(0), x_vis.stride(1), ids_restore.stride(0), ids_restore.stride(1),
           BLOCK_L=bl, BLOCK_D=bd)
    return out


def unshuffle_bwd_launch(grad_out: torch.Tensor, ids_restore: torch.Tensor, K: int,
                         tok_dtype: torch.dtype, need_x: bool,
                         need_tok: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward of unshuffle_with_mask_token: grad [N, L, D] -> (grad_x_vis [N, K, D],
    grad_mask_token [D]). A gradient that is not needed comes back as an empty tensor."""
    op = "unshuffle_with_mask_token backward"
    if grad_out.dim() != 3:
        raise ValueError(f"{op}: grad must be [N, L, D], got shape {tuple(grad_out.shape)}")
    N, L, D = grad_out.shape
    check_float(op, "grad", grad_out)
    _check_ids(op, "ids_restore", ids_restore, N, L, permutation=True)
    if ids_restore.shape[1] != L:
        raise ValueError(f"{op}: ids_restore must be [N, L={L}], got {tuple(ids_restore.shape)}")
    check_layout(op, {"grad": grad_out, "ids_restore": ids_restore}, strided=("ids_restore",))
    dev = grad_out.device
    bd = block_d(D)
    bl = _rows_tile(L, bd)
    lblocks = triton.cdiv(L, bl)
    grad_x = empty((N, K, D) if need_x else (0,), grad_out.dtype, dev)  # [N, K, D]
    part = empty((N * lblocks, D) if need_tok else (0,), torch.float32, dev)  # [N*LB, D] fp32
    if N * L * D and (need_x or need_tok):
        grid = (N, lblocks, triton.cdiv(D, bd))
        launch(_unshuffle_bwd_kernel, grid,
               grad_out, ids_restore, grad_x if need_x else grad_out, part if need_tok else grad_out,
               K, L, D, ids_restore.stride(0), ids_restore.stride(1),
               STORE_X=need_x, HAS_TOK=need_tok, BLOCK_L=bl, BLOCK_D=bd)
    if need_tok:
        # Round through x_vis's dtype, as autograd of the reference's `.to(x_vis.dtype)` does.
        grad_tok = part.sum(0).to(grad_out.dtype).to(tok_dtype)  # [D]
    else:
        grad_tok = empty((0,), tok_dtype, dev)
    return grad_x, grad_tok


# Custom ops: torch.compile keeps them in its graph (no graph break); see kernels.register_op.
if HAS_TRITON:
    register_op("masked_gather_fwd", masked_gather_fwd_launch)
    register_op("masked_gather_bwd", masked_gather_bwd_launch)
    register_op("unshuffle_fwd", unshuffle_fwd_launch)
    register_op("unshuffle_bwd", unshuffle_bwd_launch)


class MaskedGatherFn(torch.autograd.Function):
    """masked_gather on the Triton kernels; backward to x and pos_embed."""

    @staticmethod
    def forward(ctx, x, ids_keep, pos_embed):
        ctx.save_for_backward(ids_keep)
        ctx.L = x.shape[1]
        ctx.x_dtype = x.dtype
        ctx.has_pos = pos_embed is not None
        ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else x.dtype
        return torch.ops.fasttrain.masked_gather_fwd(x, ids_keep, pos_embed)  # [N, K, D]

    @staticmethod
    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        need_x, _, need_pos = ctx.needs_input_grad
        need_pos = bool(need_pos and ctx.has_pos)
        if not (need_x or need_pos):
            return None, None, None
        grad_x, grad_pos = torch.ops.fasttrain.masked_gather_bwd(
            grad_out.contiguous(), ids_keep, ctx.L, ctx.x_dtype, ctx.pos_dtype, need_x, need_pos)
        return (grad_x if need_x else None), None, (grad_pos if need_pos else None)


class UnshuffleWithMaskTokenFn(torch.autograd.Function):
    """unshuffle_with_mask_token on the Triton kernels; backward to x_vis and mask_token [D]."""

    @staticmethod
    def forward(ctx, x_vis, mask_token, ids_restore):
        ctx.save_for_backward(ids_restore)
        ctx.K = x_vis.shape[1]
        ctx.tok_dtype = mask_token.dtype
        return torch.ops.fasttrain.unshuffle_fwd(x_vis, mask_token, ids_restore)  # [N, L, D]

    @staticmethod
    def backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        need_x, need_tok, _ = ctx.needs_input_grad
        if not (need_x or need_tok):
            return None, None, None
        grad_x, grad_tok = torch.ops.fasttrain.unshuffle_bwd(
            grad_out.contiguous(), ids_restore, ctx.K, ctx.tok_dtype, need_x, need_tok)
        return (grad_x if need_x else None), (grad_tok if need_tok else None), None


# ----------------------------------------------------------------------------------------------
# Entry points (the model calls only these)
# ----------------------------------------------------------------------------------------------

def masked_gather(x: torch.Tensor, ids_keep: torch.Tensor,
                  pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, L, D], ids_keep [N, K] int64, pos_embed [1, L, D] | None -> [N, K, D].

    Same result and gradients as masked_gather_reference; Triton when kernels.use_triton says so.
    Strided inputs (slices) are read in place; only a non-dense last dim costs a copy.
    """
    tensors = (x, ids_keep) if pos_embed is None else (x, ids_keep, pos_embed)
    if not use_triton("masked_gather", _gather_fwd_kernel, *tensors):
        return masked_gather_reference(x, ids_keep, pos_embed)
    return MaskedGatherFn.apply(dense_last(x), ids_keep,
                                None if pos_embed is None else dense_last(pos_embed))


def unshuffle_with_mask_token(x_vis: torch.Tensor, mask_token: torch.Tensor,
                              ids_restore: torch.Tensor) -> torch.Tensor:
    """x_vis [N, K, D], mask_token [D] or [1, 1, D], ids_restore [N, L] int64 -> [N, L, D].

    Same result and gradients as unshuffle_with_mask_token_reference (ids_restore must be a
    permutation of 0..L-1 per row, as MAE's argsort gives); Triton when kernels.use_triton says so.
    """
    if not use_triton("unshuffle_with_mask_token", _unshuffle_fwd_kernel, x_vis, mask_token,
                      ids_restore):
        return unshuffle_with_mask_token_reference(x_vis, mask_token, ids_restore)
    # [1, 1, D] parameter -> [D] view; autograd of the reshape returns the grad in its shape.
    tok = mask_token.reshape(-1) if mask_token.dim() != 1 else mask_token
    return UnshuffleWithMaskTokenFn.apply(dense_last(x_vis), tok.contiguous(), ids_restore)
