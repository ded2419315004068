"""Banded crop + resize of uint8 batches on the CPU, as Pillow resamples: a compiled twin of
`BatchAugment.resample_u8`'s two dense batched matmuls.

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
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch


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
                t[r, j] = min(max(math.floor(tt[j, r] + np.float32(0.5)), 0.0), 255.0)
        for i in range(h):
            _vertical_row(t, b, i, y0, wy, r0, acc)
            for j in range(w):
                out[b, i, j] = np.uint8(min(max(math.floor(acc[j] + np.float32(0.5)), 0.0), 255.0))


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
    n = max(1, min(b, threads or torch.get_num_threads()))
    cuts = np.linspace(0, b, n + 1).astype(int)
    if n == 1:
        kernel(*args, 0, b)
    else:
        jobs = [_pool(n).submit(kernel, *args, int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:])]
        for j in jobs:
            j.result()
    return torch.from_numpy(out)
