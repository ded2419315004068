"""Compiled CPU twins of the fine-tuning transform's pixel loops: the banded crop + resize
(`BatchAugment.resample_u8`'s two dense batched matmuls), RandAugment's affine warps
(`randaug.warp_affine` / `warp_rows`) and the normalisation table (`BatchAugment.normalise_u8`).
Each computes what its torch twin computes (the path CUDA runs, and the tests' reference), with
only the work one output pixel needs instead of whole-tensor passes.

Pillow's resampling filter touches K consecutive input pixels per output pixel (bicubic: 4-6,
bilinear: 2-3, widened by the downscale factor), so each pass is K multiply-adds per output pixel:
for a 256-px image cropped to 224 px about 50x fewer than a dense [224, 256] x [256, 224] matmul
per pass. Same order and rounding as Pillow's Resample.c and the dense path: the horizontal pass
first, rounded half up and clipped to uint8, then the vertical pass, rounded and clipped again.
Only the rows the vertical taps read are resampled horizontally (a small crop reads few rows).

Compiled with numba (a dependency of fasttrain; FFCV's pipelines are numba too), without the GIL,
and run on a few threads over slices of the batch: no numba threading layer is involved, so it is
safe from any thread (the loaders' prefetch threads included). The dense matmuls stay the path on
CUDA and the plain twin the tests compare against.

The warps: Rotate's 4 x 4 taps per pixel read a padded float copy of the sample (no edge clamps,
no per-tap gathers through index tensors), the row / column moves 4 taps along each line with
its one set of weights; both give their twin's bytes (same float32 operations in the same order;
the row warp's fused multiply-adds are what torch's addcmul runs on AVX2 / AVX-512). The table:
one copy per output value from the 256-entry table, straight into the output's dtype.
"""
from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@numba.njit(nogil=True, cache=True)
def _horizontal_pass(x, b, x0, wx, y0, ky):  # pragma: no cover - compiled
    """Sample b's horizontal pass over the rows its vertical taps read, [r0, r0 + n): returns
    (r0, tt float32 [w, n]), transposed so that both passes run as multiply-adds over contiguous
    rows (vectorised): the sample is transposed first (a column of the image is then a row)."""
    kx, w = wx.shape[1], wx.shape[2]
    h, width = y0.shape[1], x.shape[2]
    r0 = y0[b, 0]  # rows the vertical taps read: [r0, r1)
    r1 = y0[b, 0] + ky
    for i in range(h):
        r0 = min(r0, y0[b, i])
        r1 = max(r1, y0[b, i] + ky)
    n = r1 - r0
    xt = np.empty((width, n), np.float32)  # [W, rows] the sample's rows, transposed
    for r in range(n):
        for c in range(width):
            xt[c, r] = x[b, r0 + r, c]
    tt = np.zeros((w, n), np.float32)  # [w, rows] horizontal pass, transposed
    for j in range(w):
        for k in range(kx):
            wk = wx[b, k, j]
            if wk != 0.0:
                src = xt[x0[b, j] + k]
                dst = tt[j]
                for r in range(n):
                    dst[r] += src[r] * wk
    return r0, tt


@numba.njit(nogil=True, cache=True)
def _vertical_row(t, b, i, y0, wy, r0, acc):  # pragma: no cover - compiled
    """Output row i of sample b: acc [w] = sum over the vertical taps of t's rows (t [rows, w])."""
    acc[:] = 0.0
    for k in range(wy.shape[2]):
        wk = wy[b, i, k]
        if wk != 0.0:
            row = t[y0[b, i] + k - r0]
            for j in range(acc.shape[0]):
                acc[j] += row[j] * wk


@numba.njit(nogil=True, cache=True, inline="always")
def _round_clip(v):  # pragma: no cover - compiled
    """Pillow's rounding to uint8, as a float32: floor(v + 0.5) clipped to [0, 255], all in
    float32 (exact: the results are small integers), so the loops over a row vectorise."""
    return min(max(np.floor(v + np.float32(0.5)), np.float32(0.0)), np.float32(255.0))


