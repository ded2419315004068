"""fasttrain.data.randaug against timm's own op functions and RandAugment transform.

Each op runs on the same images with the same magnitude and sign as timm's (`NAME_TO_OP[name]` fed
`LEVEL_TO_ARG[name]`, timm's sign drawn from our negate flag), with the hparams create_transform
sets. Tolerances: pixel ops within 1 grey level everywhere; geometric ops within 1 grey
level mean absolute difference away from a 2-pixel border (float32 vs Pillow's double coordinates
can move a tap across a pixel edge).
"""
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as taa

from fasttrain.data import randaug as ra

PIXEL_OPS = [n for n in ra.OP_NAMES if n not in ra.GEOMETRIC]
GEO_OPS = list(ra.GEOMETRIC)


def _images(n, h, w, c=1, seed=0):
    """X-ray-like structure plus noise, and a few flat / saturated areas (autocontrast/equalize edges)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for b in range(n):
        base = 90 + 70 * np.sin(xx / (4.0 + b) + b) * np.cos(yy / 6.0) + 0.3 * yy
        img = base[..., None] + rng.normal(0, 12, (h, w, c))
        img[: h // 6, : w // 5] = 255 if b % 2 else 3
        if b % 3 == 2:  # low-contrast image
            img = 100 + img / 8
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)  # [n, h, w, c]


def _ours(name, imgs, mags, negs, c, fill, interp):
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()  # [n, c, h, w]
    mean = (fill,) if c == 1 else (fill, fill - 8, fill - 20)
    out = ra.apply_op(name, x, torch.tensor(mags), torch.tensor(negs), img_mean=mean,
                      translate_const=int(0.45 * imgs.shape[1]), interpolation=interp)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    return out.permute(0, 2, 3, 1).numpy(), mean


def _compare(timm_op, name, imgs, mags, negs, c, interp, fill=124):
    got, mean = _ours(name, imgs, mags, negs, c, fill, interp)
    hp = dict(translate_const=int(0.45 * imgs.shape[1]), img_mean=tuple(mean) * (3 if c == 1 else 1),
              interpolation=Image.Resampling.BICUBIC if interp == "bicubic" else Image.Resampling.BILINEAR)
    for b in range(len(imgs)):
        pil = Image.fromarray(imgs[b, ..., 0]).convert("RGB") if c == 1 else Image.fromarray(imgs[b])
        ref = np.asarray(timm_op(name, pil, float(mags[b]), bool(negs[b]), hp)).astype(np.int16)
        ref = ref[..., :1] if c == 1 else ref  # gray-native: the RGB copy's (equal) channels
        if c == 1 and ref.ndim == 3:
            assert (np.asarray(timm_op(name, pil, float(mags[b]), bool(negs[b]), hp)).std(-1) == 0).all()
        diff = np.abs(got[b].astype(np.int16) - ref.reshape(got[b].shape))
        if name in ra.GEOMETRIC:
            inner = diff[2:-2, 2:-2]
            assert inner.mean() <= 1.0, (name, b, mags[b], negs[b], inner.mean())
        else:
            assert diff.max() <= 1, (name, b, mags[b], negs[b], diff.max(), np.argwhere(diff > 1)[:5])


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", PIXEL_OPS)
def test_pixel_op_equals_timm(name, c, timm_op):
    n = 8
    imgs = _images(n, 33, 41, c, seed=len(name))  # odd sizes
    mags = np.array([0.0, 1.3, 3.0, 5.0, 6.0, 7.7, 9.2, 10.0])
    negs = np.array([False, True] * 4)
    _compare(timm_op, name, imgs, mags, negs, c, "bicubic")


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", GEO_OPS)
def test_geometric_op_equals_timm(name, c, interp, timm_op):
    n = 6
    imgs = _images(n, 37, 30, c, seed=7)
    mags = np.array([0.0, 2.5, 6.0, 6.4, 8.0, 10.0])
    negs = np.array([False, True, False, True, True, False])
    _compare(timm_op, name, imgs, mags, negs, c, interp)


def test_ops_at_224_and_batch_of_one(timm_op):
    imgs = _images(1, 224, 224, 1, seed=3)
    for name in ("Rotate", "ShearX", "TranslateYRel", "Equalize", "SharpnessIncreasing", "ContrastIncreasing"):
        _compare(timm_op, name, imgs, np.array([6.3]), np.array([True]), 1, "bicubic")


def test_gray_native_equals_rgb_copy_with_gray_fill():
    g = _images(5, 29, 31, 1, seed=11)
    x1 = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()
    x3 = x1.expand(-1, 3, -1, -1).contiguous()
    for name in ra.OP_NAMES:
        o1 = ra.apply_op(name, x1, torch.full((5,), 7.0), torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool),
                         img_mean=(114, 114, 114), interpolation="bicubic")
        o3 = ra.apply_op(name, x3, torch.full((5,), 7.0), torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool),
                         img_mean=(114, 114, 114), interpolation="bicubic")
        assert torch.equal(o3, o1.expand(-1, 3, -1, -1)), name


def test_posterize_increasing_at_10_keeps_zero_bits():
    x = torch.from_numpy(_images(2, 16, 16, 1)).permute(0, 3, 1, 2).contiguous()
    out = ra.apply_op("PosterizeIncreasing", x, torch.tensor([10.0, 9.9]), torch.tensor([False, False]))
    assert out[0].max() == 0  # 0 bits kept: black (older Pillow / TF), not an exception
    assert torch.equal(out[1], x[1] & 0x80)  # 1 bit


def test_bad_inputs_are_clear_errors():
    x = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown RandAugment op 'Cutout'"):
        ra.apply_op("Cutout", x, torch.zeros(2), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="uint8"):
        ra.apply_op("Invert", x.float(), torch.zeros(2), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="not gray"):
        ra.apply_op("Rotate", x, torch.full((2,), 5.0), torch.zeros(2, dtype=torch.bool), img_mean=(124, 116, 104))


# ----------------------------------------------------------------------------- the policy string

def test_parse_policy_like_timm():
    p = ra.parse_policy("rand-m6-mstd0.5-inc1")
    assert (p.magnitude, p.num_layers, p.prob, p.magnitude_std, p.increasing) == (6, 2, 0.5, 0.5, True)
    assert p.ops == tuple(taa._RAND_INCREASING_TRANSFORMS)
    p = ra.parse_policy("rand-m9-n3-mstd101-p0.7-mmax12")
    assert (p.magnitude, p.num_layers, p.prob, p.magnitude_std, p.magnitude_max) == (9, 3, 0.7, math.inf, 12)
    assert p.ops == tuple(taa._RAND_TRANSFORMS)
    t = taa.rand_augment_transform("rand-m9-n3-mstd0.5-inc1", {})
    assert [o.name for o in t.ops] == list(ra.parse_policy("rand-m9-n3-mstd0.5-inc1").ops) and t.num_layers == 3


@pytest.mark.parametrize("bad,match", [
    ("rand-m6-q3", "unknown key 'q'"), ("rand-m6-foo", "'foo' has no value"), ("augmix-m3", "must start with 'rand'"),
    ("rand-m6.5", "bad value '6.5' for 'm'"), ("rand-tweights", "not implemented"), ("rand-p1.5", "0 <= p <= 1"),
    ("", "must be a string"),
])
def test_bad_policy_strings(bad, match):
    with pytest.raises(ra.PolicyError, match=match):
        ra.parse_policy(bad)


# ----------------------------------------------------------------------------- policy statistics

def _timm_draws(policy: str, n: int):
    """Record (op name, magnitude) of every op timm's transform applies, per image."""
    t = taa.rand_augment_transform(policy, dict(translate_const=100, img_mean=(124, 124, 124)))
    log = []
    for op in t.ops:
        def fake(img, *args, _name=op.name, **kw):
            log[-1].append(_name)
            return img
        op.aug_fn = fake
        lf = op.level_fn
        op.level_fn = (lambda m, hp, _lf=lf: (mags.append(m), _lf(m, hp) if _lf else ())[1])
    mags: list[float] = []
    random.seed(0)
    np.random.seed(0)
    img = Image.new("L", (4, 4))
    for _ in range(n):
        log.append([])
        t(img)
    return log, np.array(mags)


