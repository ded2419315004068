"""Fine-tuning augmentation end to end: data.randaug / data.interpolation through every loader, and the reference
loader running timm's own create_transform with the same settings (tiny SYNTHETIC phantom packs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fasttrain.config import DataConfig
from fasttrain.data import build_loader, open_packed
from fasttrain.data.base import LoaderError
from fasttrain.data.reference import export_png

pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")
POLICY = "rand-m6-mstd0.5-inc1"


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from fasttrain.converters.nih import convert_nih
    from fasttrain.converters.synthetic import generate_phantoms
    root = tmp_path_factory.mktemp("ftaug")
    src = generate_phantoms(root / "src", 24, seed=5, size=64, progress=False)
    out = convert_nih(src, root / "packed", formats=("raw", "ffcv", "dali"), size=64, progress=False, workers=1)
    return {"path": str(out), "png": str(export_png(open_packed(out, "train"), root / "png"))}


def _cfg(path, kind, **kw):
    return DataConfig(path=path, loader=kind, batch_size=8, num_workers=1, crop_scale=[0.08, 1.0],
                      interpolation="bicubic", randaug=POLICY, **kw)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_raw_loader_batch_is_batchaugment_with_its_plan(pack, in_chans):
    """The raw loader's training batch = crop + flip + RandAugment + normalise of the packed images
    with the plan drawn from the step's generator (the ops themselves are checked against timm in
    test_randaug.py / test_gpu_augment.py)."""
    ld = build_loader(_cfg(pack["path"], "raw"), "train", True, img_size=48, in_chans=in_chans)
    assert ld.augment.randaug is not None and ld.augment.interpolation == "bicubic"
    ld.set_epoch(2)
    step, idx = next(ld.sampler.batches())
    idx = np.sort(idx)
    plan = ld.augment.plan(len(idx), ld.sampler.rng(step))
    x, _, pos = next(iter(ld.iter_with_index()))
    assert torch.equal(pos, torch.from_numpy(idx)) and x.shape == (8, in_chans, 48, 48)
    images = torch.from_numpy(np.stack([open_packed(pack["path"], "train", "raw").image(int(i)) for i in idx]))
    assert torch.equal(x, ld.augment.apply(images, plan))
    assert plan.randaug.applied.any()


@pytest.mark.slow  # FFCV's numba compile: ~40 s on a loaded 2-core machine
@pytest.mark.parametrize("kind", ["ffcv", "dali"])
def test_ffcv_and_dali_loaders_apply_randaug(pack, kind):
    plain = DataConfig(path=pack["path"], loader=kind, batch_size=8, num_workers=1, crop_scale=[0.08, 1.0],
                       interpolation="bicubic")
    a = build_loader(_cfg(pack["path"], kind), "train", True, img_size=48, in_chans=1)
    b = build_loader(plain, "train", True, img_size=48, in_chans=1)
    assert a.augment.randaug is not None and b.augment.randaug is None
    if kind == "dali":  # the GPU pipeline leaves crop + RandAugment to BatchAugment (DALI's differ from timm's)
        assert not a.dali_augment
    a.set_epoch(0)
    b.set_epoch(0)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert xa.shape == xb.shape == (8, 1, 48, 48) and torch.isfinite(xa).all()
    assert torch.equal(ya, yb) and not torch.equal(xa, xb)  # same images and crops, RandAugment on top
    for ld in (a, b):
        getattr(ld, "close", lambda: None)()


def test_reference_runs_timm_create_transform_with_the_same_settings(pack):
    from timm.data.auto_augment import RandAugment
    from timm.data.transforms import RandomResizedCropAndInterpolation
    cfg = _cfg(pack["path"], "reference", reference_images=pack["png"])
    cfg.num_workers = 0  # in-process: the transform is what is tested, not the worker pool
    ref = build_loader(cfg, "train", True, img_size=48, in_chans=1)
    raw = build_loader(_cfg(pack["path"], "raw"), "train", True, img_size=48, in_chans=1)
    assert "timm create_transform" in ref.describe()
    tfs = ref.transform.transforms[0].transforms
    rrc = next(t for t in tfs if isinstance(t, RandomResizedCropAndInterpolation))
    ra = next(t for t in tfs if isinstance(t, RandAugment))
    assert tuple(rrc.scale) == (0.08, 1.0) and rrc.interpolation.value == "bicubic"
    assert [o.name for o in ra.ops] == list(raw.augment.randaug.ops) and ra.num_layers == 2
    hp = ra.ops[0].hparams
    assert hp["translate_const"] == raw.augment.randaug.hparams["translate_const"] == int(48 * 0.45)
    assert hp["img_mean"] == raw.augment.fill * 3  # gray fill: the 1-channel mean in grey levels
    assert hp["magnitude_std"] == 0.5 and ra.ops[0].magnitude == 6 and ra.ops[0].prob == 0.5
    ref.set_epoch(0)
    x, y = next(iter(ref))
    assert x.shape == (8, 1, 48, 48) and torch.isfinite(x).all()
    ref.set_epoch(0)
    assert torch.equal(x, next(iter(ref))[0])  # seeded per sample (random, numpy and torch)


def test_bad_policy_and_interpolation_are_loader_errors(pack):
    with pytest.raises(LoaderError, match="unknown key 'q'"):
        build_loader(DataConfig(path=pack["path"], loader="raw", randaug="rand-m6-q1"), "train", True, img_size=48,
                     in_chans=1)
    with pytest.raises(LoaderError, match="interpolation"):
        build_loader(DataConfig(path=pack["path"], loader="raw", interpolation="lanczos"), "train", True,
                     img_size=48, in_chans=1)
    with pytest.raises(LoaderError, match="unknown key 'q'"):
        build_loader(DataConfig(path=pack["path"], loader="reference", randaug="rand-m6-q1",
                                reference_images=pack["png"]), "train", True, img_size=48, in_chans=1)


def test_bench_loader_finetune_steady_state_json(pack, capsys):
    """`fasttrain bench loader --transform finetune`: every loader with Xiao's recipe against timm's
    transform, time-sized windows, the epoch start-up as its own figure."""
    import json

    from fasttrain.bench.loader import main
    rc = main(["--data", pack["path"], "--batch-size", "4", "--seconds", "0.05", "--windows", "1", "--img-size", "48",
               "--workers", "1", "--loaders", "reference,raw", "--reference-images", pack["png"],
               "--transform", "finetune", "--json"])
    assert rc == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["loader"] for r in recs] == ["reference", "raw"]
    for r in recs:
        assert r["transform"] == "finetune" and r["data_config"]["randaug"] == "rand-m6-mstd0.5-inc1"
        assert r["images_per_s"] > 0 and r["epoch_startup_s"] > 0 and r["seconds_per_window"] == 0.05
        assert r["skipped_batches_per_epoch"] == 3 and r["batches_per_epoch"] >= 4
    assert "timm create_transform" in recs[0]["source"]
    # a split no longer than the untimed batches: a clear error, not a hang
    assert main(["--data", pack["path"], "--batch-size", "8", "--skip", "3", "--windows", "1", "--img-size", "48",
                 "--workers", "1", "--loaders", "reference,raw", "--reference-images", pack["png"]]) == 2
    assert "untimed batches" in capsys.readouterr().err


@pytest.mark.slow  # a tiny fine-tuning run (2 steps) through the real trainer
def test_finetune_config_trains_with_xiao_augmentation(pack, tmp_path):
    """configs/finetune_nih.yaml (Xiao's recipe) drives `fasttrain finetune`: the resolved config
    carries the augmentation and the training loader runs RandAugment on the batches."""
    from fasttrain.config import build_config
    from fasttrain.train.finetune import run_finetune
    cfg = build_config("configs/finetune_nih.yaml", [
        f"--data.path={pack['path']}", f"--run.out={tmp_path / 'ft'}", "--data.val_split=null", "--data.loader=raw",
        "--data.batch_size=8", "--data.eval_resize=32", "--data.num_workers=0", "--model.img_size=32",
        "--model.patch_size=8", "--model.embed_dim=32", "--model.depth=2", "--model.num_heads=2",
        "--optim.epochs=1", "--run.max_steps=2", "--engine.compile=false", "--run.progress=false",
        "--run.tensorboard=false", "--run.ckpt_every=2", "--run.log_every=1"])
    assert (cfg.data.randaug, cfg.data.interpolation, cfg.data.crop_scale) == ("rand-m6-mstd0.5-inc1", "bicubic",
                                                                            [0.08, 1.0])
    calls = []
    from fasttrain.data import randaug as ra
    orig = ra.RandAugment.apply
    ra.RandAugment.apply = lambda self, x, plan, **kw: (calls.append(len(plan)), orig(self, x, plan, **kw))[1]
    try:
        run_finetune(cfg)
    finally:
        ra.RandAugment.apply = orig
    assert calls and all(n == 8 for n in calls)
    assert (tmp_path / "ft" / "checkpoints" / "last.pt").exists()
    assert "randaug: rand-m6-mstd0.5-inc1" in (tmp_path / "ft" / "config.yaml").read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalise_u8_gray_table_equals_elementwise(dtype):
    """The gray fast path of normalise_u8 (a 256-entry table, one row per pixel) gives the values
    and the channels-last layout of the elementwise path (taken for C' = C), imagenet and nih norms."""
    from fasttrain.data.gpu_augment import BatchAugment
    u = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 1, 9, 7), dtype=np.uint8))
    u[0, 0, :2, :2] = torch.tensor([[0, 255], [1, 254]], dtype=torch.uint8)
    for norm in ("imagenet", "nih"):
        aug = BatchAugment((16, 16), 9, 3, train=True, interpolation="bicubic", norm=norm, dtype=dtype)
        fast = aug.normalise_u8(u)  # [5, 3, 9, 7]
        plain = aug.normalise_u8(u.expand(5, 3, 9, 7))
        assert fast.dtype == dtype and fast.shape == (5, 3, 9, 7)
        assert fast.stride() == plain.stride() and fast.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(fast, plain)


