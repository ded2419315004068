"""Batched crop / flip / resize / normalise of uint8 image batches on the device.

Every packed loader delivers uint8 batches `[B, H, W]` (grayscale, as the converters store them)
and this module turns a whole batch into normalised float images `[B, C, h, w]` (channels-last)
with a fixed number of tensor ops per batch, never a Python loop over samples (airbench:
"it's faster to load+process uint8 data").

How: a crop followed by a bilinear resize is linear along each axis, so for sample b
    out[b] = Ry[b] @ img[b] @ Rx[b]^T        Ry: [B, h, H], Rx: [B, w, W]
two batched matmuls. Ry/Rx hold the bilinear weights of the crop box; a horizontal flip reverses
the rows of Rx, and 1/255 is folded into Ry, so the flip and the scaling cost nothing. The
per-channel normalisation (and the expansion of gray to 3 channels, done at the very last moment)
is one fused multiply-add that writes the channels-last output.

The weights are PIL's bilinear filter (Pillow `ImagingResample`: triangle kernel whose support
widens by the downscale factor, i.e. antialiased when shrinking), so the result equals
torchvision's PIL path `resized_crop(img, top, left, h, w, size, BILINEAR)` up to PIL's 8-bit
rounding (PIL rounds to uint8 after each pass: <= 1 grey level apart; see tests/test_augment.py).

Why not roi_align / grid_sample: they are bilinear *point* samplers (no antialias when the crop
is larger than the output), and measured slower on CPU (~2.4x the PIL reference vs ~4.3x here).
Why hand-written at all: no library op does a batched per-sample crop+resize with PIL semantics
(DALI does on GPU, and the DALI loader uses it there).

Crop parameters follow torchvision's `RandomResizedCrop.get_params` (10 attempts of area-scale x
log-uniform aspect ratio, then the central-crop fallback), drawn for the whole batch at once from
a seeded `torch.Generator`, so (seed, epoch, step) fixes every draw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
    """One crop box per sample, in source-image pixels, plus a flip flag."""
    top: torch.Tensor  # [B] int64
    left: torch.Tensor  # [B] int64
    height: torch.Tensor  # [B] int64
    width: torch.Tensor  # [B] int64
    flip: torch.Tensor  # [B] bool

    def __len__(self) -> int:
        return int(self.top.shape[0])


def sample_crop_params(n: int, height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                       hflip: float = 0.5, generator: torch.Generator | None = None) -> CropParams:
    """torchvision RandomResizedCrop.get_params + RandomHorizontalFlip for `n` samples at once.

    Same distribution as torchvision (10 attempts, first one that fits, else the central crop with
    the aspect ratio clamped into `ratio`); only the order of the random draws differs.
    """
    attempts = 10
    area = float(height * width)
    u = torch.rand(n, attempts, 2, generator=generator, dtype=torch.float64)  # [n, 10, 2]
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # [n, 10]
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])  # [n, 10]
    w = torch.round(torch.sqrt(target_area * aspect)).long()  # [n, 10]
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [n, 10]
    first = torch.argmax(ok.to(torch.int8), dim=1)  # [n] first attempt that fits (0 if none)
    any_ok = ok.any(dim=1)  # [n]
    w = w.gather(1, first[:, None])[:, 0]  # [n]
    h = h.gather(1, first[:, None])[:, 0]

    # Fallback: central crop, aspect ratio clamped into `ratio` (torchvision's rule).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))

    uo = torch.rand(n, 3, generator=generator, dtype=torch.float64)  # [n, 3] top, left, flip
    top = torch.floor(uo[:, 0] * (height - h + 1)).long()  # uniform integer in [0, H - h]
    left = torch.floor(uo[:, 1] * (width - w + 1)).long()
    top = torch.where(any_ok, top, (height - h) // 2)
    left = torch.where(any_ok, left, (width - w) // 2)
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


def pil_bilinear_weights(box0: torch.Tensor, box1: torch.Tensor, in_len: int, out_len: int,
                         flip: torch.Tensor | None = None, dtype=torch.float32,
                         device=None, gain: float = 1.0, out: torch.Tensor | None = None,
                         transposed: bool = False) -> torch.Tensor:
    """Weights [B, out_len, in_len] (or [B, in_len, out_len] when `transposed`) that resample pixels [box0, box1) of an axis of length in_len
    to out_len pixels with PIL's bilinear filter (reversed output order where `flip`), x `gain`.

    Built compact (K taps per output pixel, K = 2 * ceil(support) + 1) and written into a zeroed
    matrix with one index_put: computing the dense triangle over all in_len inputs costs more than
    the matmul itself. `out` (a reused [B, out_len, in_len] buffer) avoids fresh pages each batch.
    """
    device = torch.device(device) if device is not None else box0.device
    # float32 is exact enough (positions < 2^12, weights to ~1e-7) and halves the traffic of float64
    box0 = box0.to(device, torch.float32)
    box1 = box1.to(device, torch.float32)
    b = box0.shape[0]
    scale = (box1 - box0) / out_len  # [B] input pixels per output pixel
    fscale = torch.clamp(scale, min=1.0)  # [B] antialias: widen the kernel when shrinking
    # taps per output pixel; the crop sizes are known on the host, so no device sync here
    k = min(in_len, 2 * int(math.ceil(float(in_len) / out_len if b else 1.0)) + 1)
    i = torch.arange(out_len, dtype=torch.float32, device=device)  # [out]
    center = box0[:, None] + (i[None, :] + 0.5) * scale[:, None]  # [B, out]
    if flip is not None:
        center = torch.where(flip.to(device)[:, None], center.flip(1), center)  # reversed output
    # first tap (PIL's xmin), shifted to keep the K-window inside [0, in_len): the taps that carry
    # weight lie inside the box, so the shifted window still holds them, and indices stay distinct
    j0 = torch.floor(center - fscale[:, None] + 0.5).clamp_(0, in_len - k)  # [B, out]
    j = j0[..., None] + torch.arange(k, dtype=torch.float32, device=device)  # [B, out, K]
    w = torch.clamp(1.0 - torch.abs(j + 0.5 - center[..., None]) / fscale[:, None, None], min=0.0)
    w = w * ((j >= box0[:, None, None]) & (j < box1[:, None, None]))  # [B, out, K] inside the box
    w = w * (gain / w.sum(-1, keepdim=True))  # rows sum to gain (PIL normalises the same way)
    base = torch.arange(b, device=device).view(b, 1, 1) * (in_len * out_len)  # [B, 1, 1]
    o = torch.arange(out_len, device=device).view(1, out_len, 1)  # [1, out, 1]
    if transposed:
        flat = (base + j.long() * out_len + o).view(-1)  # [B * out * K] positions in [B, in, out]
        shape = (b, in_len, out_len)
    else:
        flat = (base + o * in_len + j.long()).view(-1)  # [B * out * K] positions in [B, out, in]
        shape = (b, out_len, in_len)
    if out is None:
        out = torch.zeros(shape, dtype=dtype, device=device)
    else:
        out.zero_()
    out.view(-1).index_put_((flat,), w.to(dtype).view(-1))  # distinct positions: no accumulate
    return out  # [B, out, in] or [B, in, out]


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # bf16 matmuls: exact for uint8 inputs, ~2.5x fp32 on this CPU (avx512_bf16) and on GPUs.
    # fp16 on CPU is slow and fp32 is what tests compare against PIL with, so anything else -> fp32.
    if dtype == torch.bfloat16:
        return torch.bfloat16
    if dtype == torch.float16 and device.type == "cuda":
        return torch.float16
    return torch.float32


class BatchAugment:
    """uint8 [B, H, W] on the device -> normalised float [B, C, h, w] channels-last.

    train=True: RandomResizedCrop(img_size, scale, ratio) + horizontal flip with prob `hflip`.
    train=False: Resize(eval_resize_size(...)) + CenterCrop(img_size), deterministic.
    """

    def __init__(self, image_size: tuple[int, int], img_size: int, in_chans: int, *, train: bool,
                 scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, norm: str = "imagenet",
                 eval_resize: int = 256, device="cpu", dtype=torch.float32):
        self.H, self.W = int(image_size[0]), int(image_size[1])
        self.img_size, self.in_chans, self.train = int(img_size), int(in_chans), bool(train)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cdtype = _compute_dtype(dtype, self.device)
        mean, std = norm_stats(norm, in_chans)
        # out = x01 * (1/std) - mean/std, x01 = resampled pixels / 255 (the 1/255 is in Ry)
        self._a = torch.tensor([1.0 / s for s in std], dtype=self.cdtype, device=self.device)  # [C]
        self._b = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=self.cdtype, device=self.device)  # [C]
        self._bufs: dict[str, torch.Tensor] = {}
        self.eval_resize = eval_resize_size((self.H, self.W), self.img_size, eval_resize)
        self._eval_mats = None if train else self._build_eval_mats()

    # -- stages ---------------------------------------------------------------------------------
    def _build_eval_mats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Resize(R) weights over the full image, then the rows/cols of the center crop."""
        rh, rw = _resized_hw(self.H, self.W, self.eval_resize)
        s = self.img_size
        top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))  # torchvision CenterCrop
        zero = torch.zeros(1)
        ry = pil_bilinear_weights(zero, torch.tensor([float(self.H)]), self.H, rh, gain=1 / 255)
        rx = pil_bilinear_weights(zero, torch.tensor([float(self.W)]), self.W, rw)
        ry = ry[0, top:top + s].to(self.device, self.cdtype)  # [h, H]
        rxt = rx[0, left:left + s].t().contiguous().to(self.device, self.cdtype)  # [W, w]
        return ry, rxt

    def sample(self, n: int, generator: torch.Generator | None) -> CropParams:
        """Crop + flip draws for one batch (train only)."""
        return sample_crop_params(n, self.H, self.W, self.scale, self.ratio, self.hflip, generator)

    def matrices(self, p: CropParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample Ry [B, h, H] (x 1/255) and Rx^T [B, W, w] (flip folded in)."""
        s, b = self.img_size, len(p)
        ry = pil_bilinear_weights(p.top, p.top + p.height, self.H, s, dtype=self.cdtype, gain=1 / 255,
                                  device=self.device, out=self._buffer("ry", (b, s, self.H)))
        rxt = pil_bilinear_weights(p.left, p.left + p.width, self.W, s, flip=p.flip, dtype=self.cdtype,
                                   device=self.device, out=self._buffer("rxt", (b, self.W, s)),
                                   transposed=True)
        return ry, rxt  # [B, h, H], [B, W, w]

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused workspace: fresh multi-MB allocations cost page faults on every batch on CPU
        (measured: zeros of the [256, 224, 256] weights took longer than filling them). Safe to
        reuse because each batch's ops are queued in order on one stream/thread."""
        buf = self._bufs.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape):
            buf = self._bufs[name] = torch.empty(shape, dtype=self.cdtype, device=self.device)
        return buf

    def resample(self, x: torch.Tensor, ry: torch.Tensor, rxt: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W] -> [B, h, w] in [0, 1], two (batched) matmuls."""
        b = x.shape[0]
        xf = self._buffer("x", tuple(x.shape))
        xf.copy_(x)  # [B, H, W] exact: bf16 holds 0..255
        tmp = torch.matmul(ry, xf, out=self._buffer("tmp", (b, ry.shape[-2], self.W)))  # [B, h, W]
        return torch.matmul(tmp, rxt, out=self._buffer("y", (b, ry.shape[-2], rxt.shape[-1])))  # [B, h, w]

    def normalise(self, y: torch.Tensor) -> torch.Tensor:
        """[B, h, w] in [0, 1] -> [B, C, h, w] channels-last in `dtype`; gray -> C channels here,
        at the last moment, so everything before works on one channel."""
        out = torch.addcmul(self._b, y.unsqueeze(-1), self._a)  # [B, h, w, C]
        return out.to(self.dtype).permute(0, 3, 1, 2)  # [B, C, h, w], channels-last strides

    def __call__(self, x: torch.Tensor, params: CropParams | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() == 4:  # [B, H, W, 1] (DALI HWC) -> [B, H, W]
            x = x[..., 0]
        if x.shape[1:] != (self.H, self.W):
            raise ValueError(f"batch of shape {tuple(x.shape)} does not match the packed image size "
                             f"{(self.H, self.W)}")
        x = x.to(self.device, non_blocking=True)
        if self.train:
            p = params if params is not None else self.sample(x.shape[0], generator)
            ry, rxt = self.matrices(p)
        else:
            ry, rxt = self._eval_mats  # shared [h, H], [W, w]: matmul broadcasts over the batch
        return self.normalise(self.resample(x, ry, rxt))