@numba.njit(nogil=True, cache=True)
def _resample_slice(x, x0, wx, y0, wy, out, lo, hi):  # pragma: no cover - compiled
    """Samples [lo, hi): x uint8 [B, H, W]; x0 int64 [B, w] first horizontal tap, wx float32
    [B, Kx, w] (tap-major); y0 int64 [B, h], wy float32 [B, h, Ky]; out uint8 [B, h, w].
    Pillow's rounding: the intermediate image and the output are rounded to uint8."""
    w, h, ky = wx.shape[2], wy.shape[1], wy.shape[2]
    acc = np.empty(w, np.float32)
    for b in range(lo, hi):
        r0, tt = _horizontal_pass(x, b, x0, wx, y0, ky)
        n = tt.shape[1]
        t = np.empty((n, w), np.float32)  # [rows, w] Pillow's intermediate uint8 image, as floats
        for j in range(w):
            for r in range(n):
                t[r, j] = _round_clip(tt[j, r])
        for i in range(h):
            _vertical_row(t, b, i, y0, wy, r0, acc)
            o = out[b, i]
            for j in range(w):
                o[j] = np.uint8(np.int32(_round_clip(acc[j])))


@numba.njit(nogil=True, cache=True)
def _resample_slice_float(x, x0, wx, y0, wy, gains, biases, out, lo, hi):  # pragma: no cover - compiled
    """The float twin of _resample_slice (no rounding between or after the passes), normalised:
    out float32 [B, h, w, C] channels-last = (vertical(horizontal(x)) * gains[c] + biases[c])."""
    w, h, ky = wx.shape[2], wy.shape[1], wy.shape[2]
    nc = gains.shape[0]
    acc = np.empty(w, np.float32)
    for b in range(lo, hi):
        r0, tt = _horizontal_pass(x, b, x0, wx, y0, ky)
        t = np.ascontiguousarray(tt.T)  # [rows, w]
        for i in range(h):
            _vertical_row(t, b, i, y0, wy, r0, acc)
            for j in range(w):
                for c in range(nc):
                    out[b, i, j, c] = acc[j] * gains[c] + biases[c]


_POOLS: dict[int, ThreadPoolExecutor] = {}  # one pool per thread count, made on first use


def _pool(n: int) -> ThreadPoolExecutor:
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fasttrain-resample")
    return _POOLS[n]


def _np(a, dtype) -> np.ndarray:
    a = a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a, dtype=dtype)


def resample_band_u8(x: torch.Tensor, band_y: tuple, band_x: tuple, threads: int | None = None) -> torch.Tensor:
    """uint8 [B, H, W] (CPU) -> uint8 [B, h, w]: crop + resize with pil_band's taps, band_y =
    (y0 [B, h], wy [B, h, Ky]) and band_x = (x0 [B, w], wx [B, w, Kx]) (numpy or torch), over
    `threads` slices of the batch (default: torch's intra-op thread count)."""
    return _run(x, band_y, band_x, threads, None)


def resample_band_float(x: torch.Tensor, band_y: tuple, band_x: tuple, gains, biases,
                        threads: int | None = None) -> torch.Tensor:
    """uint8 [B, H, W] (CPU) -> float32 [B, h, w, C] channels-last: the same crop + resize without
    rounding, then per channel c: value * gains[c] + biases[c] (the normalisation; C = len(gains))."""
    return _run(x, band_y, band_x, threads, (np.asarray(gains, np.float32), np.asarray(biases, np.float32)))


