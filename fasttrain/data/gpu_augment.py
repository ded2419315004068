"""Batched crop / flip / resize / normalise of uint8 image batches on the device.

Every packed loader delivers uint8 batches `[B, H, W]` (grayscale, as the converters store them)
and this module turns a whole batch into normalised float images `[B, C, h, w]` (channels-last)
with a fixed number of tensor ops per batch, never a Python loop over samples (airbench:
"it's faster to load+process uint8 data").

How: a crop followed by a bilinear resize is linear along each axis, so for sample b
    out[b] = Ry[b] @ img[b] @ Rx[b]^T        Ry: [B, h, H], Rx: [B, w, W]
two batched matmuls. Ry/Rx hold the bilinear weights of the crop box; a horizontal flip reverses
the rows of Rx, 1/255 is folded into Ry, and the per-channel normalisation and the expansion of
gray to C channels (at the very last moment) are folded into the second matmul, which writes the
channels-last output directly (see BatchAugment). Nothing else touches the pixels.
That is the device (CUDA) path; on the CPU the same weights run as a compiled banded resampler
(band_resample: only the K taps of each output pixel, ~50x fewer multiply-adds than the dense
matmuls, which the CPU pays in full), and the matmuls stay its plain twin.

The weights are PIL's bilinear filter (Pillow `ImagingResample`: triangle kernel whose support
widens by the downscale factor, i.e. antialiased when shrinking), so the result equals
torchvision's PIL path `resized_crop(img, top, left, h, w, size, BILINEAR)` up to PIL's 8-bit
rounding (PIL rounds to uint8 after each pass: <= 1 grey level apart; see tests/data/test_gpu_augment.py).

Why not roi_align / grid_sample: they are bilinear *point* samplers (no antialias when the crop
is larger than the output), and measured slower on CPU (~2.4x the PIL reference vs ~4.3x here).
Why hand-written at all: no library op does a batched per-sample crop+resize with PIL semantics
(DALI does on GPU, and the DALI loader uses it there).

Crop parameters follow torchvision's `RandomResizedCrop.get_params` (10 attempts of area-scale x
log-uniform aspect ratio, then the central-crop fallback), drawn for the whole batch at once from
a seeded numpy Generator, so (seed, epoch, rank, step) fixes every draw (fasttrain.data.sampler).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .band_resample import OutputBuffers, normalise_table, resample_band_float, resample_band_u8
from .randaug import RandAugment, RandAugPlan

# The paper normalises with ImageNet statistics; Xiao et al. use NIH statistics (one value for
# all channels, since the images are gray).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NIH_MEAN, NIH_STD = 0.5056, 0.252


def norm_stats(norm: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) in [0, 1] units for `in_chans` output channels.

    imagenet + 3 channels: ImageNet's per-channel values (the gray image is replicated, as the
    seed did with convert('RGB')). imagenet + 1 channel: the mean of the three means and of the
    three stds (0.449 / 0.226), so a 1-channel model sees the average of what the RGB model's
    channels see. nih: 0.5056 / 0.252 on every channel.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (native gray) or 3 (gray replicated to RGB), got {in_chans}")
    if norm == "imagenet":
        if in_chans == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    if norm == "nih":
        return (NIH_MEAN,) * in_chans, (NIH_STD,) * in_chans
    raise ValueError(f"data.norm must be 'imagenet' or 'nih', got {norm!r}")


@dataclass
class CropParams:
    """One crop box per sample, in source-image pixels, plus a flip flag (host numpy arrays)."""
    top: np.ndarray  # [B] int64
    left: np.ndarray  # [B] int64
    height: np.ndarray  # [B] int64
    width: np.ndarray  # [B] int64
    flip: np.ndarray  # [B] bool

    def __len__(self) -> int:
        return int(self.top.shape[0])


def sample_crop_params(n: int, height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                       hflip: float = 0.5, rng: np.random.Generator | None = None) -> CropParams:
    """torchvision RandomResizedCrop.get_params + RandomHorizontalFlip for `n` samples at once.

    Same distribution as torchvision (10 attempts, first one that fits, else the central crop with
    the aspect ratio clamped into `ratio`); only the order of the random draws differs. Host numpy:
    a few tiny single-threaded ops, no device work and no thread-pool wake-ups.
    """
    rng = rng if rng is not None else np.random.default_rng()
    attempts = 10
    area = float(height * width)
    u = rng.random((n, attempts, 2))  # [n, 10, 2]
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # [n, 10]
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = np.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])  # [n, 10]
    w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)  # [n, 10]
    h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [n, 10]
    first = np.argmax(ok, axis=1)  # [n] first attempt that fits (0 if none)
    any_ok = ok.any(axis=1)  # [n]
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]  # [n]

    # Fallback: central crop, aspect ratio clamped into `ratio` (torchvision's rule).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = np.where(any_ok, w, fw)
    h = np.where(any_ok, h, fh)

    uo = rng.random((n, 3))  # [n, 3] top, left, flip
    top = np.floor(uo[:, 0] * (height - h + 1)).astype(np.int64)  # uniform integer in [0, H - h]
    left = np.floor(uo[:, 1] * (width - w + 1)).astype(np.int64)
    top = np.where(any_ok, top, (height - h) // 2)
    left = np.where(any_ok, left, (width - w) // 2)
    flip = uo[:, 2] < hflip
    return CropParams(top, left, h, w, flip)


def eval_resize_size(image_size: tuple[int, int], img_size: int, eval_resize: int) -> int:
    """Shorter-side size of the evaluation resize, clamped to [img_size, packed size].

    Xiao et al. resize to 256 then center-crop 224. The converters already resized the images
    (to 256 by default), so resizing beyond the packed size would only upsample: a 64-px demo pack
    evaluated at img_size 56 resizes to 64 (i.e. no resize) and center-crops 56; at img_size 64 it
    takes the whole image. The resize is never below img_size (the crop must fit).
    """
    return max(img_size, min(eval_resize, min(image_size)))


def _resized_hw(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision Resize(size): the shorter side becomes `size`, the other keeps the aspect."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}  # Pillow's resample filters (radius at scale 1)


def _pil_filter(x, xp, name: str):
    """Pillow Resample.c filters: triangle (bilinear) or Keys cubic with a = -0.5 (bicubic)."""
    x = xp.abs(x)
    if name == "bilinear":
        return (1.0 - x).clamp(min=0.0) if xp is torch else np.maximum(1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0  # |x| < 1
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a  # 1 <= |x| < 2
    return xp.where(x < 1.0, near, xp.where(x < 2.0, far, xp.zeros_like(x)))


def pil_band(box0, box1, in_len: int, out_len: int, flip=None, gain: float = 1.0, filter: str = "bilinear"):
    """PIL's resampling weights as a band: for each output pixel K consecutive taps
    (K = 2 * ceil(support * in_len / out_len) + 1, the widest a crop of this axis can need).

    Resamples pixels [box0, box1) of an axis of length in_len to out_len pixels (reversed output
    order where `flip`), rows summing to `gain`. Returns (j0, w): the first tap's input index
    [B, out_len] (int64) and the K weights from it [B, out_len, K] (float32; taps past the filter's
    support weigh 0). Works on numpy arrays (host) or torch tensors (device) alike.
    `filter`: "bilinear" (triangle, support 1) or "bicubic" (a = -0.5, support 2), each widened by
    the downscale factor as Pillow does (its antialias).
    """
    if filter not in FILTER_SUPPORT:
        raise ValueError(f"interpolation must be one of {tuple(FILTER_SUPPORT)}, got {filter!r}")
    support = FILTER_SUPPORT[filter]
    t = isinstance(box0, torch.Tensor)
    xp = torch if t else np
    f32 = torch.float32 if t else np.float32
    kw = {"device": box0.device} if t else {}
    box0 = box0.to(f32) if t else np.asarray(box0, np.float32)  # positions < 2^12: exact in float32
    box1 = box1.to(f32) if t else np.asarray(box1, np.float32)
    b = box0.shape[0]
    scale = (box1 - box0) / out_len  # [B] input pixels per output pixel
    fscale = xp.clip(scale, 1.0, None) if not t else scale.clamp(min=1.0)  # [B] antialias: wider when shrinking
    # taps per output pixel from the largest possible support (no data-dependent size: no device sync)
    k = min(in_len, 2 * int(math.ceil(support * in_len / out_len)) + 1)
    i = xp.arange(out_len, dtype=f32, **kw)  # [out]
    center = box0[:, None] + (i[None, :] + 0.5) * scale[:, None]  # [B, out]
    if flip is not None:
        rev = center.flip(1) if t else center[:, ::-1]
        center = xp.where(flip[:, None], rev, center)  # reversed output order
    # first tap (PIL's xmin), shifted to keep the K-window inside [0, in_len): the taps that carry
    # weight lie inside the box, so the shifted window still holds them, and positions stay distinct
    j0 = xp.floor(center - support * fscale[:, None] + 0.5)
    j0 = j0.clamp(0, in_len - k) if t else np.clip(j0, 0, in_len - k)  # [B, out]
    j = j0[..., None] + xp.arange(k, dtype=f32, **kw)  # [B, out, K] input pixel index
    w = _pil_filter((j + 0.5 - center[..., None]) / fscale[:, None, None], xp, filter)
    w = w * ((j >= box0[:, None, None]) & (j < box1[:, None, None]))  # [B, out, K] inside the box
    sums = w.sum(-1, keepdim=True) if t else w.sum(-1, keepdims=True)
    w = w * (gain / sums)  # rows sum to gain (PIL normalises the same way)
    return (j0.long() if t else j0.astype(np.int64)), w


def band_positions(j0, k: int, in_len: int, transposed: bool = False,
                   strides: tuple[int, int, int] | None = None):
    """Flat positions [B * out * K] of a band's taps (pil_band's j0 [B, out]) in a dense
    [B, out, in_len] matrix ([B, in_len, out] when `transposed`, or any layout given as element
    `strides` (batch, output pixel, input pixel)); numpy or torch like j0."""
    t = isinstance(j0, torch.Tensor)
    xp = torch if t else np
    kw = {"device": j0.device} if t else {}
    b, out_len = j0.shape
    bi = xp.arange(b, **kw)[:, None, None]  # [B, 1, 1]
    o = xp.arange(out_len, **kw)[None, :, None]  # [1, out, 1]
    ji = j0[..., None] + xp.arange(k, **kw)  # [B, out, K] input pixel index
    if strides is None:  # dense [B, out, in] or [B, in, out]
        strides = (in_len * out_len, 1, out_len) if transposed else (in_len * out_len, in_len, 1)
    sb, so, si = strides
    return (bi * sb + o * so + ji * si).reshape(-1)  # [B * out * K]


def pil_taps(box0, box1, in_len: int, out_len: int, flip=None, gain: float = 1.0,
             transposed: bool = False, strides: tuple[int, int, int] | None = None, filter: str = "bilinear"):
    """PIL's resampling weights, compact, for a dense matrix: (flat, w), the flat positions
    [B * out * K] of pil_band's taps (see band_positions for the layouts) and their float32 weights.
    Computing the dense triangle over all in_len inputs would cost more than the matmul itself."""
    j0, w = pil_band(box0, box1, in_len, out_len, flip, gain, filter)
    return band_positions(j0, w.shape[-1], in_len, transposed, strides), w.reshape(-1)


def dense_from_taps(flat, w, shape: tuple[int, ...], dtype, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter compact taps into a zeroed dense [B, rows, cols] matrix (reused `out` if given)."""
    flat = torch.as_tensor(flat).to(device, non_blocking=True)
    w = torch.as_tensor(w).to(device, non_blocking=True).to(dtype)
    if out is None:
        out = torch.zeros(shape, dtype=dtype, device=device)
    else:
        out.zero_()
    out.view(-1).index_put_((flat,), w)  # distinct positions: no accumulate
    return out


