"""timm's RandAugment as batched tensor ops on uint8 images `[B, C, H, W]` (CPU or CUDA).

Semantics are timm's (`timm.data.auto_augment`, read from its source) and Pillow's (the library
timm's ops call), so a batch here gives what `create_transform(..., auto_augment='rand-m6-mstd0.5-inc1')`
gives image by image:
  - per sample and per layer: one op drawn uniformly from the set (with replacement, as
    `np.random.choice(ops, n)`), applied with probability p, magnitude ~ N(m, mstd) (uniform on
    [0, m] when mstd > 100) clipped to [0, mmax or 10], a random sign for the signed ops;
  - timm's level -> argument maps (`LEVEL_TO_ARG`), e.g. Rotate 30 deg x m / 10, enhance factors
    1 +- 0.9 m / 10, TranslateXRel 0.45 x size x m / 10;
  - Pillow's pixel rules: LUT ops (autocontrast, equalize, invert, posterize, solarize), blends
    `Image.blend` truncating to uint8, SMOOTH (3x3, /13, rounded, border rows/cols copied) for
    Sharpness, ITU-R 601 luma for Color/Contrast, affine warps sampled at pixel centres with
    edge-clamped bilinear or a = -1 bicubic taps (Pillow's Geometry.c), truncated to uint8,
    out-of-image pixels set to the fill colour.
Gray-native: a 1-channel image gives what timm gives on the gray image's RGB copy (every op acts
on the three equal channels alike, Color is the identity) provided the fill colour is gray.

Why hand-written: timm's ops are per-image PIL calls on the host (the CPU cost this project
removes); torchvision.transforms.v2's RandAugment and DALI's auto_aug.rand_augment use other policies.
DALI's (nvidia-dali 2.x, read from its source) does NOT match timm's: an integer magnitude on 31 bins
with no magnitude noise (no mstd), every drawn op applied (no per-op probability 0.5), an Identity op
in the set and no SolarizeAdd, posterize 8 -> 4 bits, one scalar fill value, translations of 100/224
of the size, and its own warp and enhance kernels. torchvision's RandAugment likewise has no mstd,
no per-op probability and nearest-neighbour warps by default. So all three loaders (DALI too, after
its decode) run this module.

Decision where timm and current Pillow disagree: PosterizeIncreasing at magnitude 10 asks for 0 bits
(`4 - int(10 / 10 * 4)`); Pillow >= 10 raises "bits must be between or equal to 1 and 8", older
Pillow (the one timm's policy was written against, and TF's posterize) kept 0 bits: a black image.
We keep 0 bits (all zeros), the original semantics, instead of an exception inside a data loader.
With rand-m6-mstd0.5 the clipped magnitude reaches 10 only 8 std above the mean (never in practice).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from .band_resample import apply_lut_u8, histogram_u8, sharpness_u8, warp_affine_u8, warp_rows_u8

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M maps to level M / 10
# timm's _HPARAMS_DEFAULT (create_transform overrides both: 0.45 x img_size and the mean in grey levels)
HPARAMS_DEFAULT = dict(translate_const=250, img_mean=(128, 128, 128))
INTERPOLATIONS = ("bilinear", "bicubic", "random")  # 'random': per call bilinear or bicubic (timm's default)

RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                   "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


class PolicyError(ValueError):
    """A RandAugment policy string timm would not accept (or a key we do not implement)."""


# ----------------------------------------------------------------------------- level -> argument

def _negate(v: np.ndarray, negate: np.ndarray) -> np.ndarray:
    return np.where(negate, -v, v)


def level_to_arg(name: str, magnitude: np.ndarray, negate: np.ndarray, hparams: dict) -> np.ndarray | None:
    """timm's LEVEL_TO_ARG[name] for a vector of magnitudes (float64 host arrays, [n]).

    Same arithmetic as timm's Python floats (float64), including int() truncation, so the integer
    arguments (posterize bits, solarize thresholds) land on the same side of every boundary."""
    m = np.asarray(magnitude, np.float64) / LEVEL_DENOM  # [n] level
    neg = np.asarray(negate, bool)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return _negate(m * 30.0, neg)  # degrees, [-30, 30]
    if name in ("ShearX", "ShearY"):
        return _negate(m * 0.3, neg)
    if name in ("TranslateX", "TranslateY"):
        return _negate(m * float(hparams["translate_const"]), neg)  # pixels
    if name in ("TranslateXRel", "TranslateYRel"):
        return _negate(m * float(hparams.get("translate_pct", 0.45)), neg)  # fraction of the size
    if name == "Posterize":
        return np.trunc(m * 4).astype(np.int64)  # bits, [0, 4]
    if name == "PosterizeIncreasing":
        return 4 - np.trunc(m * 4).astype(np.int64)  # bits, [4, 0]
    if name == "PosterizeOriginal":
        return np.trunc(m * 4).astype(np.int64) + 4  # bits, [4, 8]
    if name == "Solarize":
        return np.minimum(256, np.trunc(m * 256)).astype(np.int64)
    if name == "SolarizeIncreasing":
        return 256 - np.minimum(256, np.trunc(m * 256)).astype(np.int64)
    if name == "SolarizeAdd":
        return np.minimum(128, np.trunc(m * 110)).astype(np.int64)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return m * 1.8 + 0.1  # enhance factor, [0.1, 1.9]
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return np.maximum(0.1, 1.0 + _negate(m * 0.9, neg))  # 1 +- 0.9 level, >= 0.1
    raise KeyError(name)


# On the CPU the pixel loops run as compiled twins of the torch ops below (band_resample: the
# warps, tables, histograms and Sharpness, equal byte for byte); False runs the torch ops there too
# (the plain twins the tests compare against). CUDA always runs the torch ops.
COMPILED_ON_CPU = True


def compiled(x: torch.Tensor) -> bool:
    return COMPILED_ON_CPU and x.device.type == "cpu"


# ----------------------------------------------------------------------------- pixel ops

def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x uint8 [n, C, H, W], lut uint8 [n, C, 256] -> lut[b, c, x[b, c]] (one gather; on the CPU
    compiled, without the batch's int64 copy)."""
    if compiled(x):
        return apply_lut_u8(x, lut)
    n, c, h, w = x.shape
    out = torch.gather(lut, 2, x.reshape(n, c, h * w).long())  # [n, C, H*W]
    return out.view(n, c, h, w)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """Per (sample, channel) 256-bin histogram: [n, C, H, W] uint8 -> [n, C, 256] int64."""
    if compiled(x):
        return histogram_u8(x)
    n, c = x.shape[:2]
    off = torch.arange(n * c, device=x.device).view(n, c, 1) * 256
    idx = (x.reshape(n, c, -1).long() + off).reshape(-1)
    return torch.bincount(idx, minlength=n * c * 256).view(n, c, 256)