def _run(x: torch.Tensor, band_y: tuple, band_x: tuple, threads: int | None, norm) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype != torch.uint8 or x.dim() != 3:
        raise ValueError(f"the banded resampler takes a CPU uint8 [B, H, W] batch, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    y0, wy = _np(band_y[0], np.int64), _np(band_y[1], np.float32)  # [B, h], [B, h, Ky]
    x0, wx = _np(band_x[0], np.int64), _np(band_x[1], np.float32)  # [B, w], [B, w, Kx]
    b, hh, ww = x.shape
    if y0.shape[0] != b or x0.shape[0] != b:
        raise ValueError(f"taps for {y0.shape[0]} / {x0.shape[0]} samples, batch of {b}")
    if y0.min(initial=0) < 0 or (y0.max(initial=0) + wy.shape[2] > hh) or x0.min(initial=0) < 0 \
            or (x0.max(initial=0) + wx.shape[2] > ww):
        raise ValueError("resample_band_u8: taps outside the image")
    wxt = np.ascontiguousarray(wx.transpose(0, 2, 1))  # [B, Kx, w]
    xn = np.ascontiguousarray(x.numpy())
    if norm is None:
        out = np.empty((b, y0.shape[1], x0.shape[1]), np.uint8)
        args = (xn, x0, wxt, y0, wy, out)
        kernel = _resample_slice
    else:
        out = np.empty((b, y0.shape[1], x0.shape[1], len(norm[0])), np.float32)
        args = (xn, x0, wxt, y0, wy, norm[0], norm[1], out)
        kernel = _resample_slice_float
    _over_slices(kernel, args, b, threads)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- RandAugment's warps

@intrinsic
def _fma32(typingctx, a, b, c):
    """a * b + c in float32 with one rounding (LLVM's fma): what torch's vectorised addcmul computes
    on AVX2 / AVX-512 CPUs, so the row warps equal their twin bit for bit."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
        return builder.call(fn, args)
    return sig, codegen


@numba.njit(nogil=True, cache=True, inline="always")
def _pillow_taps(d, bicubic, out):  # pragma: no cover - compiled
    """Pillow Geometry.c tap weights at offsets -1, 0, 1, 2 for the float32 fraction d, in the
    float32 operations and order of randaug._cubic_weights (a = -1) or bilinear (0, 1 - d, d, 0)."""
    one, two, zero = np.float32(1.0), np.float32(2.0), np.float32(0.0)
    if bicubic:
        d2 = d * d
        d3 = d2 * d
        out[0] = (-d + two * d2) - d3
        out[1] = (one - two * d2) + d3
        out[2] = (d + d2) - d3
        out[3] = -d2 + d3
    else:
        out[0] = zero
        out[1] = one - d
        out[2] = d
        out[3] = zero


@numba.njit(nogil=True, cache=True, inline="always")
def _to_u8(v):  # pragma: no cover - compiled
    """Clip to [0, 255] and truncate toward zero, as Pillow's (UINT8) cast after its filters."""
    return np.uint8(np.int32(min(max(v, np.float32(0.0)), np.float32(255.0))))


@numba.njit(nogil=True, cache=True)
def _padded(x, b, ch, columns, pad):  # pragma: no cover - compiled
    """pad float32 [lines, length + 4] = x[b, ch] (columns: transposed) with its edge pixels
    repeated twice at both ends of every line: Pillow's edge clamp for taps at most 2 px out,
    as far as any tap of a pixel whose input point lies inside the image reaches."""
    lines, length = pad.shape[0], pad.shape[1] - 4
    for r in range(lines):
        for q in range(length):
            pad[r, q + 2] = x[b, ch, q, r] if columns else x[b, ch, r, q]
        pad[r, 0] = pad[r, 1] = pad[r, 2]
        pad[r, length + 2] = pad[r, length + 3] = pad[r, length + 1]


@numba.njit(nogil=True, cache=True)
def _pillow_taps_row(d, bicubic, out):  # pragma: no cover - compiled
    """_pillow_taps for a row of fractions d [w] float32 -> out [4, w], one branch-free loop."""
    one, two = np.float32(1.0), np.float32(2.0)
    if bicubic:
        for j in range(d.shape[0]):
            dj = d[j]
            d2 = dj * dj
            d3 = d2 * dj
            out[0, j] = (-dj + two * d2) - d3
            out[1, j] = (one - two * d2) + d3
            out[2, j] = (dj + d2) - d3
            out[3, j] = -d2 + d3
    else:
        for j in range(d.shape[0]):
            out[0, j] = np.float32(0.0)
            out[1, j] = one - d[j]
            out[2, j] = d[j]
            out[3, j] = np.float32(0.0)


@numba.njit(nogil=True, cache=True)
def _taps_4x4(flat, first, wp, wx, wy, vals):  # pragma: no cover - compiled
    """vals[j] = sum over tap rows ti of wy[ti, j] x (sum over tj of wx[tj, j] x the padded
    image at first[j] + ti * wp + tj), in float32, rows and taps in order (fixed trip counts:
    unrolled, the loop over j vectorised with gathers)."""
    for j in range(vals.shape[0]):
        f0 = first[j]
        acc = np.float32(0.0)
        for ti in range(4):
            r = f0 + ti * wp
            row = np.float32(0.0)
            for tj in range(4):
                row += wx[tj, j] * flat[r + tj]
            acc += wy[ti, j] * row
        vals[j] = acc


@numba.njit(nogil=True, cache=True)
def _taps_2x2(flat, first, wp, wx, wy, vals):  # pragma: no cover - compiled
    """_taps_4x4 over the taps at offsets 0 and 1 only (bilinear: the others weigh 0)."""
    for j in range(vals.shape[0]):
        f0 = first[j]
        acc = np.float32(0.0)
        for ti in range(1, 3):
            r = f0 + ti * wp
            row = np.float32(0.0)
            for tj in range(1, 3):
                row += wx[tj, j] * flat[r + tj]
            acc += wy[ti, j] * row
        vals[j] = acc


@numba.njit(nogil=True, cache=True)
def _warp_affine_slice(x, coeffs, fill, bicubic, out, lo, hi):  # pragma: no cover - compiled
    """Samples [lo, hi) of randaug.warp_affine: x uint8 [n, C, H, W], coeffs float64 [n, 6]
    (Pillow's affine data: output pixel centre -> input point), fill uint8 [Cf], bicubic bool [n],
    out uint8 [n, Cf, H, W] (C = 1: the gray result on every channel inside the image).
    Per pixel: the input point in float64, the fraction in float32, 4 x 4 (bicubic) or the 2 x 2
    taps whose bilinear weights are not 0, each tap row summed, then the rows weighted: the
    twin's float32 products and sums in the twin's order (its other taps add exact zeros).
    An output row at a time, in branch-free loops over its pixels (coordinates, weights, taps:
    the compiler vectorises them), pixels outside the image filled at the end."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    nf = out.shape[1]
    wp = w + 4
    rows = np.empty((h + 4, wp), np.float32)  # [H+4, W+4] the channel, padded
    flat = rows.reshape(-1)
    inside = np.empty(w, np.bool_)
    first = np.empty(w, np.int64)  # flat padded index of each pixel's tap at offsets (-1, -1)
    dx = np.empty(w, np.float32)
    dy = np.empty(w, np.float32)
    wx = np.empty((4, w), np.float32)
    wy = np.empty((4, w), np.float32)
    vals = np.empty(w, np.float32)
    for b in range(lo, hi):
        ca, cb, cc, cd, ce, cf = coeffs[b, 0], coeffs[b, 1], coeffs[b, 2], coeffs[b, 3], coeffs[b, 4], coeffs[b, 5]
        cub = bicubic[b]
        for ch in range(c):
            _padded(x, b, ch, False, rows[2:h + 2])
            rows[0] = rows[1] = rows[2]
            rows[h + 2] = rows[h + 3] = rows[h + 1]
            for i in range(h):
                ys = i + 0.5
                for j in range(w):
                    xs = j + 0.5
                    xin = ca * xs + cb * ys + cc
                    yin = cd * xs + ce * ys + cf
                    ins = (xin >= 0.0) & (xin < w) & (yin >= 0.0) & (yin < h)
                    inside[j] = ins
                    fx = math.floor(xin - 0.5)
                    fy = math.floor(yin - 0.5)
                    dx[j] = np.float32((xin - 0.5) - fx)
                    dy[j] = np.float32((yin - 0.5) - fy)
                    first[j] = (int(fy) + 1) * wp + int(fx) + 1 if ins else 0
                _pillow_taps_row(dx, cub, wx)
                _pillow_taps_row(dy, cub, wy)
                if cub:
                    _taps_4x4(flat, first, wp, wx, wy, vals)
                else:
                    _taps_2x2(flat, first, wp, wx, wy, vals)
                for k in range(nf):
                    if c == nf and k != ch:
                        continue
                    fk = fill[k]
                    o = out[b, k, i]
                    for j in range(w):
                        o[j] = _to_u8(vals[j]) if inside[j] else fk


@numba.njit(nogil=True, cache=True)
def _warp_rows_slice(x, shift, fill, bicubic, columns, out, lo, hi):  # pragma: no cover - compiled
    """Samples [lo, hi) of randaug.warp_rows: pixels move along rows by shift [n, H] (columns:
    along columns by shift [n, W], the twin on the transposed image), x uint8 [n, C, H, W], out
    uint8 [n, Cf, H, W]. One fraction per line, so 4 taps along it with per-line weights, as
    fused multiply-adds in the twin's order (its addcmul; bilinear's outer weights add zeros);
    the inside pixels of a line are one run, the taps there read contiguous memory."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    nf = out.shape[1]
    lines = shift.shape[1]
    length = h if columns else w  # the axis pixels move along
    ws = np.empty(4, np.float32)
    pad = np.empty((lines, length + 4), np.float32)
    line = np.empty(length, np.uint8)
    zero = np.float32(0.0)
    for b in range(lo, hi):
        for ch in range(c):
            _padded(x, b, ch, columns, pad)
            for r in range(lines):
                s = shift[b, r]
                fl = math.floor(s)
                _pillow_taps(np.float32(s - fl), bicubic[b], ws)
                w0, w1, w2, w3 = ws[0], ws[1], ws[2], ws[3]
                base = int(fl) + 1  # padded index of the tap at offset -1, less the pixel's
                # the inside run [p0, p1): input point (p + 0.5) + s in [0, length), monotone in p:
                # the closed-form ends, then moved to where the twin's float64 test flips
                p0 = min(max(math.ceil(-s - 0.5), 0), length)
                while p0 > 0 and (p0 - 0.5) + s >= 0.0:
                    p0 -= 1
                while p0 < length and not ((p0 + 0.5) + s >= 0.0):
                    p0 += 1
                p1 = min(max(math.ceil(length - s - 0.5), p0), length)
                while p1 > p0 and not ((p1 - 0.5) + s < length):
                    p1 -= 1
                while p1 < length and (p1 + 0.5) + s < length:
                    p1 += 1
                src = pad[r]
                for p in range(p0, p1):
                    q = p + base
                    acc = _fma32(src[q], w0, zero)
                    acc = _fma32(src[q + 1], w1, acc)
                    acc = _fma32(src[q + 2], w2, acc)
                    acc = _fma32(src[q + 3], w3, acc)
                    line[p] = _to_u8(acc)
                for k in range(nf):
                    if c == nf and k != ch:
                        continue
                    fk = fill[k]
                    if columns:
                        for p in range(length):
                            out[b, k, p, r] = line[p] if p0 <= p < p1 else fk
                    else:
                        for p in range(length):
                            out[b, k, r, p] = line[p] if p0 <= p < p1 else fk