def test_policy_statistics_match_timm():
    n, policy = 20000, "rand-m6-mstd0.5-inc1"
    tlog, tmag = _timm_draws(policy, n)
    aug = ra.RandAugment(policy)
    plan = aug.sample(n, np.random.default_rng(1))
    ops = aug.ops
    # ops applied per image: Binomial(2, 0.5) -> counts of 0/1/2
    ours_k = np.bincount(plan.applied.sum(0), minlength=3) / n
    timm_k = np.bincount([len(x) for x in tlog], minlength=3) / n
    se = np.sqrt(0.25 * 2 / n) * 4
    assert np.abs(ours_k - timm_k).max() < se and np.abs(ours_k - [0.25, 0.5, 0.25]).max() < se
    # op frequencies among applied ops
    ours_f = np.bincount(plan.op[plan.applied], minlength=len(ops)) / plan.applied.sum()
    tc = Counter(x for row in tlog for x in row)
    timm_f = np.array([tc[o] for o in ops]) / sum(tc.values())
    p = 1 / len(ops)
    tol = 4 * math.sqrt(2 * p * (1 - p) / plan.applied.sum())
    assert np.abs(ours_f - timm_f).max() < tol, (ours_f, timm_f)
    # magnitude distribution: mean, std, quantiles
    om = plan.magnitude[plan.applied]
    assert abs(om.mean() - tmag.mean()) < 4 * 0.5 * math.sqrt(2 / len(om))
    assert abs(om.std() - tmag.std()) < 0.02
    assert np.abs(np.quantile(om, [0.05, 0.5, 0.95]) - np.quantile(tmag, [0.05, 0.5, 0.95])).max() < 0.03
    # negation: half the time
    assert abs(plan.negate.mean() - 0.5) < 4 * math.sqrt(0.25 / plan.negate.size)