def pil_bilinear_weights(box0, box1, in_len: int, out_len: int, flip=None, dtype=torch.float32, device="cpu",
                         gain: float = 1.0, transposed: bool = False, filter: str = "bilinear") -> torch.Tensor:
    """Dense weights [B, out_len, in_len] ([B, in_len, out_len] when `transposed`); see pil_taps."""
    flat, w = pil_taps(box0, box1, in_len, out_len, flip, gain, transposed, filter=filter)
    b = len(box0)
    shape = (b, in_len, out_len) if transposed else (b, out_len, in_len)
    return dense_from_taps(flat, w, shape, dtype, device)


@dataclass
class AugPlan:
    """Everything random about one batch, decided before the pixels arrive: the crop boxes, the
    compact interpolation taps for Ry and Rx^T (flip folded in) and the RandAugment draws."""
    params: CropParams
    # CUDA fused path: (flat, w) of the dense Ry [B, h, H] x 1/255 and R' [B, W+1, w*C];
    # the uint8 path and the CPU: the bands (y0 [B, h], w [B, h, K]) and (x0 [B, w], w [B, w, K])
    ry: tuple
    rxt: tuple
    randaug: RandAugPlan | None = None  # [L, B] draws, None without RandAugment


def cpu_has_native_bf16() -> bool:
    """oneDNN has native bf16 kernels on this CPU (avx512_bf16 / AMX): else bf16 matmuls are emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # bf16 matmuls: exact for uint8 inputs, ~2.5x fp32 on a CPU with avx512_bf16 and on GPUs; on a
    # CPU without it (AVX2 only) a bf16 batched matmul measured ~40x slower than fp32: fp32 there.
    # fp16 on CPU is slow and fp32 is what tests compare against PIL with, so anything else -> fp32.
    if dtype == torch.bfloat16 and (device.type != "cpu" or cpu_has_native_bf16()):
        return torch.bfloat16
    if dtype == torch.float16 and device.type == "cuda":
        return torch.float16
    return torch.float32


class BatchAugment:
    """uint8 [B, H, W] on the device -> normalised float [B, C, h, w] channels-last.

    train=True: RandomResizedCrop(img_size, scale, ratio) + horizontal flip with prob `hflip`.
    train=False: Resize(eval_resize_size(...)) + CenterCrop(img_size), deterministic.
    Two stages: `plan` (host: random draws and interpolation taps; the raw loader runs it in its
    prefetch thread) and `apply` (device: two matmuls per batch, nothing else).

    The normalisation and the gray -> C expansion ride inside the second matmul:
        x'   = [x | 255]                       [B, H, W+1]   (a constant column, set once)
        tmp  = Ry @ x'                         [B, h, W+1]   (Ry rows sum to 1/255: last column = 1)
        out  = tmp @ R'                        [B, h, w*C]   = channels-last [B, h, w, C]
        R'[k, j*C + c] = Rx[j, k] / std_c,  R'[W, j*C + c] = -mean_c / std_c   (the bias row)
    so no elementwise pass touches the output (on CPU a broadcast multiply-add over the bf16 output
    cost ~30% of the whole batch).

    The uint8 path (timm's fine-tuning order, used when `randaug` is set or `interpolation` is
    bicubic): crop + flip to uint8 exactly as Pillow resamples (horizontal pass first, each pass
    rounded half up and clipped to 0..255: bicubic overshoots, and RandAugment's ops read uint8),
    then RandAugment on the gray uint8 [B, 1, h, w] (every op acts on replicated channels alike;
    with a colour fill, ImageNet's mean on 3 channels, a sample moves to C channels at its first
    geometric op: RandAugment.apply_gray), then float and normalise:
        t = round(x @ Rx^T)      [B, H, w]      (Pillow's intermediate uint8 image)
        u = round(Ry @ t)        [B, h, w]      uint8
    (on CUDA as two dense batched matmuls; on the CPU the same sums over each row's K taps only,
    band_resample.resample_band_u8: 6x the dense matmuls at 256 -> 224 px)
        u = RandAugment(u)       [B, C', h, w]  uint8
        out = u * gain_c + bias_c                [B, h, w, C] channels-last
    """

    def __init__(self, image_size: tuple[int, int], img_size: int, in_chans: int, *, train: bool,
                 scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, norm: str = "imagenet",
                 eval_resize: int = 256, device="cpu", dtype=torch.float32, interpolation: str = "bilinear",
                 randaug: str | None = None):
        self.H, self.W = int(image_size[0]), int(image_size[1])
        self.img_size, self.in_chans, self.train = int(img_size), int(in_chans), bool(train)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cdtype = _compute_dtype(dtype, self.device)
        # where `plan` computes the interpolation taps: numpy on the host for CPU batches, torch
        # ops on the device for CUDA ones (an attribute, so a CPU test can run the device path)
        self.host_taps = self.device.type == "cpu"
        mean, std = norm_stats(norm, in_chans)
        if interpolation not in FILTER_SUPPORT:
            raise ValueError(f"data.interpolation must be one of {tuple(FILTER_SUPPORT)}, got {interpolation!r}")
        self.interpolation = interpolation
        # timm's create_transform hparams: fill = the normalisation mean in grey levels,
        # translate_const = 0.45 x img_size, the crop's interpolation for the warps
        self.fill = tuple(min(255, round(255 * m)) for m in mean)  # [C]
        self.randaug = None if (randaug is None or not train) else RandAugment(
            randaug, img_mean=self.fill, translate_const=int(self.img_size * 0.45), interpolation=interpolation)
        self.ra_chans = 1 if len(set(self.fill)) == 1 else self.in_chans  # channels of RandAugment's fill
        # the uint8 path (see above), training only: evaluation keeps its bilinear Resize + CenterCrop,
        # the transform `fasttrain predict` / `export` apply and describe (data.interpolation is the crop's)
        self.u8 = self.train and (randaug is not None or interpolation != "bilinear")
        self.gains = [1.0 / s for s in std]  # [C] per-channel scale of the [0, 1] pixels
        self.biases = [-m / s for m, s in zip(mean, std)]  # [C]
        # for `normalise` (DALI GPU path: DALI already cropped and scaled to [0, 1])
        self._a = torch.tensor(self.gains, dtype=self.cdtype, device=self.device)  # [C]
        self._a255 = torch.tensor([g / 255 for g in self.gains], dtype=self.cdtype, device=self.device)  # [C]
        self._b = torch.tensor(self.biases, dtype=self.cdtype, device=self.device)  # [C]
        self._lut: torch.Tensor | None = None  # normalise_u8's table, made on first use
        self._outputs = OutputBuffers()  # normalise_table's output batches, reused once free
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._prev: dict[tuple, torch.Tensor] = {}  # taps written last batch, per buffer
        self.eval_resize = eval_resize_size((self.H, self.W), self.img_size, eval_resize)
        self._eval_mats = None if train else self._build_eval_mats()

    # -- stages ---------------------------------------------------------------------------------
    def _rxt_shape(self, b: int) -> tuple[int, int, int]:
        return (b, self.W + 1, self.img_size * self.in_chans)  # [B, W+1, w*C]

    def _channel_taps(self, flat, w):
        """Replicate x-axis taps (laid out for [B, W+1, w*C], channel 0) for every channel c:
        column offset c, weight x gain_c."""
        cat = torch.cat if isinstance(flat, torch.Tensor) else np.concatenate
        return (cat([flat + c for c in range(self.in_chans)]),
                cat([w * g for g in self.gains]))

    def _build_eval_mats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Resize(R) weights over the full image, then the rows/cols of the center crop."""
        rh, rw = _resized_hw(self.H, self.W, self.eval_resize)
        s, c = self.img_size, self.in_chans
        top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))  # torchvision CenterCrop
        zero = np.zeros(1)
        ry = pil_bilinear_weights(zero, np.array([self.H]), self.H, rh, gain=1 / 255)  # [1, rh, H]
        rx = pil_bilinear_weights(zero, np.array([self.W]), self.W, rw)  # [1, rw, W]
        ry = ry[0, top:top + s].to(self.device, self.cdtype)  # [h, H]
        rxt = torch.zeros(self.W + 1, s, c, dtype=torch.float32)  # [W+1, w, C]
        rxt[: self.W] = rx[0, left:left + s].t()[..., None] * torch.tensor(self.gains)  # [W, w, C]
        rxt[self.W] = torch.tensor(self.biases)
        return ry, rxt.view(self.W + 1, s * c).to(self.device, self.cdtype)  # [h, H], [W+1, w*C]

    def sample(self, n: int, rng: np.random.Generator | None) -> CropParams:
        """Crop + flip draws for one batch (train only)."""
        return sample_crop_params(n, self.H, self.W, self.scale, self.ratio, self.hflip, rng)

    def plan(self, n: int, rng: np.random.Generator | None = None, params: CropParams | None = None) -> AugPlan | None:
        """Host side of a training batch: draws + taps. CPU device: numpy, single-threaded (no
        thread-pool wake-ups for tiny ops); CUDA: the taps are computed on the device from the boxes."""
        if not self.train:
            return None
        p = params if params is not None else self.sample(n, rng)
        ra = self.randaug.sample(len(p), rng) if self.randaug is not None else None  # [L, B] draws
        s, c = self.img_size, self.in_chans
        if self.host_taps:
            top, left, hh, ww, flip = p.top, p.left, p.height, p.width, p.flip
        else:
            dev = self.device
            top, left, hh, ww, flip = (torch.from_numpy(np.ascontiguousarray(a)).to(dev, non_blocking=True)
                                       for a in (p.top, p.left, p.height, p.width, p.flip))
        f = self.interpolation
        if self.u8 or self.device.type == "cpu":  # the banded resamplers' taps (CPU: both paths)
            ry = pil_band(top, top + hh, self.H, s, filter=f)  # [B, h], [B, h, K]
            rxt = pil_band(left, left + ww, self.W, s, flip=flip, filter=f)  # [B, w], [B, w, K]
            return AugPlan(p, ry, rxt, ra)
        ry = pil_taps(top, top + hh, self.H, s, gain=1 / 255, filter=f)  # [B, h, H]
        rxt = pil_taps(left, left + ww, self.W, s, flip=flip,  # [B, W+1, w*C]: (batch, out j, in k)
                       strides=((self.W + 1) * s * c, c, s * c), filter=f)
        return AugPlan(p, ry, self._channel_taps(*rxt), ra)

    def matrices(self, plan: AugPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense Ry [B, h, H] and R' [B, W+1, w*C] (uint8 path: Rx^T [B, W, w]) in the compute dtype,
        in reused buffers."""
        b = len(plan.params)
        if self.u8:
            (y0, wy), (x0, wx) = plan.ry, plan.rxt
            ry = (band_positions(y0, wy.shape[-1], self.H), wy.reshape(-1))
            rxt = (band_positions(x0, wx.shape[-1], self.W, transposed=True), wx.reshape(-1))
            return (self._dense("ry8", ry, (b, self.img_size, self.H), torch.float32),
                    self._dense("rxt8", rxt, (b, self.W, self.img_size), torch.float32))
        ry, rxt = plan.ry, plan.rxt
        if ry[0].ndim == 2:  # a CPU plan's bands: the same taps laid out for the dense matrices
            (y0, wy), (x0, wx) = ry, rxt
            s, c = self.img_size, self.in_chans
            ry = (band_positions(y0, wy.shape[-1], self.H), wy.reshape(-1) / 255)
            rxt = self._channel_taps(band_positions(x0, wx.shape[-1], self.W,
                                                    strides=((self.W + 1) * s * c, c, s * c)), wx.reshape(-1))
        return self._dense("ry", ry, (b, self.img_size, self.H)), self._dense("rxt", rxt, self._rxt_shape(b))

    def _dense(self, name: str, taps: tuple, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Scatter taps into a reused, mostly-zero buffer. Only the previous batch's taps are reset
        (B*h*K entries, not B*h*H): zeroing the whole [256, 224, 256] matrix every batch cost more
        than filling it, and fresh allocations cost page faults on CPU. Safe to reuse: each batch's
        ops are queued in order on one thread / CUDA stream."""
        key = (name, tuple(shape))
        dtype = dtype or self.cdtype
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.zeros(shape, dtype=dtype, device=self.device)
            if name == "rxt":  # the bias row, never touched by the taps
                buf[:, self.W] = torch.tensor(self.biases, dtype=self.cdtype).repeat(self.img_size).to(self.device)
        elif key in self._prev:
            buf.view(-1).index_fill_(0, self._prev[key], 0)
        flat = torch.as_tensor(taps[0]).to(self.device, non_blocking=True)
        w = torch.as_tensor(taps[1]).to(self.device, non_blocking=True).to(dtype)
        buf.view(-1).index_put_((flat,), w)  # distinct positions: no accumulate
        self._prev[key] = flat
        return buf

    def _xbuf(self, b: int) -> torch.Tensor:
        """Reused [B, H, W+1] compute-dtype input with its constant last column (= 255)."""
        key = ("x", (b, self.H, self.W + 1))
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty(key[1], dtype=self.cdtype, device=self.device)
            buf[..., self.W] = 255.0
        return buf

    def _tmp(self, shape: tuple[int, ...]) -> torch.Tensor:
        key = ("tmp", tuple(shape))
        if key not in self._bufs:
            self._bufs[key] = torch.empty(shape, dtype=self.cdtype, device=self.device)
        return self._bufs[key]

    def resample(self, x: torch.Tensor, ry: torch.Tensor, rxt: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W] -> normalised [B, h, w*C] (a fresh tensor), two (batched) matmuls."""
        b = x.shape[0]
        xf = self._xbuf(b)
        xf[..., : self.W].copy_(x)  # [B, H, W] exact: bf16 holds 0..255
        tmp = torch.matmul(ry, xf, out=self._tmp((b, ry.shape[-2], self.W + 1)))  # [B, h, W+1]
        return torch.matmul(tmp, rxt)  # [B, h, W+1] @ [B, W+1, w*C] -> [B, h, w*C]

    def resample_u8(self, x: torch.Tensor, ry: torch.Tensor, rxt: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W] -> uint8 [B, h, w] as Pillow resizes: horizontal pass, round half up and
        clip to uint8, vertical pass, round and clip (two batched matmuls + two roundings).
        Pillow's Resample.c runs the passes in this order; Pillow 13 itself was seen to run the
        vertical pass first for some shapes (e.g. 31x37 -> 32x32), where its intermediate rounding
        differs (tests: <= 1 level vs the fixed order, mean <= 0.5 level vs Pillow 13's call).
        Always float32, whatever the output dtype: the result is rounded to uint8 anyway (bf16's
        8-bit mantissa would move it by a grey level), and on this CI CPU a bf16 batched matmul
        measured ~40x slower than float32 (3.4 s vs 0.08 s for [128, 256, 256] @ [128, 256, 224])."""
        t = torch.matmul(x.to(torch.float32), rxt)  # [B, H, W] @ [B, W, w] -> [B, H, w]
        t = torch.floor_(t.add_(0.5)).clamp_(0, 255)  # Pillow's intermediate uint8 image
        y = torch.matmul(ry, t)  # [B, h, H] @ [B, H, w] -> [B, h, w]
        return torch.floor_(y.add_(0.5)).clamp_(0, 255).to(torch.uint8)

    def _norm_lut(self) -> torch.Tensor:
        """[256, C] in `dtype`: grey level v -> the normalised value of each channel, computed by
        the same ops (addcmul in the compute dtype, then the cast) that normalise a whole batch."""
        if self._lut is None:
            v = torch.arange(256, dtype=self.cdtype, device=self.device).view(256, 1)  # [256, 1]
            self._lut = torch.addcmul(self._b, v, self._a255).to(self.dtype)  # [256, C]
        return self._lut

    def normalise_u8(self, u: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C', h, w] (C' = 1 or C) -> normalised [B, C, h, w] channels-last in `dtype`
        (gray -> C expansion by broadcasting, at the last moment).

        Gray (C' = 1): one row gather from a 256-entry table per pixel (index_select writes the
        C channels of a pixel side by side: channels-last as it comes). 2.4x the elementwise
        path on the CPU (43 vs 104 ms for 128 x 224 x 224 x 3 bf16), identical values."""
        if u.shape[1] == 1:
            b, _, h, w = u.shape
            out = torch.index_select(self._norm_lut(), 0, u.reshape(-1).to(torch.int32))  # [B*h*w, C]
            return out.view(b, h, w, self.in_chans).permute(0, 3, 1, 2)  # [B, C, h, w], channels-last strides
        y = u.permute(0, 2, 3, 1).to(self.cdtype)  # [B, h, w, C']
        out = torch.addcmul(self._b, y, self._a255)  # [B, h, w, C]
        return out.to(self.dtype).permute(0, 3, 1, 2)  # [B, C, h, w], channels-last strides

    def normalise_mixed(self, gray: torch.Tensor, colour: np.ndarray, col: torch.Tensor) -> torch.Tensor:
        """RandAugment.apply_gray's result -> normalised [B, C, h, w] channels-last: the gray table
        for every sample, then the colour samples' rows (col [B, C, h, w], where `colour` [B])."""
        out = self.normalise_u8(gray)  # [B, C, h, w] channels-last
        idx = np.flatnonzero(colour)
        if idx.size:
            it = torch.from_numpy(idx).to(self.device, non_blocking=True)
            out.index_copy_(0, it, self.normalise_u8(col.index_select(0, it)))
        return out

    def normalise_table(self, gray: torch.Tensor, colour: np.ndarray | None = None,
                        col: torch.Tensor | None = None) -> torch.Tensor:
        """The CPU's twin of normalise_u8 (gray [B, 1, h, w]) and normalise_mixed (with colour [B]
        and col [B, C, h, w]), equal bit for bit: each output value is copied from normalise_u8's
        table by a compiled loop over the batch (band_resample.normalise_table), instead of an
        int32 index copy of the batch and a gather, and the colour samples go straight to their
        rows instead of being written twice; into an output buffer no earlier batch's tensor still
        uses (band_resample.OutputBuffers). Returns [B, C, h, w] channels-last in `dtype`."""
        out = normalise_table(gray[:, 0], self._norm_lut(), colour, col, buffers=self._outputs)  # [B, h, w, C]
        return out.permute(0, 3, 1, 2)  # [B, C, h, w], channels-last strides

    def normalise(self, y: torch.Tensor) -> torch.Tensor:
        """[B, h, w] in [0, 1] -> [B, C, h, w] channels-last in `dtype` (for batches that arrive
        already cropped: DALI's GPU pipeline)."""
        out = torch.addcmul(self._b, y.unsqueeze(-1), self._a)  # [B, h, w, C]
        return out.to(self.dtype).permute(0, 3, 1, 2)  # [B, C, h, w], channels-last strides

    def apply(self, x: torch.Tensor, plan: AugPlan | None) -> torch.Tensor:
        if x.dim() == 4:  # [B, H, W, 1] (DALI HWC) -> [B, H, W]
            x = x[..., 0]
        if tuple(x.shape[1:]) != (self.H, self.W):
            raise ValueError(f"batch of shape {tuple(x.shape)} does not match the packed image size "
                             f"{(self.H, self.W)}")
        x = x.to(self.device, non_blocking=True)
        if self.train:
            if plan is None or len(plan.params) != x.shape[0]:
                raise ValueError("training augmentation needs the batch's plan (BatchAugment.plan)")
        b, s = x.shape[0], self.img_size
        if self.u8:
            if self.device.type == "cpu":  # K taps per pixel, compiled (see band_resample)
                u = resample_band_u8(x, plan.ry, plan.rxt)  # [B, h, w] uint8
            else:  # two dense batched matmuls: what a GPU does fastest
                u = self.resample_u8(x, *self.matrices(plan))
            u = u.unsqueeze(1)  # [B, 1, h, w] uint8
            if self.randaug is not None:
                if plan.randaug is None:
                    raise ValueError("RandAugment needs the batch's plan (BatchAugment.plan)")
                if self.ra_chans > 1:  # a colour fill: gray until a sample's first geometric op
                    gray, colour, col = self.randaug.apply_gray(u, plan.randaug, self.ra_chans, inplace=True)
                    if self.device.type == "cpu":
                        return self.normalise_table(gray, colour, col)
                    return self.normalise_mixed(gray, colour, col)
                u = self.randaug.apply(u, plan.randaug, inplace=True)  # [B, 1, h, w] uint8, u's own memory
            if self.device.type == "cpu":  # one compiled pass through the table (see normalise_table)
                return self.normalise_table(u)
            return self.normalise_u8(u)
        if self.train and self.device.type == "cpu":  # K taps per pixel, normalised, compiled
            out = resample_band_float(x, plan.ry, plan.rxt, [g / 255 for g in self.gains], self.biases)
            return out.to(self.dtype).permute(0, 3, 1, 2)  # [B, C, h, w], channels-last strides
        # shared eval matrices [h, H], [W+1, w*C]: the matmul broadcasts over the batch
        ry, rxt = self.matrices(plan) if self.train else self._eval_mats
        out = self.resample(x, ry, rxt).view(b, s, s, self.in_chans)  # [B, h, w, C]
        return out.to(self.dtype).permute(0, 3, 1, 2)  # [B, C, h, w], channels-last strides

    def __call__(self, x: torch.Tensor, params: CropParams | None = None,
                 rng: np.random.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.plan(x.shape[0], rng, params))
