"""BatchAugment (batched crop/flip/resize/normalise) against torchvision's PIL path.

Tolerance: PIL resamples uint8 images in fixed point and rounds to uint8 after each of its two
passes, we keep floats: outputs agree within 1 grey level (1/255 before normalisation) in fp32.
"""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from fasttrain.data.gpu_augment import (IMAGENET_MEAN, IMAGENET_STD, BatchAugment, CropParams, eval_resize_size,
                                        norm_stats, sample_crop_params)

GREY = 1.0 / 255


def _images(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 60 + 120 * np.sin(xx / 5.0) * np.cos(yy / 7.0)  # structure, so misplaced pixels show
    return np.clip(base[None] + rng.normal(0, 30, (n, h, w)), 0, 255).astype(np.uint8)  # [n, h, w]


def _unnormalise(x, norm, c):
    mean, std = norm_stats(norm, c)
    return x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


@pytest.mark.parametrize("h,w,size,norm,c", [(64, 64, 56, "nih", 1), (40, 52, 32, "imagenet", 3),
                                            (37, 29, 48, "imagenet", 1)])
def test_train_crop_equals_torchvision_resized_crop_and_flip(h, w, size, norm, c):
    imgs = _images(12, h, w, seed=h)
    aug = BatchAugment((h, w), size, c, train=True, norm=norm, scale=(0.08, 1.0))
    p = aug.sample(len(imgs), np.random.default_rng(3))
    p.flip[:2] = [True, False]  # both cases present
    out = aug(torch.from_numpy(imgs), params=p)  # [n, c, size, size]
    assert out.shape == (12, c, size, size) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    got = _unnormalise(out, norm, c)
    for b in range(len(imgs)):
        im = Image.fromarray(imgs[b]).convert("RGB")
        ref = TF.resized_crop(im, int(p.top[b]), int(p.left[b]), int(p.height[b]), int(p.width[b]), [size, size],
                              T.InterpolationMode.BILINEAR)
        if p.flip[b]:
            ref = TF.hflip(ref)
        ref = TF.to_tensor(ref)[:c]  # [c, size, size] in [0, 1]
        assert (got[b] - ref).abs().max().item() <= GREY + 1e-5, b


def test_bf16_output_close_to_fp32():
    imgs = torch.from_numpy(_images(8, 64, 64))
    g = lambda: np.random.default_rng(5)  # noqa: E731
    a32 = BatchAugment((64, 64), 48, 3, train=True)
    a16 = BatchAugment((64, 64), 48, 3, train=True, dtype=torch.bfloat16)
    o32, o16 = a32(imgs, rng=g()), a16(imgs, rng=g())
    assert o16.dtype == torch.bfloat16 and o16.is_contiguous(memory_format=torch.channels_last)
    d = (_unnormalise(o16.float(), "imagenet", 3) - _unnormalise(o32, "imagenet", 3)).abs()
    assert d.mean().item() < 0.5 * GREY and d.max().item() < 4 * GREY


@pytest.mark.parametrize("h,w,size,resize,c,norm", [
    (64, 64, 56, 256, 3, "imagenet"),  # 64-px demo pack: resize clamps to 64, center crop 56
    (64, 64, 64, 256, 1, "imagenet"),  # whole image
    (64, 64, 40, 48, 1, "nih"),  # real downscale 64 -> 48, crop 40
    (50, 70, 32, 40, 3, "imagenet"),  # non-square: shorter side -> 40
    (32, 32, 32, 256, 1, "nih"),
])
def test_eval_transform_equals_torchvision_resize_center_crop(h, w, size, resize, c, norm):
    imgs = _images(6, h, w, seed=size)
    aug = BatchAugment((h, w), size, c, train=False, norm=norm, eval_resize=resize)
    r = eval_resize_size((h, w), size, resize)
    assert r == max(size, min(resize, h, w))
    out = aug(torch.from_numpy(imgs))
    assert out.shape == (6, c, size, size) and out.is_contiguous(memory_format=torch.channels_last)
    mean, std = norm_stats(norm, c)
    tf = T.Compose([T.Resize(r, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(mean * (3 // c), std * (3 // c))])
    for b in range(len(imgs)):
        ref = tf(Image.fromarray(imgs[b]).convert("RGB"))[:c]
        d = ((out[b] - ref).abs() * torch.tensor(std).view(-1, 1, 1)).max().item()
        assert d <= GREY + 1e-5, (b, d)
    assert torch.equal(out, aug(torch.from_numpy(imgs)))  # no randomness


def test_crop_params_follow_torchvision_distribution():
    n, h, w, scale, ratio = 6000, 256, 256, (0.2, 1.0), (3 / 4, 4 / 3)
    p = sample_crop_params(n, h, w, scale, ratio, 0.5, np.random.default_rng(0))
    assert ((p.top >= 0) & (p.left >= 0) & (p.top + p.height <= h) & (p.left + p.width <= w)).all()
    area = torch.from_numpy(p.height * p.width).double() / (h * w)
    logr = torch.from_numpy(np.log(p.width / p.height))
    # rounding of w, h to integers widens the range by < 1 px per side
    assert area.min() >= scale[0] * 0.98 and area.max() <= 1.0
    assert logr.min() >= math.log(ratio[0]) - 0.02 and logr.max() <= math.log(ratio[1]) + 0.02
    torch.manual_seed(0)
    tv = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, h, w), list(scale), list(ratio))
                       for _ in range(n)], dtype=torch.float64)  # [n, 4] top, left, h, w
    tv_area, tv_logr = tv[:, 2] * tv[:, 3] / (h * w), torch.log(tv[:, 3] / tv[:, 2])
    for ours, theirs in ((area, tv_area), (logr, tv_logr)):
        se = math.sqrt(ours.var() / n + theirs.var() / n)
        assert abs(ours.mean() - theirs.mean()) < 5 * se
        assert abs(ours.std() - theirs.std()) < 0.1 * theirs.std()
    # the crop position is uniform over the free range: mean relative offset 1/2
    free = (h - p.height).astype(np.float64)
    rel = torch.from_numpy(p.top[free > 20] / free[free > 20])
    assert abs(rel.mean().item() - 0.5) < 0.03
    # flips: binomial(n, 0.5) within 5 sigma
    assert abs(p.flip.mean() - 0.5) < 5 * math.sqrt(0.25 / n)
    p0 = sample_crop_params(2000, h, w, scale, ratio, 0.0, np.random.default_rng(1))
    assert not p0.flip.any()


def test_crop_fallback_when_no_attempt_fits():
    # aspect range far outside a very wide image: every attempt fails -> central crop, clamped ratio
    p = sample_crop_params(50, 10, 200, (0.9, 1.0), (0.9, 1.1), 0.5, np.random.default_rng(0))
    assert (p.height == 10).all() and (p.width == 11).all()  # round(10 * 1.1)
    assert (p.top == 0).all() and (p.left == (200 - 11) // 2).all()


def test_same_generator_same_output_and_flip_mirrors():
    imgs = torch.from_numpy(_images(5, 48, 48))
    aug = BatchAugment((48, 48), 32, 1, train=True, norm="nih")
    a = aug(imgs, rng=np.random.default_rng(7))
    b = aug(imgs, rng=np.random.default_rng(7))
    c = aug(imgs, rng=np.random.default_rng(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    p = aug.sample(5, np.random.default_rng(9))
    q = CropParams(p.top, p.left, p.height, p.width, ~p.flip)
    assert torch.allclose(aug(imgs, params=p), aug(imgs, params=q).flip(-1), atol=1e-5)


def test_norm_stats():
    assert norm_stats("imagenet", 3) == (IMAGENET_MEAN, IMAGENET_STD)
    m, s = norm_stats("imagenet", 1)
    assert m[0] == pytest.approx(0.449) and s[0] == pytest.approx(0.226)
    assert norm_stats("nih", 3) == ((0.5056,) * 3, (0.252,) * 3)
    with pytest.raises(ValueError, match="data.norm"):
        norm_stats("cifar", 1)
    with pytest.raises(ValueError, match="in_chans"):
        norm_stats("nih", 2)


def test_wrong_batch_shape_is_a_clear_error():
    aug = BatchAugment((32, 32), 24, 1, train=False)
    with pytest.raises(ValueError, match="packed image size"):
        aug(torch.zeros(2, 30, 32, dtype=torch.uint8))


def test_device_taps_equal_host_taps():
    """pil_taps runs on numpy (CPU loaders) or torch tensors (CUDA: on the device); same result."""
    from fasttrain.data.gpu_augment import pil_taps
    p = sample_crop_params(64, 96, 80, (0.08, 1.0), (0.5, 2.0), 0.5, np.random.default_rng(4))
    for box0, box1, n_in, tr, flip in ((p.top, p.top + p.height, 96, False, None),
                                       (p.left, p.left + p.width, 80, True, p.flip)):
        f_np, w_np = pil_taps(box0, box1, n_in, 56, flip=flip, gain=0.5, transposed=tr)
        f_t, w_t = pil_taps(torch.from_numpy(box0), torch.from_numpy(box1), n_in, 56,
                            flip=None if flip is None else torch.from_numpy(flip), gain=0.5,
                            strides=(n_in * 56, 1, 56) if tr else None)
        assert np.array_equal(f_np, f_t.numpy()) and np.allclose(w_np, w_t.numpy(), atol=1e-6)
        assert len(np.unique(f_np)) == len(f_np)  # distinct positions: index_put needs no accumulate


@pytest.mark.parametrize("c", [1, 3])
def test_normalise_matches_folded_normalisation(c):
    """`normalise` (DALI GPU path: batches already cropped, in [0, 1]) = the normalisation folded
    into the matmuls (identity geometry: eval at the packed size)."""
    imgs = torch.from_numpy(_images(4, 32, 32))
    aug = BatchAugment((32, 32), 32, c, train=False, eval_resize=256)
    assert torch.allclose(aug(imgs), aug.normalise(imgs.float() / 255), atol=1e-5)


@pytest.mark.parametrize("c,dtype", [(1, torch.float32), (3, torch.bfloat16)])
def test_device_tap_path_equals_host_path(c, dtype):
    """The CUDA path of `plan` (taps computed with torch ops from the boxes, channel taps
    concatenated as tensors, scattered from tensors into the reused buffers) run on CPU tensors:
    same batch as the host path, over two batches so the sparse reset of the buffers is exercised."""
    host = BatchAugment((40, 52), 32, c, train=True, scale=(0.08, 1.0), dtype=dtype)
    dev = BatchAugment((40, 52), 32, c, train=True, scale=(0.08, 1.0), dtype=dtype)
    dev.host_taps = False
    for seed in (5, 6):
        x = torch.from_numpy(_images(6, 40, 52, seed))
        p = host.sample(6, np.random.default_rng(seed))
        plan = dev.plan(6, params=p)
        assert isinstance(plan.ry[0], torch.Tensor) and isinstance(plan.rxt[1], torch.Tensor)
        a, b = host.apply(x, host.plan(6, params=p)), dev.apply(x, plan)
        assert b.is_contiguous(memory_format=torch.channels_last) and b.dtype == dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)


# ----------------------------------------------------------------------------- uint8 path

def _to_grey_levels(out, norm, c):
    return (_unnormalise(out.float(), norm, c) * 255).round()  # [n, c, h, w] grey levels


@pytest.mark.parametrize("h,w,size,c,interp", [(64, 64, 56, 1, "bicubic"), (40, 52, 32, 3, "bicubic"),
                                               (37, 29, 48, 1, "bicubic"), (45, 45, 31, 1, "bilinear")])
def test_uint8_crop_equals_pillow_resized_crop(h, w, size, c, interp):
    """The uint8 path (two passes, each rounded to uint8 as Pillow does) within 1 grey level of
    torchvision's PIL resized_crop, downscaling (antialiased) and upscaling, bicubic and bilinear."""
    imgs = _images(10, h, w, seed=h + 1)
    aug = BatchAugment((h, w), size, c, train=True, norm="imagenet", scale=(0.08, 1.0), interpolation=interp,
                       randaug="rand-m6-p0" if interp == "bilinear" else None)  # p0: uint8 path, no op applied
    assert aug.u8
    p = aug.sample(len(imgs), np.random.default_rng(3))
    p.flip[:2] = [True, False]
    got = _to_grey_levels(aug(torch.from_numpy(imgs), params=p), "imagenet", c)
    mode = T.InterpolationMode.BICUBIC if interp == "bicubic" else T.InterpolationMode.BILINEAR
    pil = Image.Resampling.BICUBIC if interp == "bicubic" else Image.Resampling.BILINEAR
    for b in range(len(imgs)):
        t, l, hh, ww = (int(v[b]) for v in (p.top, p.left, p.height, p.width))
        im = Image.fromarray(imgs[b]).convert("RGB")
        ref = TF.resized_crop(im, t, l, hh, ww, [size, size], mode)
        # Pillow's algorithm with its classic pass order (Resample.c: horizontal, round to uint8, vertical)
        two = im.crop((l, t, l + ww, t + hh)).resize((size, hh), pil).resize((size, size), pil)
        ref, two = (torch.from_numpy(np.array(TF.hflip(r) if p.flip[b] else r)).permute(2, 0, 1)[:c].float()
                    for r in (ref, two))
        assert (got[b] - two).abs().max().item() <= 1, b
        # Pillow 13 itself runs the vertical pass first for some shapes (other intermediate rounding)
        assert (got[b] - ref).abs().mean().item() <= 0.5, b


def test_eval_ignores_crop_interpolation_and_randaug():
    """data.interpolation / data.randaug are the training crop's: evaluation keeps the bilinear
    Resize + CenterCrop that evaluate, predict and export share."""
    imgs = torch.from_numpy(_images(4, 64, 64, seed=9))
    plain = BatchAugment((64, 64), 40, 1, train=False, norm="nih", eval_resize=48)
    ft = BatchAugment((64, 64), 40, 1, train=False, norm="nih", eval_resize=48, interpolation="bicubic",
                      randaug="rand-m6-mstd0.5-inc1")
    assert not ft.u8 and ft.randaug is None and torch.equal(ft(imgs), plain(imgs))


@pytest.mark.parametrize("c,norm", [(1, "imagenet"), (3, "imagenet"), (1, "nih")])
def test_finetune_pipeline_equals_timm_ops(c, norm, timm_op):
    """crop + flip + RandAugment + normalise on a batch = Pillow's bicubic resized crop, flip and
    timm's own ops with the plan's draws and create_transform's hparams, image by image (within 1
    grey level mean absolute difference away from a 2-px border: the crop's <= 1 level rounding
    differences can move an equalize bucket or a warp tap)."""
    h, w, size, n = 48, 52, 40, 16
    imgs = _images(n, h, w, seed=c)
    aug = BatchAugment((h, w), size, c, train=True, norm=norm, scale=(0.08, 1.0), interpolation="bicubic",
                       randaug="rand-m6-mstd0.5-inc1-p0.9")
    assert aug.ra_chans == (3 if (c == 3 and norm == "imagenet") else 1)  # colour fill needs 3 channels
    plan = aug.plan(n, np.random.default_rng(0))
    got = _to_grey_levels(aug.apply(torch.from_numpy(imgs), plan), norm, c)
    mean, _ = norm_stats(norm, c)
    mean3 = mean * (3 // c)
    hp = dict(translate_const=int(size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean3),
              interpolation=Image.Resampling.BICUBIC)
    p, r = plan.params, plan.randaug
    for b in range(n):
        im = TF.resized_crop(Image.fromarray(imgs[b]).convert("RGB"), int(p.top[b]), int(p.left[b]),
                             int(p.height[b]), int(p.width[b]), [size, size], T.InterpolationMode.BICUBIC)
        im = TF.hflip(im) if p.flip[b] else im
        for layer in range(r.op.shape[0]):
            if r.applied[layer, b]:
                im = timm_op(aug.randaug.ops[r.op[layer, b]], im, float(r.magnitude[layer, b]),
                             bool(r.negate[layer, b]), hp)
        ref = torch.from_numpy(np.array(im)).permute(2, 0, 1)[:c].float()
        d = (got[b] - ref).abs()[:, 2:-2, 2:-2]
        assert d.mean().item() <= 1.0, (b, d.mean().item())
    assert r.applied.any(axis=0).sum() > n // 2  # ops were applied to most samples


def test_randaug_plan_is_seeded_and_eval_ignores_it():
    imgs = torch.from_numpy(_images(6, 40, 40))
    aug = BatchAugment((40, 40), 32, 1, train=True, interpolation="bicubic", randaug="rand-m9-mstd0.5-inc1-p1")
    a = aug(imgs, rng=np.random.default_rng(1))
    assert torch.equal(a, aug(imgs, rng=np.random.default_rng(1)))
    assert not torch.equal(a, aug(imgs, rng=np.random.default_rng(2)))
    ev = BatchAugment((40, 40), 32, 1, train=False, interpolation="bicubic", randaug="rand-m9-mstd0.5-inc1")
    assert ev.randaug is None and torch.equal(ev(imgs), ev(imgs))
    with pytest.raises(ValueError, match="interpolation"):
        BatchAugment((40, 40), 32, 1, train=True, interpolation="lanczos")


def test_device_tap_path_equals_host_path_uint8_bicubic():
    """The CUDA plan (taps from torch ops on the device) on CPU tensors, for the uint8 bicubic +
    RandAugment path: the same batch as the host-numpy plan."""
    kw = dict(train=True, scale=(0.08, 1.0), interpolation="bicubic", randaug="rand-m6-mstd0.5-inc1")
    host, dev = BatchAugment((40, 52), 32, 1, **kw), BatchAugment((40, 52), 32, 1, **kw)
    dev.host_taps = False
    for seed in (5, 6):
        x = torch.from_numpy(_images(6, 40, 52, seed))
        a = host.apply(x, host.plan(6, np.random.default_rng(seed)))
        plan = dev.plan(6, np.random.default_rng(seed))
        assert isinstance(plan.ry[0], torch.Tensor)
        torch.testing.assert_close(dev.apply(x, plan), a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("h,w,size,interp", [(64, 64, 56, "bicubic"), (37, 29, 48, "bicubic"), (40, 52, 31, "bilinear"),
                                             (17, 23, 1, "bicubic"), (5, 7, 3, "bilinear")])
def test_banded_resample_equals_dense_matmul_path(h, w, size, interp):
    """The CPU's banded crop (band_resample, K taps per pixel) is the dense-matmul uint8 path's twin:
    the same taps, passes and roundings, so within 1 grey level and nearly always identical
    (float sums in another order can land on the other side of a .5); any thread count alike."""
    from fasttrain.data.band_resample import resample_band_u8
    x = torch.from_numpy(_images(12, h, w, seed=size))
    aug = BatchAugment((h, w), size, 1, train=True, scale=(0.08, 1.0), interpolation=interp, randaug="rand-m6-p0")
    plan = aug.plan(12, np.random.default_rng(size))
    plan.params.flip[:2] = [True, False]
    dense = aug.resample_u8(x, *aug.matrices(plan))  # [12, size, size]
    band = resample_band_u8(x, plan.ry, plan.rxt, threads=1)
    assert band.dtype == torch.uint8 and band.shape == dense.shape
    d = (band.int() - dense.int()).abs()
    assert d.max().item() <= 1 and (d > 0).float().mean().item() < 0.01
    assert torch.equal(resample_band_u8(x, plan.ry, plan.rxt, threads=5), band)


def test_banded_resample_bad_input_is_a_clear_error():
    from fasttrain.data.band_resample import resample_band_u8
    aug = BatchAugment((20, 20), 16, 1, train=True, interpolation="bicubic")
    plan = aug.plan(4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        resample_band_u8(torch.zeros(4, 20, 20), plan.ry, plan.rxt)
    with pytest.raises(ValueError, match="taps for 4"):
        resample_band_u8(torch.zeros(3, 20, 20, dtype=torch.uint8), plan.ry, plan.rxt)
    with pytest.raises(ValueError, match="outside the image"):
        resample_band_u8(torch.zeros(4, 12, 12, dtype=torch.uint8), plan.ry, plan.rxt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_three_channel_randaug_on_gray_equals_three_channel_path(dtype):
    """With ImageNet's colour fill on 3 channels, BatchAugment runs RandAugment on the gray image
    (RandAugment.apply_gray) and normalises gray and colour samples apart: the same output as
    RandAugment on the 3-channel copy, then the per-channel normalisation."""
    from fasttrain.data.band_resample import resample_band_u8
    aug = BatchAugment((40, 52), 32, 3, train=True, scale=(0.08, 1.0), interpolation="bicubic",
                       randaug="rand-m9-mstd0.5-inc1", norm="imagenet", dtype=dtype)
    assert aug.ra_chans == 3
    x = torch.from_numpy(_images(24, 40, 52, seed=9))
    for seed in (1, 2):
        plan = aug.plan(24, np.random.default_rng(seed))
        u = resample_band_u8(x, plan.ry, plan.rxt).unsqueeze(1)  # [24, 1, 32, 32]
        want = aug.normalise_u8(aug.randaug.apply(u.expand(24, 3, 32, 32), plan.randaug))
        got = aug.apply(x, plan)
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, want), seed


@pytest.mark.parametrize("c,norm", [(1, "imagenet"), (3, "imagenet"), (1, "nih")])
def test_banded_float_crop_equals_dense_matmul_path(c, norm):
    """The CPU's pre-training crop (band_resample.resample_band_float: K taps per pixel, normalised)
    against the dense fused matmuls over the same plan, fp32: equal up to float rounding."""
    from fasttrain.data.band_resample import resample_band_float
    h, w, size = 45, 39, 32
    aug = BatchAugment((h, w), size, c, train=True, norm=norm)  # bilinear: the fused path
    assert not aug.u8
    x = torch.from_numpy(_images(9, h, w, seed=c))
    plan = aug.plan(9, np.random.default_rng(c))
    plan.params.flip[:2] = [True, False]
    dense = aug.resample(x, *aug.matrices(plan)).view(9, size, size, c)  # [9, h, w, C]
    band = resample_band_float(x, plan.ry, plan.rxt, [g / 255 for g in aug.gains], aug.biases, threads=2)
    torch.testing.assert_close(band, dense, rtol=0, atol=1e-4)
    torch.testing.assert_close(aug.apply(x, plan), band.permute(0, 3, 1, 2), rtol=0, atol=0)