def test_pretraining_crop_is_bicubic_in_every_loader(pack):
    """MAE's and Xiao et al.'s pre-training transform: RandomResizedCrop(scale (0.2, 1),
    interpolation=3) + flip, no RandAugment: the reference loader runs that torchvision transform,
    the packed loaders' BatchAugment the same filter."""
    import torchvision.transforms as T
    plain = dict(path=pack["path"], batch_size=8, num_workers=0)
    ref = build_loader(DataConfig(loader="reference", reference_images=pack["png"], **plain), "train", True,
                       img_size=48, in_chans=1)
    assert "PIL + torchvision" in ref.describe()
    rrc = next(t for t in ref.transform.transforms if isinstance(t, T.RandomResizedCrop))
    assert rrc.interpolation == T.InterpolationMode.BICUBIC and tuple(rrc.scale) == (0.2, 1.0)
    raw = build_loader(DataConfig(loader="raw", **plain), "train", True, img_size=48, in_chans=1)
    assert raw.augment.interpolation == "bicubic" and raw.augment.randaug is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_normalise_table_equals_normalise_u8_and_mixed(dtype):
    """The CPU's normalisation (BatchAugment.normalise_table: a compiled copy from the same table)
    gives normalise_u8's values and channels-last layout for a gray batch, and normalise_mixed's
    for gray samples beside colour ones (RandAugment.apply_gray's result), bit for bit."""
    from fasttrain.data.gpu_augment import BatchAugment
    rng = np.random.default_rng(1)
    u = torch.from_numpy(rng.integers(0, 256, (6, 1, 9, 7), dtype=np.uint8))
    col = torch.from_numpy(rng.integers(0, 256, (6, 3, 9, 7), dtype=np.uint8))
    colour = np.array([True, False, False, True, False, True])
    for c, norm in ((3, "imagenet"), (1, "imagenet"), (3, "nih")):
        aug = BatchAugment((16, 16), 9, c, train=True, interpolation="bicubic", norm=norm, dtype=dtype)
        got, want = aug.normalise_table(u), aug.normalise_u8(u)  # [6, c, 9, 7]
        assert got.dtype == dtype and got.stride() == want.stride() and torch.equal(got, want)
        if c == 3:
            got, want = aug.normalise_table(u, colour, col), aug.normalise_mixed(u, colour, col)
            assert got.stride() == want.stride() and torch.equal(got, want)
    with pytest.raises(ValueError, match=r"col uint8 \[6, 3, 9, 7\]"):
        aug.normalise_table(u, colour, col[:, :1])