def test_uniform_magnitude_and_clipping():
    plan = ra.RandAugment("rand-m9-mstd101-p1").sample(20000, np.random.default_rng(0))
    m = plan.magnitude.ravel()
    assert m.min() >= 0 and m.max() <= 9 and abs(m.mean() - 4.5) < 0.06 and plan.applied.all()
    plan = ra.RandAugment("rand-m9-mstd5").sample(20000, np.random.default_rng(0))
    assert plan.magnitude.max() == 10.0 and plan.magnitude.min() == 0.0  # clipped to [0, 10]


def test_batch_apply_equals_per_op_apply():
    """RandAugment.apply (one call per (layer, op) over its samples) = apply_op sample by sample."""
    aug = ra.RandAugment("rand-m6-mstd0.5-inc1-p0.8", img_mean=(114, 114, 114), translate_const=13,
                         interpolation="bicubic")
    x = torch.from_numpy(_images(24, 30, 30, 1, seed=4)).permute(0, 3, 1, 2).contiguous()
    plan = aug.sample(24, np.random.default_rng(2))
    out = aug.apply(x, plan)
    for b in range(24):
        y = x[b:b + 1]
        for layer in range(2):
            if plan.applied[layer, b]:
                y = ra.apply_op(aug.ops[plan.op[layer, b]], y, torch.tensor([plan.magnitude[layer, b]]),
                                torch.tensor([plan.negate[layer, b]]), img_mean=(114, 114, 114), translate_const=13,
                                interpolation="bicubic")
        assert torch.equal(out[b:b + 1], y), b


@pytest.mark.parametrize("policy", ["rand-m6-mstd0.5-inc1", "rand-m9-n3-p1-mstd0.5"])
def test_gray_apply_with_colour_fill_equals_three_channel_apply(policy):
    """RandAugment on the gray image with a per-channel fill (ImageNet's mean: 124, 116, 104) gives
    exactly the 3-channel result on its RGB copy: gray until a sample's first geometric op, which
    writes each channel's fill outside the image, then 3 channels for its later ops (pixel ops on
    colour samples included: autocontrast / equalize per channel, colour, contrast on luma)."""
    aug = ra.RandAugment(policy, img_mean=(124, 116, 104), translate_const=14, interpolation="bicubic")
    x = torch.from_numpy(_images(32, 33, 31, c=1)).permute(0, 3, 1, 2).contiguous()  # [32, 1, 33, 31]
    turned = 0
    for seed in range(4):
        plan = aug.sample(32, np.random.default_rng(seed))
        want = aug.apply(x.expand(32, 3, 33, 31), plan)  # [32, 3, 33, 31]
        gray, colour, col = aug.apply_gray(x, plan, 3)
        got = torch.where(torch.from_numpy(colour).view(-1, 1, 1, 1), col, gray.expand(32, 3, 33, 31))
        assert torch.equal(got, want), seed
        assert not (want[~torch.from_numpy(colour)].diff(dim=1) != 0).any()  # gray ones are gray
        turned += int(colour.sum())
    assert 0 < turned < 4 * 32
    with pytest.raises(ValueError, match="gray batch"):
        aug.apply_gray(x.expand(32, 3, 33, 31), plan, 3)