def _u8_batch(x: torch.Tensor, what: str) -> np.ndarray:
    """The uint8 [n, C, H, W] CPU batch every compiled RandAugment op takes, as a C-contiguous array."""
    if x.device.type != "cpu" or x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"{what} takes a CPU uint8 [n, C, H, W] batch, got {x.dtype} {tuple(x.shape)} on {x.device}")
    return np.ascontiguousarray(x.numpy())


def _check_warp(x: torch.Tensor, fill: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xn = _u8_batch(x, "a compiled warp")
    f = _np(fill, np.uint8).reshape(-1)  # [Cf]
    if x.shape[1] not in (1, len(f)):
        raise ValueError(f"fill of {len(f)} channels for a {x.shape[1]}-channel batch")
    out = np.empty((x.shape[0], len(f)) + tuple(x.shape[2:]), np.uint8)  # [n, Cf, H, W]
    return xn, f, out


def warp_affine_u8(x: torch.Tensor, coeffs, fill, bicubic, threads: int | None = None) -> torch.Tensor:
    """randaug.warp_affine compiled for the CPU, equal to it bit for bit: x uint8 [n, C, H, W],
    coeffs [n, 6] float64, fill [Cf] uint8, bicubic [n] bool -> uint8 [n, Cf, H, W]."""
    xn, f, out = _check_warp(x, fill)
    cf, bic = _np(coeffs, np.float64), _np(bicubic, np.bool_)
    if cf.shape != (x.shape[0], 6) or bic.shape != (x.shape[0],):
        raise ValueError(f"affine coefficients {cf.shape} / filters {bic.shape} for a batch of {x.shape[0]}")
    _over_slices(_warp_affine_slice, (xn, cf, f, bic, out), x.shape[0], threads)
    return torch.from_numpy(out)


def warp_rows_u8(x: torch.Tensor, shift, fill, bicubic, columns: bool = False,
                 threads: int | None = None) -> torch.Tensor:
    """randaug.warp_rows compiled for the CPU, equal to it bit for bit: x uint8 [n, C, H, W],
    shift [n, H] float64 (columns=True: [n, W], pixels move along columns, what the twin does on
    the transposed image), fill [Cf] uint8, bicubic [n] bool -> uint8 [n, Cf, H, W]."""
    xn, f, out = _check_warp(x, fill)
    sh, bic = _np(shift, np.float64), _np(bicubic, np.bool_)
    if sh.shape != (x.shape[0], x.shape[3 if columns else 2]) or bic.shape != (x.shape[0],):
        raise ValueError(f"shifts {sh.shape} / filters {bic.shape} for a batch of shape {tuple(x.shape)} "
                         f"({'columns' if columns else 'rows'})")
    _over_slices(_warp_rows_slice, (xn, sh, f, bic, bool(columns), out), x.shape[0], threads)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- the normalisation table

@numba.njit(nogil=True, cache=True)
def _table_slice(gray, colour, col, lut, out, lo, hi):  # pragma: no cover - compiled
    """Samples [lo, hi): out [B, h*w, C] = lut[pixel, c], from gray [B, h*w] (every channel) or,
    where colour[b], from col [B, C, h*w] channel by channel. lut [256, C] holds the output
    dtype's bits (int16 for bf16 / fp16, int32 for fp32): a copy, no arithmetic. Flat pixel
    loops, one table vector per channel for 1 and 3 channels: plain loads and stores."""
    nc, hw = lut.shape[1], gray.shape[1]
    lut0 = np.ascontiguousarray(lut[:, 0])
    lut1 = np.ascontiguousarray(lut[:, min(1, nc - 1)])
    lut2 = np.ascontiguousarray(lut[:, min(2, nc - 1)])
    for b in range(lo, hi):
        o = out[b]  # [h*w, C]
        if colour[b]:
            for c in range(nc):
                src = col[b, c]
                for k in range(hw):
                    o[k, c] = lut[src[k], c]
        elif nc == 1:
            src = gray[b]
            o1 = o[:, 0]
            for k in range(hw):
                o1[k] = lut0[src[k]]
        elif nc == 3:
            src = gray[b]
            for k in range(hw):
                v = src[k]
                o[k, 0] = lut0[v]
                o[k, 1] = lut1[v]
                o[k, 2] = lut2[v]
        else:
            src = gray[b]
            for k in range(hw):
                v = src[k]
                for c in range(nc):
                    o[k, c] = lut[v, c]


_BITS = {2: torch.int16, 4: torch.int32}  # element size -> the integer type that holds its bits


class OutputBuffers:
    """Output batches as tensors over numpy buffers, each buffer reused once no tensor uses it:
    torch.from_numpy's storage holds a reference to its array for as long as any tensor or view
    over it lives, so an array only this pool references is free to overwrite. Without it a big
    output (3 channels of bf16 at 224 px: 38.5 MB, over glibc's largest mmap threshold) is mapped
    anew every batch and the kernel faults and zeroes its pages (33-36 ms for 38.5 MB measured,
    2.1-2.5 ms on reused pages). At most `keep` buffers are remembered."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._arrays: list[np.ndarray] = []
        self._free = self._references_when_free()

    @staticmethod
    def _references_when_free() -> int:
        """sys.getrefcount of an array only a list refers to, read as `take` reads it (the count
        differs between Python versions); a live tensor's storage adds one."""
        for a in [np.empty(0)]:
            return sys.getrefcount(a)

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A free array of this shape and dtype, else a new one (remembered, the oldest forgotten)."""
        for a in self._arrays:
            if a.shape == shape and a.dtype == dtype and sys.getrefcount(a) == self._free:
                return a
        a = np.empty(shape, dtype)
        self._arrays = (self._arrays + [a])[-self.keep:]
        return a


def normalise_table(gray: torch.Tensor, lut: torch.Tensor, colour=None, col: torch.Tensor | None = None,
                    threads: int | None = None, buffers: OutputBuffers | None = None) -> torch.Tensor:
    """uint8 gray [B, h, w] (and, where colour [B] bool, col [B, C, h, w] uint8) -> lut's dtype
    [B, h, w, C] channels-last, out[b, i, j, c] = lut[pixel, c]: the compiled twin of
    BatchAugment.normalise_u8 / normalise_mixed on the CPU (lut [256, C], any 2- or 4-byte dtype),
    written into a free buffer of `buffers` when given."""
    if gray.device.type != "cpu" or gray.dtype != torch.uint8 or gray.dim() != 3:
        raise ValueError(f"normalise_table takes a CPU uint8 [B, h, w] batch, got {gray.dtype} "
                         f"{tuple(gray.shape)} on {gray.device}")
    if lut.dim() != 2 or lut.shape[0] != 256 or lut.element_size() not in _BITS:
        raise ValueError(f"normalise_table needs a [256, C] table of a 2- or 4-byte dtype, got {lut.dtype} "
                         f"{tuple(lut.shape)}")
    b, h, w = gray.shape
    nc = lut.shape[1]
    bits = _BITS[lut.element_size()]
    lut_n = np.ascontiguousarray(lut.cpu().view(bits).numpy())  # [256, C]
    if colour is None:
        mask, col_n = np.zeros(b, np.bool_), np.zeros((1, nc, 1, 1), np.uint8)
    else:
        mask = _np(colour, np.bool_)
        if col is None or tuple(col.shape) != (b, nc, h, w) or col.dtype != torch.uint8 or mask.shape != (b,):
            raise ValueError(f"colour samples need col uint8 [{b}, {nc}, {h}, {w}] and a mask [{b}], got "
                             f"{None if col is None else (col.dtype, tuple(col.shape))} and {mask.shape}")
        col_n = np.ascontiguousarray(col.numpy())
    if buffers is None:
        out = torch.empty((b, h, w, nc), dtype=lut.dtype)
    else:
        out = torch.from_numpy(buffers.take((b, h, w, nc), lut_n.dtype)).view(lut.dtype)
    _over_slices(_table_slice, (np.ascontiguousarray(gray.numpy()).reshape(b, h * w), mask,
                                col_n.reshape(col_n.shape[0], nc, -1), lut_n,
                                out.view(bits).numpy().reshape(b, h * w, nc)), b, threads)
    return out


MIN_SAMPLES_PER_THREAD = 16  # smaller slices run on the calling thread (see _over_slices)


def _over_slices(kernel, args: tuple, b: int, threads: int | None) -> None:
    """kernel(*args, lo, hi) over `threads` slices of the batch's b samples, in the pool's
    threads: the kernels release the GIL. By default torch's intra-op thread count, at most one
    per MIN_SAMPLES_PER_THREAD samples: RandAugment's per-op calls (~8 of 128 samples) stay on
    the calling thread, because on a busy machine the hand-off cost more than the work (a table
    lookup over 8 samples of 224 px: 0.14 ms on one thread, 0.21 ms split over two)."""
    n = min(b, threads) if threads else min(b // MIN_SAMPLES_PER_THREAD, torch.get_num_threads())
    n = max(1, n)
    if n == 1:
        kernel(*args, 0, b)
        return
    cuts = np.linspace(0, b, n + 1).astype(int)
    jobs = [_pool(n).submit(kernel, *args, int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:])]
    for j in jobs:
        j.result()


# ----------------------------------------------------------------------------- RandAugment's pixel ops

@numba.njit(nogil=True, cache=True)
def _lut_slice(x, lut, out, lo, hi):  # pragma: no cover - compiled
    """Samples [lo, hi): out[b, c, k] = lut[b, c, x[b, c, k]] (x, out uint8 [n, C, H*W])."""
    for b in range(lo, hi):
        for c in range(x.shape[1]):
            t = lut[b, c]
            src, dst = x[b, c], out[b, c]
            for k in range(src.shape[0]):
                dst[k] = t[src[k]]


@numba.njit(nogil=True, cache=True)
def _histogram_slice(x, out, lo, hi):  # pragma: no cover - compiled
    """Samples [lo, hi): out[b, c] int64 [256] = the histogram of x[b, c] (uint8 [n, C, H*W])."""
    for b in range(lo, hi):
        for c in range(x.shape[1]):
            h = out[b, c]
            h[:] = 0
            src = x[b, c]
            for k in range(src.shape[0]):
                h[src[k]] += 1


@numba.njit(nogil=True, cache=True)
def _sharpness_slice(x, factor, out, lo, hi):  # pragma: no cover - compiled
    """Samples [lo, hi) of randaug.sharpness: x blended with its SMOOTH image (outer rows and
    columns copied; inside (2 (3x3 box sum + 4 centre) + 13) // 26), d + f (x - d) in float32
    (a product, then a sum: no fused multiply-add), clipped and truncated to uint8."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    deg = np.empty(w, np.float32)
    for b in range(lo, hi):
        f = factor[b]
        for ch in range(c):
            img = x[b, ch]
            for i in range(h):
                src = img[i]
                if i == 0 or i == h - 1 or w < 3:
                    for j in range(w):
                        deg[j] = np.float32(src[j])
                else:
                    up, dn = img[i - 1], img[i + 1]
                    deg[0], deg[w - 1] = np.float32(src[0]), np.float32(src[w - 1])
                    for j in range(1, w - 1):
                        s = (np.int32(up[j - 1]) + up[j] + up[j + 1] + src[j - 1] + src[j + 1]
                             + dn[j - 1] + dn[j] + dn[j + 1] + 5 * np.int32(src[j]))
                        deg[j] = np.float32((2 * s + 13) // 26)
                o = out[b, ch, i]
                for j in range(w):
                    d = deg[j]
                    t = f * (np.float32(src[j]) - d)
                    o[j] = _to_u8(d + t)


def apply_lut_u8(x: torch.Tensor, lut: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x uint8 [n, C, H, W], lut uint8 [n, C, 256] -> lut[b, c, x[b, c]]: randaug's table ops
    (the twin of its torch.gather on int64 indices)."""
    xn = _u8_batch(x, "apply_lut_u8")
    n, c = x.shape[:2]
    if tuple(lut.shape) != (n, c, 256) or lut.dtype != torch.uint8:
        raise ValueError(f"apply_lut_u8 needs uint8 tables [{n}, {c}, 256], got {lut.dtype} {tuple(lut.shape)}")
    out = np.empty_like(xn)
    _over_slices(_lut_slice, (xn.reshape(n, c, -1), np.ascontiguousarray(lut.cpu().numpy()), out.reshape(n, c, -1)),
                 n, threads)
    return torch.from_numpy(out)


def histogram_u8(x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x uint8 [n, C, H, W] -> int64 [n, C, 256] per (sample, channel) histograms."""
    xn = _u8_batch(x, "histogram_u8")
    n, c = x.shape[:2]
    out = np.empty((n, c, 256), np.int64)
    _over_slices(_histogram_slice, (xn.reshape(n, c, -1), out), n, threads)
    return torch.from_numpy(out)


def sharpness_u8(x: torch.Tensor, factor, threads: int | None = None) -> torch.Tensor:
    """randaug.sharpness compiled (SMOOTH, then the blend), the same bytes: x uint8 [n, C, H, W],
    factor [n] -> uint8 [n, C, H, W]."""
    xn = _u8_batch(x, "sharpness_u8")
    f = _np(factor, np.float32).reshape(-1)
    if f.shape != (x.shape[0],):
        raise ValueError(f"{f.shape[0]} sharpness factors for a batch of {x.shape[0]}")
    out = np.empty_like(xn)
    _over_slices(_sharpness_slice, (xn, f, out), x.shape[0], threads)
    return torch.from_numpy(out)