def auto_contrast(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast(img) (cutoff 0): per channel, lo -> 0, hi -> 255, int() truncation."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    lo = flat.amin(-1).double()[..., None]  # [n, C, 1]
    hi = flat.amax(-1).double()[..., None]
    scale = 255.0 / (hi - lo).clamp(min=1.0)
    ix = torch.arange(256, device=x.device, dtype=torch.float64)  # [256]
    lut = torch.trunc(ix * scale - lo * scale).clamp(0, 255)  # [n, C, 256]
    lut = torch.where(hi > lo, lut, ix)  # flat channel: identity
    return _apply_lut(x, lut.to(torch.uint8))


def equalize(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: step = (pixels - count of the last used level) // 255, lut[i] = (step // 2 +
    pixels below i) // step, clipped to 255 (Pillow clips LUT values); identity when step is 0."""
    h = _histogram(x)  # [n, C, 256]
    total = h.sum(-1, keepdim=True)  # [n, C, 1]
    levels = torch.arange(256, device=x.device)
    last = torch.where(h > 0, levels, -1).amax(-1, keepdim=True)  # [n, C, 1] highest used level
    h_last = torch.gather(h, 2, last.clamp(min=0))
    step = (total - h_last) // 255  # [n, C, 1]
    below = torch.cumsum(h, -1) - h  # [n, C, 256] pixels with a lower level
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, levels)  # one level used, or too few pixels: identity
    return _apply_lut(x, lut.to(torch.uint8))


def invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` [n] bits; 8+ = identity; 0 = black (see the module docstring)."""
    bits = bits.clamp(0, 8).view(-1, 1, 1, 1)
    mask = (255 - ((1 << (8 - bits)) - 1)).to(torch.uint8)  # [n, 1, 1, 1]
    return x & mask


def solarize(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """Pixels >= thresh [n] inverted (ImageOps.solarize)."""
    return torch.where(x.to(torch.int16) < thresh.to(torch.int16).view(-1, 1, 1, 1), x, 255 - x)


def solarize_add(x: torch.Tensor, add: torch.Tensor, thresh: int = 128) -> torch.Tensor:
    """timm's solarize_add: pixels < thresh get + add [n], capped at 255."""
    xs = x.to(torch.int16)
    return torch.where(xs < thresh, (xs + add.to(torch.int16).view(-1, 1, 1, 1)).clamp_(max=255), xs).to(torch.uint8)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L (ITU-R 601, 16-bit fixed point, rounded): [n, 3, H, W] -> [n, 1, H, W] int64."""
    xl = x.long()
    return (xl[:, 0:1] * 19595 + xl[:, 1:2] * 38470 + xl[:, 2:3] * 7471 + 0x8000) >> 16


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, factor): deg + f (x - deg) in float32 (Pillow's C float), clipped
    and truncated to uint8. factor [n]; degenerate broadcastable to x."""
    f = factor.to(torch.float32).view(-1, 1, 1, 1)
    d = degenerate.to(torch.float32)
    out = d + f * (x.to(torch.float32) - d)
    return out.clamp_(0, 255).to(torch.uint8)  # float -> uint8 truncates toward zero


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the luma image (the identity on gray, 1 channel)."""
    if x.shape[1] == 1:
        return x.clone()
    return blend(_luma(x).expand_as(x), x, factor)


def contrast_mean(x: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast's flat level: int(mean luma + 0.5), [n, C, H, W] -> [n] float64."""
    luma = x if x.shape[1] == 1 else _luma(x)  # [n, 1, H, W]
    total = luma.sum(dim=(1, 2, 3), dtype=torch.int64)  # [n] exact
    return torch.floor(total.double() / luma[0].numel() + 0.5)  # [n] ImageStat mean, int(m + 0.5)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with a flat image at int(mean luma + 0.5)."""
    return blend(contrast_mean(x).view(-1, 1, 1, 1), x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return blend(torch.zeros((), device=x.device), x, factor)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH: kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded; the outer rows and
    columns are copied. In exact integers: the kernel is a 3x3 box sum (separable: 4 shifted adds
    in int16, max 9 x 255) plus 4 x the centre, and round(S / 13) = (2 S + 13) // 26 (S / 13 is
    never exactly half-way, so Pillow's float rounding agrees)."""
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return x.clone()
    xs = x.to(torch.int16)
    rows = xs[:, :, :, :-2] + xs[:, :, :, 1:-1] + xs[:, :, :, 2:]  # [n, C, H, W-2] horizontal 3-sums
    box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]  # [n, C, H-2, W-2] 3x3 sums
    total = box.add_(xs[:, :, 1:-1, 1:-1], alpha=4)  # + 4 x centre: weight 5 in all
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = torch.div(total.mul_(2).add_(13), 26, rounding_mode="floor").to(torch.uint8)
    return out


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (CPU: compiled, one pass)."""
    if compiled(x):
        return sharpness_u8(x, factor)
    return blend(smooth(x), x, factor)


# ----------------------------------------------------------------------------- affine warps

def _cubic_weights(d: torch.Tensor) -> list[torch.Tensor]:
    """Pillow Geometry.c BICUBIC (a = -1) tap weights for taps at -1, 0, 1, 2 from fraction d."""
    d2, d3 = d * d, d * d * d
    return [-d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, -d2 + d3]


def warp_affine(x: torch.Tensor, coeffs: torch.Tensor, fill: torch.Tensor, bicubic: torch.Tensor) -> torch.Tensor:
    """Pillow `Image.transform(size, AFFINE, (a, b, c, d, e, f), resample, fillcolor)` on a batch.

    x uint8 [n, C, H, W]; coeffs [n, 6] float64 (output pixel centre (x+0.5, y+0.5) -> input
    point); fill [C] uint8 colour for input points outside [0, W) x [0, H) (a gray image, C = 1, with
    a 3-channel fill gives [n, 3, H, W]: the gray result where inside, each channel's fill outside,
    what the 3-channel copy of the gray image gives); bicubic [n] bool (else bilinear). Taps are edge-clamped (Pillow's XCLIP/YCLIP), bilinear has 2x2 taps, bicubic
    4x4; the result is clipped and truncated to uint8 as Pillow's filters do.
    One 4x4 gather pass for both filters (bilinear = the middle 2x2 with the outer weights 0), so a
    batch with mixed filters is still one set of tensor ops. The CUDA path and the plain twin of
    band_resample.warp_affine_u8, which the CPU runs.
    """
    n, c, h, w = x.shape
    dev = x.device
    cf = coeffs.to(dev, torch.float64)
    ys = torch.arange(h, device=dev, dtype=torch.float64) + 0.5
    xs = torch.arange(w, device=dev, dtype=torch.float64) + 0.5
    a, b, c0, d, e, f = (cf[:, i].view(n, 1, 1) for i in range(6))
    xin = a * xs.view(1, 1, w) + b * ys.view(1, h, 1) + c0  # [n, H, W] input x
    yin = d * xs.view(1, 1, w) + e * ys.view(1, h, 1) + f
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)  # [n, H, W]
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = torch.floor(xin), torch.floor(yin)
    dx, dy = (xin - x0).float(), (yin - y0).float()  # [n, H, W]
    x0, y0 = x0.long(), y0.long()
    cub = bicubic.to(dev).view(n, 1, 1)
    zero = torch.zeros_like(dx)
    # tap weights at offsets -1, 0, 1, 2 (bilinear: 0, 1 - d, d, 0)
    wx = [torch.where(cub, cw, lw) for cw, lw in zip(_cubic_weights(dx), [zero, 1 - dx, dx, zero])]
    wy = [torch.where(cub, cw, lw) for cw, lw in zip(_cubic_weights(dy), [zero, 1 - dy, dy, zero])]
    # edge replication by 2 px: every tap index lands inside the padded image, no per-tap clamp
    xp = torch.nn.functional.pad(x.to(torch.float32), (2, 2, 2, 2), mode="replicate")  # [n, C, H+4, W+4]
    wp = w + 4
    xp = xp.reshape(n, c, -1)
    # the input point is inside the image, so x0 in [-1, W-1]: taps x0-1 .. x0+2 in [-2, W+1]
    base = ((y0.clamp(-1, h - 1) + 2) * wp + (x0.clamp(-1, w - 1) + 2)).view(n, 1, h * w)  # [n, 1, H*W]
    acc = torch.zeros(n, c, h * w, device=dev, dtype=torch.float32)
    for i, oy in enumerate((-1, 0, 1, 2)):
        row = torch.zeros(n, c, h * w, device=dev, dtype=torch.float32)
        for j, ox in enumerate((-1, 0, 1, 2)):
            idx = (base + (oy * wp + ox)).expand(n, c, h * w)
            row += wx[j].view(n, 1, h * w) * torch.gather(xp, 2, idx)
        acc += wy[i].view(n, 1, h * w) * row
    out = acc.clamp_(0, 255).to(torch.uint8).view(n, c, h, w)  # truncation, as Pillow's (UINT8)v
    return torch.where(inside.view(n, 1, h, w), out, fill.to(dev, torch.uint8).view(1, -1, 1, 1))


def warp_rows(x: torch.Tensor, shift: torch.Tensor, fill: torch.Tensor, bicubic: torch.Tensor) -> torch.Tensor:
    """The same Pillow affine sampling for maps that only move pixels along rows by a per-row
    amount (ShearX, TranslateX: input x = output x + shift[row], input y = output y).

    x uint8 [n, C, H, W]; shift [n, H] float64. Each row's fraction is constant, so the 2-D 4x4
    (or 2x2) taps collapse to 4 taps along the row with per-row weights: 4 gathers instead of 16
    and no per-pixel weights (the vertical taps of Pillow's filter all land on the row itself with
    weight 1). ShearY / TranslateY run through this on the transposed image. The CUDA path and
    the plain twin of band_resample.warp_rows_u8, which the CPU runs.
    """
    n, c, h, w = x.shape
    dev = x.device
    shift = shift.to(dev, torch.float64)
    fl = torch.floor(shift)  # [n, H]
    d = (shift - fl).float()  # [n, H] fraction of every tap in the row
    xs = torch.arange(w, device=dev)
    pos = xs.view(1, 1, w) + 0.5 + shift.unsqueeze(-1)  # [n, H, W] input x of the output pixel centre
    inside = (pos >= 0) & (pos < w)
    x0 = xs.view(1, 1, w) + fl.long().unsqueeze(-1)  # [n, H, W] tap at offset 0
    cub = bicubic.to(dev).view(n, 1)
    zero = torch.zeros_like(d)
    ws = [torch.where(cub, cw, lw) for cw, lw in zip(_cubic_weights(d), [zero, 1 - d, d, zero])]  # 4 x [n, H]
    src = x.to(torch.float32)
    acc = torch.zeros(n, c, h, w, device=dev, dtype=torch.float32)
    for k, off in enumerate((-1, 0, 1, 2)):
        idx = (x0 + off).clamp_(0, w - 1).unsqueeze(1).expand(n, c, h, w)  # edge-clamped (XCLIP)
        acc.addcmul_(torch.gather(src, 3, idx), ws[k].view(n, 1, h, 1))
    out = acc.clamp_(0, 255).to(torch.uint8)  # truncation, as Pillow's (UINT8)v
    return torch.where(inside.unsqueeze(1), out, fill.to(dev, torch.uint8).view(1, -1, 1, 1))


def row_shifts(name: str, arg: np.ndarray, height: int, width: int) -> tuple[np.ndarray, bool]:
    """(shift [n, rows] float64, transposed) for the row-moving ops; rows are columns when transposed.
    Pillow's affine data (1, b, c, 0, 1, 0): input x = (x + 0.5) + b (y + 0.5) + c."""
    arg = np.asarray(arg, np.float64)[:, None]
    if name in ("ShearX", "ShearY"):
        rows = height if name == "ShearX" else width
        return arg * (np.arange(rows) + 0.5)[None, :], name == "ShearY"
    scale = {"TranslateXRel": width, "TranslateYRel": height}.get(name, 1.0)
    rows = height if name in ("TranslateX", "TranslateXRel") else width
    return np.repeat(arg * scale, rows, axis=1), name in ("TranslateY", "TranslateYRel")


def affine_coeffs(name: str, arg: np.ndarray, height: int, width: int) -> np.ndarray:
    """timm's op -> Pillow's affine data (a, b, c, d, e, f) per sample, [n, 6] float64."""
    n = len(arg)
    m = np.zeros((n, 6))
    m[:, 0] = m[:, 4] = 1.0
    if name == "ShearX":
        m[:, 1] = arg
    elif name == "ShearY":
        m[:, 3] = arg
    elif name == "TranslateX":
        m[:, 2] = arg
    elif name == "TranslateY":
        m[:, 5] = arg
    elif name == "TranslateXRel":
        m[:, 2] = arg * width
    elif name == "TranslateYRel":
        m[:, 5] = arg * height
    elif name == "Rotate":  # Image.rotate(deg, expand=False): about (w/2, h/2), Pillow's 15-digit rounding
        ang = -np.radians(np.mod(arg, 360.0))
        cos, sin = np.round(np.cos(ang), 15), np.round(np.sin(ang), 15)
        cx, cy = width / 2.0, height / 2.0
        m[:, 0], m[:, 1], m[:, 3], m[:, 4] = cos, sin, -sin, cos
        m[:, 2] = cos * -cx + sin * -cy + cx
        m[:, 5] = -sin * -cx + cos * -cy + cy
    else:
        raise KeyError(name)
    return m


# ----------------------------------------------------------------------------- the op table

def _fill(hparams: dict, channels: int) -> torch.Tensor:
    """Fill colour [C] uint8: timm's img_mean (gray fill for a 1-channel image: its one value)."""
    mean = hparams.get("img_mean", HPARAMS_DEFAULT["img_mean"])
    mean = (mean,) if isinstance(mean, (int, float)) else tuple(mean)
    if channels == 1:
        if len(set(mean)) != 1:
            raise ValueError(f"img_mean {mean} is not gray: a 1-channel image can only hold a gray fill "
                             f"(use 3 channels, or a gray mean such as the 1-channel normalisation's)")
        return torch.tensor([int(mean[0])], dtype=torch.uint8)
    if len(mean) == 1:
        mean = mean * channels
    if len(mean) != channels:
        raise ValueError(f"img_mean {mean} has {len(mean)} values for {channels}-channel images")
    return torch.tensor([int(v) for v in mean], dtype=torch.uint8)


_PIXEL_FNS = {
    "AutoContrast": lambda x, a: auto_contrast(x),
    "Equalize": lambda x, a: equalize(x),
    "Invert": lambda x, a: invert(x),
    "Posterize": posterize, "PosterizeIncreasing": posterize, "PosterizeOriginal": posterize,
    "Solarize": solarize, "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color, "ColorIncreasing": color,
    "Contrast": contrast, "ContrastIncreasing": contrast,
    "Brightness": brightness, "BrightnessIncreasing": brightness,
    "Sharpness": sharpness, "SharpnessIncreasing": sharpness,
}
OP_NAMES = tuple(_PIXEL_FNS) + GEOMETRIC
# ops whose output pixel is a function of its own value and per-sample constants alone: on the CPU
# each sample's 256-entry table is the op itself run on the 256 levels (same arithmetic, so the
# same bytes), then applied by one compiled lookup instead of several whole-image tensor passes
# (Invert stays one vectorised uint8 tensor op: 0.03 ms for 8 samples of 224 px, against 0.14 ms for a
# table lookup; Posterize's broadcast bitwise and took ~1 ms)
TABLE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize", "SolarizeIncreasing", "SolarizeAdd",
             "Brightness", "BrightnessIncreasing", "Contrast", "ContrastIncreasing")


def level_table(name: str, x: torch.Tensor, arg: torch.Tensor | None) -> torch.Tensor:
    """Op `name` (one of TABLE_OPS) as tables uint8 [n, C, 256] for the batch x [n, C, H, W]."""
    n, c = x.shape[:2]
    levels = torch.arange(256, dtype=torch.uint8, device=x.device).expand(n, c, 1, 256)  # [n, C, 1, 256]
    if name in ("Contrast", "ContrastIncreasing"):  # the flat level comes from the whole image
        lut = blend(contrast_mean(x).view(-1, 1, 1, 1), levels, arg)
    else:
        lut = _PIXEL_FNS[name](levels, arg)
    return lut.reshape(n, c, 256)


def _bicubic_draw(interpolation: str, n: int, rng: np.random.Generator | None) -> np.ndarray:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if interpolation == "random":
        rng = rng if rng is not None else np.random.default_rng()
        return rng.random(n) < 0.5
    return np.full(n, interpolation == "bicubic")


def _run_op(name: str, x: torch.Tensor, magnitude: np.ndarray, negate: np.ndarray, bicubic: np.ndarray,
            hparams: dict, fill_channels: int | None = None) -> torch.Tensor:
    """One op on a sub-batch; magnitude / negate / bicubic are host arrays [n]. `fill_channels`:
    the geometric ops' fill colour has this many channels (default: the image's; a gray image with
    3 gives the 3-channel result, see warp_affine)."""
    arg = level_to_arg(name, magnitude, negate, hparams)
    if name in GEOMETRIC:
        # every host -> device copy of an op's arguments is non-blocking (a blocking one waits for
        # the stream: one sync per geometric op of every batch)
        fill = _fill(hparams, fill_channels or x.shape[1]).to(x.device, non_blocking=True)
        bic = torch.from_numpy(np.ascontiguousarray(bicubic)).to(x.device, non_blocking=True)
        if name == "Rotate":
            coeffs = affine_coeffs(name, arg, x.shape[2], x.shape[3])
            if compiled(x):  # compiled, per pixel only its taps (see band_resample)
                return warp_affine_u8(x, coeffs, fill, bicubic)
            return warp_affine(x, torch.from_numpy(coeffs).to(x.device, non_blocking=True), fill, bic)
        shift, transposed = row_shifts(name, arg, x.shape[2], x.shape[3])
        if compiled(x):
            return warp_rows_u8(x, shift, fill, bicubic, columns=transposed)
        shift = torch.from_numpy(shift).to(x.device, non_blocking=True)
        if transposed:  # columns: the same row warp on the transposed image
            return warp_rows(x.transpose(2, 3), shift, fill, bic).transpose(2, 3).contiguous()
        return warp_rows(x, shift, fill, bic)
    a = None if arg is None else torch.from_numpy(np.ascontiguousarray(arg)).to(x.device, non_blocking=True)
    if compiled(x) and name in TABLE_OPS:
        return _apply_lut(x, level_table(name, x, a))
    return _PIXEL_FNS[name](x, a)


def take_rows(t: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """t[idx] along dim 0, a copy; idx host int64 [n]. On the CPU numpy's fancy indexing, which
    copies whole samples: torch's index_select / index_copy_ took 5x / 25x longer on uint8 batches
    (0.08 / 0.36 ms against 0.016 / 0.014 ms for 8 samples of 224 x 224)."""
    if t.device.type == "cpu":
        return torch.from_numpy(t.numpy()[idx])
    return t.index_select(0, torch.from_numpy(idx).to(t.device, non_blocking=True))


def put_rows(t: torch.Tensor, idx: np.ndarray, rows: torch.Tensor) -> None:
    """t[idx] = rows along dim 0, in place (see take_rows)."""
    if t.device.type == "cpu":
        t.numpy()[idx] = rows.numpy()
    else:
        t.index_copy_(0, torch.from_numpy(idx).to(t.device, non_blocking=True), rows)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor [B, C, H, W], got {got}")


def apply_op(name: str, images: torch.Tensor, magnitude, negate, *, img_mean=HPARAMS_DEFAULT["img_mean"],
             translate_const: float = HPARAMS_DEFAULT["translate_const"], translate_pct: float = 0.45,
             interpolation: str = "random", rng: np.random.Generator | None = None) -> torch.Tensor:
    """timm's op `name` on every sample: images uint8 [B, C, H, W], magnitude [B] on timm's 0-10 scale
    (used as given, no clipping: AugmentOp clips before the op), negate [B] bool (the sign timm's
    `_randomly_negate` would draw). hparams as timm's (`_HPARAMS_DEFAULT` when not given: fill 128,
    translate_const 250, translate_pct 0.45, interpolation random bilinear/bicubic per sample).
    Returns uint8 [B, C, H, W]. A handle for tests and benchmarks (host arrays are made from the inputs)."""
    if name not in OP_NAMES:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(OP_NAMES)}")
    _check_images(images)
    b = images.shape[0]
    mag = np.broadcast_to(np.asarray(torch.as_tensor(magnitude).cpu(), np.float64), (b,))
    neg = np.broadcast_to(np.asarray(torch.as_tensor(negate).cpu(), bool), (b,))
    hp = dict(img_mean=img_mean, translate_const=translate_const, translate_pct=translate_pct)
    return _run_op(name, images, mag, neg, _bicubic_draw(interpolation, b, rng), hp)


# ----------------------------------------------------------------------------- the policy

@dataclass(frozen=True)
class RandAugPolicy:
    """A parsed timm RandAugment string: rand-m{magnitude}-n{num_layers}-p{prob}-mstd{..}-mmax{..}-inc{0|1}."""
    magnitude: float = 10.0  # timm's default M (_LEVEL_DENOM)
    num_layers: int = 2  # ops per image
    prob: float = 0.5  # each op applied with this probability
    magnitude_std: float = 0.0  # 0: fixed M; inf (mstd > 100): uniform on [0, M]
    magnitude_max: float | None = None  # clip bound (default 10)
    increasing: bool = False  # the 'increasing' op set (severity grows with M)

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def parse_policy(policy: str) -> RandAugPolicy:
    """Parse like timm's `rand_augment_transform`, but an unknown or malformed section is an error
    naming it (timm silently skips sections without a digit and asserts on unknown keys)."""
    if not isinstance(policy, str) or not policy:
        raise PolicyError(f"RandAugment policy must be a string like 'rand-m6-mstd0.5-inc1', got {policy!r}")
    parts = policy.split("-")
    if parts[0] != "rand":
        raise PolicyError(f"RandAugment policy {policy!r} must start with 'rand' (got {parts[0]!r}); "
                          f"AutoAugment and AugMix policies are not implemented")
    kw: dict = {}
    for sec in parts[1:]:
        if sec.startswith("t"):
            raise PolicyError(f"RandAugment policy {policy!r}: section {sec!r} selects a weighted or 3-Augment "
                              f"op set, which is not implemented (only the standard and 'inc1' sets)")
        cut = re.split(r"(\d.*)", sec)
        if len(cut) < 2:
            raise PolicyError(f"RandAugment policy {policy!r}: section {sec!r} has no value "
                              f"(expected m, n, p, mstd, mmax or inc followed by a number)")
        key, val = cut[0], cut[1]
        try:
            if key == "m":
                kw["magnitude"] = float(int(val))
            elif key == "n":
                kw["num_layers"] = int(val)
            elif key == "p":
                kw["prob"] = float(val)
            elif key == "mstd":
                mstd = float(val)
                kw["magnitude_std"] = math.inf if mstd > 100 else mstd
            elif key == "mmax":
                kw["magnitude_max"] = float(int(val))
            elif key == "inc":
                kw["increasing"] = bool(int(val))
            else:
                raise PolicyError(f"RandAugment policy {policy!r}: unknown key {key!r} in section {sec!r} "
                                  f"(known: m, n, p, mstd, mmax, inc)")
        except ValueError as e:
            if isinstance(e, PolicyError):
                raise
            raise PolicyError(f"RandAugment policy {policy!r}: section {sec!r}: bad value {val!r} for {key!r}") from None
    p = RandAugPolicy(**kw)
    if p.num_layers < 0 or not 0.0 <= p.prob <= 1.0 or p.magnitude_std < 0:
        raise PolicyError(f"RandAugment policy {policy!r}: need n >= 0, 0 <= p <= 1, mstd >= 0")
    return p


@dataclass
class RandAugPlan:
    """Every draw for one batch (host numpy, [L, B] each): op index, applied?, magnitude, sign, filter."""
    op: np.ndarray
    applied: np.ndarray
    magnitude: np.ndarray
    negate: np.ndarray
    bicubic: np.ndarray

    def __len__(self) -> int:
        return int(self.op.shape[1])


class RandAugment:
    """timm's RandAugment(rand_augment_ops(...)) for batches: `sample` draws a batch's plan on the
    host (one vectorised call per draw kind: no per-sample Python), `apply` runs it on a uint8
    batch on its device, one op call per (layer, op) over the samples that drew it.

    hparams as create_transform sets them: img_mean = the normalisation mean in grey levels,
    translate_const = int(0.45 x img_size), interpolation = the crop's.
    """

    def __init__(self, policy: str | RandAugPolicy, *, img_mean=HPARAMS_DEFAULT["img_mean"],
                 translate_const: float = HPARAMS_DEFAULT["translate_const"], translate_pct: float = 0.45,
                 interpolation: str = "random"):
        self.policy = parse_policy(policy) if isinstance(policy, str) else policy
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.hparams = dict(img_mean=img_mean, translate_const=translate_const, translate_pct=translate_pct)
        self.interpolation = interpolation
        self.ops = self.policy.ops

    def sample(self, n: int, rng: np.random.Generator | None = None) -> RandAugPlan:
        rng = rng if rng is not None else np.random.default_rng()
        p, L = self.policy, self.policy.num_layers
        op = rng.integers(0, len(self.ops), size=(L, n))  # uniform, with replacement (np.random.choice)
        applied = rng.random((L, n)) <= p.prob  # timm skips when random() > prob
        if p.magnitude_std == math.inf:
            mag = rng.uniform(0.0, p.magnitude, size=(L, n))
        elif p.magnitude_std > 0:
            mag = rng.normal(p.magnitude, p.magnitude_std, size=(L, n))
        else:
            mag = np.full((L, n), p.magnitude)
        mag = np.clip(mag, 0.0, p.magnitude_max or LEVEL_DENOM)
        negate = rng.random((L, n)) > 0.5
        bicubic = _bicubic_draw(self.interpolation, L * n, rng).reshape(L, n)
        return RandAugPlan(op, applied, mag, negate, bicubic)

    def apply(self, x: torch.Tensor, plan: RandAugPlan, inplace: bool = False) -> torch.Tensor:
        """uint8 [B, C, H, W] -> uint8 [B, C, H, W]: a new tensor, or x itself with inplace=True (for
        a caller whose x is its own temporary: no copy of the batch)."""
        _check_images(x)
        if len(plan) != x.shape[0]:
            raise ValueError(f"RandAugment plan for {len(plan)} samples, batch of {x.shape[0]}")
        out = x if inplace else x.clone()
        for layer in range(plan.op.shape[0]):
            for k, name in enumerate(self.ops):
                idx = np.flatnonzero(plan.applied[layer] & (plan.op[layer] == k))  # host: no device sync
                if idx.size == 0:
                    continue
                res = _run_op(name, take_rows(out, idx), plan.magnitude[layer, idx], plan.negate[layer, idx],
                              plan.bicubic[layer, idx], self.hparams)
                put_rows(out, idx, res)
        return out

    def apply_gray(self, x: torch.Tensor, plan: RandAugPlan, channels: int,
                   inplace: bool = False) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """What `apply(x.expand(B, channels, H, W), plan)` gives, for a gray uint8 batch x [B, 1, H, W]
        whose `channels`-channel fill colour need not be gray (timm's ImageNet mean), on 1 channel
        wherever that is exact. A sample's channels stay equal, so every op may run on its one
        channel, until a geometric op fills pixels with the colour: that op writes the gray result
        inside and each channel's fill outside (the per-channel fill mask, warp_affine), and the
        sample's later ops run on its `channels` channels.

        Returns (gray [B, 1, H, W] uint8, colour [B] bool host mask, col [B, channels, H, W] uint8):
        sample b's result is col[b] where colour[b], else gray[b] on every channel; gray is x itself
        with inplace=True (see apply)."""
        _check_images(x)
        if x.shape[1] != 1:
            raise ValueError(f"apply_gray takes a gray batch [B, 1, H, W], got {tuple(x.shape)}")
        if len(plan) != x.shape[0]:
            raise ValueError(f"RandAugment plan for {len(plan)} samples, batch of {x.shape[0]}")
        gray_fill = len(set(_fill(self.hparams, channels).tolist())) == 1
        b, _, h, w = x.shape
        gray = x if inplace else x.clone()
        colour = np.zeros(b, bool)
        col = torch.empty((b, channels, h, w), dtype=torch.uint8, device=x.device)
        for layer in range(plan.op.shape[0]):
            mag, neg, bic = plan.magnitude[layer], plan.negate[layer], plan.bicubic[layer]  # [B] each
            for k, name in enumerate(self.ops):
                drew = plan.applied[layer] & (plan.op[layer] == k)
                idx = np.flatnonzero(drew & colour)  # already colour: all channels
                if idx.size:
                    put_rows(col, idx, _run_op(name, take_rows(col, idx), mag[idx], neg[idx], bic[idx],
                                               self.hparams))
                idx = np.flatnonzero(drew & ~colour)  # still gray: one channel
                if idx.size == 0:
                    continue
                turns = name in GEOMETRIC and not gray_fill  # [n, channels, H, W]: the sample turns colour
                res = _run_op(name, take_rows(gray, idx), mag[idx], neg[idx], bic[idx], self.hparams,
                              fill_channels=channels if turns else 1 if gray_fill else None)
                if turns:
                    put_rows(col, idx, res)
                    colour[idx] = True
                else:
                    put_rows(gray, idx, res)
        return gray, colour, col

    def __call__(self, x: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], rng))