# ----------------------------------------------------------------------------- compiled CPU warps

@pytest.mark.parametrize("c,fill", [(1, (90,)), (1, (124, 116, 104)), (3, (124, 116, 104))])
@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (13, 2), (37, 30), (64, 61)])
def test_compiled_warps_equal_torch_twins(c, fill, h, w):
    """On the CPU the geometric ops run compiled (band_resample.warp_affine_u8 / warp_rows_u8);
    the torch warps (what CUDA runs) are their plain twins: the same bytes, for both filters in
    one batch, angles and shifts past the image's edge, a gray image with a colour fill, and row
    and column moves. Bit for bit where torch's addcmul is a fused multiply-add (AVX2 / AVX-512
    kernels, as the compiled row warp computes it); within 1 grey level on a CPU without them."""
    from fasttrain.data import band_resample as br
    rng = np.random.default_rng(h * 100 + w + c)
    n = 6
    x = torch.from_numpy(_images(n, h, w, c, seed=h + w)).permute(0, 3, 1, 2).contiguous()  # [n, c, h, w]
    f = torch.tensor(fill, dtype=torch.uint8)
    bic = np.array([True, False] * (n // 2))
    tol = 0 if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else 1
    ang = rng.uniform(-45, 45, n)
    coeffs = ra.affine_coeffs("Rotate", ang, h, w)
    want = ra.warp_affine(x, torch.from_numpy(coeffs), f, torch.from_numpy(bic))
    got = br.warp_affine_u8(x, coeffs, f, bic, threads=2)
    assert got.shape == (n, len(fill), h, w) and torch.equal(got, want)
    for name, scale in (("ShearX", 0.4), ("ShearY", 0.4), ("TranslateXRel", 0.7), ("TranslateYRel", 1.2)):
        sh, columns = ra.row_shifts(name, rng.normal(0, scale, n), h, w)
        if columns:
            want = ra.warp_rows(x.transpose(2, 3), torch.from_numpy(sh), f, torch.from_numpy(bic)).transpose(2, 3)
        else:
            want = ra.warp_rows(x, torch.from_numpy(sh), f, torch.from_numpy(bic))
        got = br.warp_rows_u8(x, sh, f, bic, columns=columns, threads=2)
        assert got.shape == want.shape
        assert (got.to(torch.int16) - want.to(torch.int16)).abs().max() <= tol, name


def test_cpu_geometric_ops_run_the_compiled_warps(monkeypatch):
    x = torch.from_numpy(_images(4, 20, 18, 3)).permute(0, 3, 1, 2).contiguous()
    args = (torch.full((4,), 6.0), torch.tensor([True, False] * 2))
    want = {name: ra.apply_op(name, x, *args, interpolation="bicubic") for name in GEO_OPS}
    for fn in ("warp_affine", "warp_rows"):
        monkeypatch.setattr(ra, fn, lambda *a, **k: pytest.fail("the CPU ran a torch warp"))
    for name in GEO_OPS:
        assert torch.equal(ra.apply_op(name, x, *args, interpolation="bicubic"), want[name]), name


def test_compiled_warps_bad_input_is_a_clear_error():
    from fasttrain.data import band_resample as br
    x = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    f = torch.tensor([128], dtype=torch.uint8)
    with pytest.raises(ValueError, match="CPU uint8"):
        br.warp_affine_u8(x.float(), np.zeros((2, 6)), f, np.zeros(2, bool))
    with pytest.raises(ValueError, match="fill of 2 channels for a 3-channel batch"):
        br.warp_rows_u8(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), np.zeros((2, 8)), f.repeat(2), np.zeros(2, bool))
    with pytest.raises(ValueError, match="affine coefficients"):
        br.warp_affine_u8(x, np.zeros((3, 6)), f, np.zeros(2, bool))
    with pytest.raises(ValueError, match=r"shifts \(2, 7\)"):
        br.warp_rows_u8(x, np.zeros((2, 7)), f, np.zeros(2, bool), columns=True)


def _plain(monkeypatch, fn):
    """fn() with the torch ops on the CPU too (the plain twins), then compiled again."""
    with monkeypatch.context() as m:
        m.setattr(ra, "COMPILED_ON_CPU", False)
        return fn()


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("h,w", [(1, 1), (2, 9), (3, 3), (33, 41)])
def test_compiled_pixel_ops_equal_torch_twins(c, h, w, monkeypatch):
    """Every op on the CPU (tables, histograms, Sharpness and the warps compiled) against the same
    op with the torch ops: the same bytes, magnitudes 0-10 with both signs, tiny and odd sizes,
    flat and saturated areas (the table ops' edges)."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("torch's CPU kernels without AVX2 do not fuse addcmul: the row warps differ by 1 level")
    x = torch.from_numpy(_images(8, h, w, c, seed=h * w)).permute(0, 3, 1, 2).contiguous()
    mags = torch.tensor([0.0, 1.3, 3.0, 5.0, 6.0, 7.7, 9.2, 10.0])
    negs = torch.tensor([False, True] * 4)
    mean = (118, 118, 118) if c == 1 else (124, 116, 104)
    for name in ra.OP_NAMES:
        def run():
            return ra.apply_op(name, x, mags, negs, img_mean=mean, translate_const=int(0.45 * h),
                               rng=np.random.default_rng(0))
        got, want = run(), _plain(monkeypatch, run)
        assert torch.equal(got, want), name


@pytest.mark.parametrize("policy", ["rand-m6-mstd0.5-inc1", "rand-m9-n3-p1-mstd0.5"])
def test_compiled_randaugment_equals_torch_twin(policy, monkeypatch):
    """The whole policy on the CPU, compiled vs torch ops, gray and the gray-with-colour-fill path."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("torch's CPU kernels without AVX2 do not fuse addcmul: the row warps differ by 1 level")
    aug = ra.RandAugment(policy, img_mean=(124, 116, 104), translate_const=14, interpolation="random")
    gray_aug = ra.RandAugment(policy, img_mean=(114, 114, 114), translate_const=14, interpolation="random")
    x = torch.from_numpy(_images(40, 35, 32, c=1, seed=5)).permute(0, 3, 1, 2).contiguous()
    for seed in range(3):
        plan = aug.sample(40, np.random.default_rng(seed))
        got = gray_aug.apply(x, plan)
        assert torch.equal(got, _plain(monkeypatch, lambda: gray_aug.apply(x, plan))), seed
        got = aug.apply_gray(x, plan, 3)
        want = _plain(monkeypatch, lambda: aug.apply_gray(x, plan, 3))
        assert np.array_equal(got[1], want[1]) and torch.equal(got[0], want[0]), seed
        assert torch.equal(got[2][got[1]], want[2][want[1]]), seed


def test_inplace_apply_writes_into_the_batch():
    """BatchAugment hands RandAugment its own crop output: inplace=True skips the batch copy and
    gives the same bytes; without it the input is left as it was."""
    aug = ra.RandAugment("rand-m9-n3-p1-mstd0.5", img_mean=(124, 116, 104), translate_const=10, interpolation="random")
    x = torch.from_numpy(_images(12, 23, 21, c=1, seed=3)).permute(0, 3, 1, 2).contiguous()
    plan = aug.sample(12, np.random.default_rng(0))
    keep = x.clone()
    gray_aug = ra.RandAugment("rand-m9-n3-p1-mstd0.5", img_mean=(110,) * 3, translate_const=10)
    want = gray_aug.apply(x, plan)
    assert torch.equal(x, keep)
    y = x.clone()
    assert gray_aug.apply(y, plan, inplace=True) is y and torch.equal(y, want)
    want = aug.apply_gray(x, plan, 3)
    assert torch.equal(x, keep)
    got = aug.apply_gray(y.copy_(x), plan, 3, inplace=True)
    assert got[0] is y and torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