def test_output_buffers_reuse_only_what_no_tensor_uses():
    """normalise_table's output buffers (band_resample.OutputBuffers) are overwritten only once
    no tensor or view over them lives: a batch the caller keeps (or a view of it) keeps its values."""
    from fasttrain.data.band_resample import OutputBuffers, normalise_table
    rng = np.random.default_rng(2)
    lut = torch.randn(256, 3).to(torch.bfloat16)
    grays = [torch.from_numpy(rng.integers(0, 256, (4, 6, 5), dtype=np.uint8)) for _ in range(6)]
    pool = OutputBuffers(keep=3)
    first = normalise_table(grays[0], lut, buffers=pool)
    ptr = first.data_ptr()
    view = first.permute(0, 3, 1, 2)[1:]  # what BatchAugment hands out: a view
    del first
    second = normalise_table(grays[1], lut, buffers=pool)
    assert second.data_ptr() != ptr and torch.equal(view, lut[grays[0].long()].permute(0, 3, 1, 2)[1:])
    del view
    third = normalise_table(grays[2], lut, buffers=pool)
    assert third.data_ptr() == ptr  # free again: reused, no new pages
    assert torch.equal(second, lut[grays[1].long()]) and torch.equal(third, lut[grays[2].long()])
    kept = [second, third] + [normalise_table(g, lut, buffers=pool) for g in grays[3:]]
    assert len({t.data_ptr() for t in kept}) == 5  # all alive: all distinct
    for t, g in zip(kept, grays[1:]):
        assert torch.equal(t, lut[g.long()])
