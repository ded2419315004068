"""Loaders end to end on tiny packed datasets written by the real converters.

Two fixtures: "coded" (flat images whose grey value is the image's row in the source CSV, so every
crop of it still says which image it is: label alignment under random order) and "phantoms"
(textured SYNTHETIC phantoms: pixel equality across loaders with the eval transform).
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.config import DataConfig
from fasttrain.data import build_loader, open_packed
from fasttrain.data.base import LoaderError, Prefetcher
from fasttrain.data.gpu_augment import norm_stats
from fasttrain.data.reference import export_png

KINDS = ("raw", "ffcv", "dali", "reference")
# numba (under FFCV) raises in a weakref finalizer when a compiled closure is collected: harmless, not ours
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")
GREY = 1.0 / 255


def _convert(src, out, size, formats=("raw", "ffcv", "dali"), shard_size=4096):
    from fasttrain.converters.nih import convert_nih
    return convert_nih(src, out, formats=formats, size=size, progress=False, workers=1, shard_size=shard_size)


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """96 flat 32-px images, grey value = CSV row k; packed in all formats, DALI in 3 shards."""
    from fasttrain.converters.synthetic import generate_phantoms
    root = tmp_path_factory.mktemp("coded")
    src = generate_phantoms(root / "src", 96, seed=1, size=32, progress=False)
    rows = (src / "Data_Entry_2017_v2020.csv").read_text().splitlines()[1:]
    names = [r.split(",")[0] for r in rows]
    for k, name in enumerate(names):
        Image.fromarray(np.full((32, 32), 2 * k + 20, np.uint8)).save(src / "images" / name)
    out = _convert(src, root / "packed", 32, shard_size=30)
    return {"path": str(out), "code_of": {n: k for k, n in enumerate(names)}}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from fasttrain.converters.synthetic import generate_phantoms
    root = tmp_path_factory.mktemp("phantoms")
    src = generate_phantoms(root / "src", 24, seed=2, size=64, progress=False)
    out = _convert(src, root / "packed", 64)
    pngs = export_png(open_packed(out, "train"), root / "png_train")
    return {"path": str(out), "png": str(pngs)}


def _cfg(path, kind, **kw):
    return DataConfig(path=path, loader=kind, batch_size=kw.pop("batch_size", 8), num_workers=kw.pop("num_workers", 1),
                      **kw)


def _epoch(loader, epoch=0, start_step=0):
    """All batches of one epoch as (images, labels, positions) tensors per batch."""
    loader.set_epoch(epoch, start_step)
    return [(x, y, i) for x, y, i in loader.iter_with_index()]


def _decode_code(x, norm="imagenet"):
    """Grey value of flat images [B, C, h, w] -> the CSV row k (value = 2k + 20)."""
    c = x.shape[1]
    mean, std = norm_stats(norm, c)
    v = x[:, 0].float().mean(dim=(1, 2)) * std[0] + mean[0]  # [B] in [0, 1]
    return torch.round((v * 255 - 20) / 2).long()


# ----------------------------------------------------------------------------- pixels

def test_eval_same_pixels_across_loaders(phantoms):
    out = {}
    for kind in KINDS:
        extra = {"reference_images": phantoms["png"]} if kind == "reference" else {}
        ld = build_loader(_cfg(phantoms["path"], kind, **extra), "train", False, img_size=56, in_chans=3)
        batches = _epoch(ld)
        assert len(batches) == len(ld) and sum(len(b[2]) for b in batches) == ld.num_samples == ld.dataset_size
        x = torch.cat([b[0] for b in batches])
        assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(ld.dataset_size))  # eval: in order
        assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
        out[kind] = x * torch.tensor(norm_stats("imagenet", 3)[1]).view(1, 3, 1, 1)  # in [0, 1] units
    assert torch.equal(out["raw"], out["ffcv"])
    assert (out["reference"] - out["raw"]).abs().max().item() <= GREY + 1e-5  # PIL's rounding
    assert (out["dali"] - out["raw"]).abs().mean().item() < 2 * GREY  # JPEG q95 (converters' tolerance)
    # the reference loader reading the source files (64-px phantom PNGs == packed pixels here)
    ld = build_loader(_cfg(phantoms["path"], "reference"), "train", False, img_size=56, in_chans=3)
    assert "source files" in ld.describe()
    x = torch.cat([b[0] for b in _epoch(ld)]) * torch.tensor(norm_stats("imagenet", 3)[1]).view(1, 3, 1, 1)
    assert (x - out["raw"]).abs().max().item() <= GREY + 1e-5


def test_training_batches_same_pixels_raw_vs_reference(phantoms):
    """Crop/flip semantics: the raw loader's batch equals the reference transform applied with the
    same crop boxes (our draws are batched, so compare through the drawn parameters), with the
    default crop filter: bicubic, MAE's RandomResizedCrop(interpolation=3)."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    ld = build_loader(_cfg(phantoms["path"], "raw", norm="nih"), "train", True, img_size=48, in_chans=1)
    ld.set_epoch(3)
    step, idx = next(ld.sampler.batches())
    idx = np.sort(idx)
    p = ld.augment.sample(len(idx), ld.sampler.rng(step))
    x, _, pos = next(iter(ld.iter_with_index()))
    assert torch.equal(pos, torch.from_numpy(idx))
    packed = open_packed(phantoms["path"], "train", "raw")
    for b in range(len(idx)):
        im = Image.fromarray(packed.image(int(idx[b]))).convert("RGB")
        r = TF.resized_crop(im, int(p.top[b]), int(p.left[b]), int(p.height[b]), int(p.width[b]), [48, 48],
                            T.InterpolationMode.BICUBIC)
        r = TF.to_tensor(TF.hflip(r) if p.flip[b] else r)[0]
        got = x[b, 0] * 0.252 + 0.5056
        assert (got - r).abs().max().item() <= GREY + 1e-5


# ----------------------------------------------------------------------------- labels and order

@pytest.mark.parametrize("kind", KINDS)
def test_labels_aligned_under_random_order(coded, kind):
    packed = open_packed(coded["path"], "train")
    ld = build_loader(_cfg(coded["path"], kind), "train", True, img_size=24, in_chans=1, seed=5)
    batches = _epoch(ld, epoch=1)
    assert len(batches) == len(ld) == packed.count // 8
    pos = torch.cat([b[2] for b in batches])
    assert len(set(pos.tolist())) == len(pos) == ld.num_samples  # no repeats within the epoch
    assert not torch.equal(pos, torch.arange(len(pos)))
    for x, y, i in batches:
        k = _decode_code(x)
        expect_k = torch.tensor([coded["code_of"][packed.ids[j]] for j in i.tolist()])
        assert torch.equal(k, expect_k), kind  # pixels belong to the position the loader reports
        assert torch.equal(y, torch.from_numpy(packed.labels[i.numpy()])), kind  # and so do the labels
    # the plain iterator yields the same images and labels (device tensors)
    ld.set_epoch(1)
    for (x, y), (x2, y2, _) in zip(ld, batches):
        assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("kind", KINDS)
def test_determinism_and_mid_epoch_resume(coded, kind):
    def make():
        return build_loader(_cfg(coded["path"], kind), "train", True, img_size=24, in_chans=3, seed=11,
                            batch_size=6)
    a, b = make(), make()
    full = _epoch(a, epoch=2)
    again = _epoch(b, epoch=2)
    for (x, y, i), (x2, y2, i2) in zip(full, again, strict=True):
        assert torch.equal(i, i2) and torch.equal(x, x2) and torch.equal(y, y2)
    other = _epoch(b, epoch=3)
    assert not all(torch.equal(p[2], q[2]) for p, q in zip(full, other))
    resumed = _epoch(make(), epoch=2, start_step=3)  # a fresh loader, as after a restart
    assert len(resumed) == len(full) - 3
    for (x, y, i), (x2, y2, i2) in zip(full[3:], resumed, strict=True):
        assert torch.equal(i, i2) and torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [2, 3])
def test_simulated_ranks_are_disjoint_and_cover(coded, kind, world):
    n = open_packed(coded["path"], "train").count
    evals, trains, lens = [], [], []
    for rank in range(world):
        ev = build_loader(_cfg(coded["path"], kind), "train", False, img_size=24, in_chans=1, rank=rank,
                          world_size=world)
        evals.append(torch.cat([b[2] for b in _epoch(ev)]).tolist())
        tr = build_loader(_cfg(coded["path"], kind), "train", True, img_size=24, in_chans=1, rank=rank,
                          world_size=world, seed=3)
        trains.append(torch.cat([b[2] for b in _epoch(tr, epoch=1)]).tolist())
        lens.append(len(tr))
    flat = [j for r in evals for j in r]
    assert sorted(flat) == list(range(n))  # evaluation: disjoint and covering, nothing dropped
    flat = [j for r in trains for j in r]
    assert len(set(flat)) == len(flat)  # training: disjoint
    assert len(set(lens)) == 1  # every rank runs the same number of steps (DDP)
    assert len(flat) == world * lens[0] * 8 and len(flat) > n - world * 8


@pytest.mark.parametrize("kind", ["ffcv", "dali", "reference"])
@pytest.mark.parametrize("world", [1, 2])
def test_every_loader_reads_the_raw_loaders_order(coded, kind, world):
    """One permutation per (seed, epoch), DDP shards of it: each rank's batches hold the images the
    raw loader's batches hold, epoch after epoch (not a buffer shuffle of the file order, not
    FFCV's page-aware QUASI_RANDOM)."""
    for rank in range(world):
        def batches(k, epoch):
            ld = build_loader(_cfg(coded["path"], k), "train", True, img_size=24, in_chans=1, rank=rank,
                              world_size=world, seed=7)
            return [sorted(b[2].tolist()) for b in _epoch(ld, epoch=epoch)]
        for epoch in (0, 1):
            assert batches(kind, epoch) == batches("raw", epoch), (kind, rank, epoch)


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_reads_every_image_once_on_any_world_size(coded, kind):
    """A split whose size no world size divides: the ranks' eval shards together hold every image
    exactly once (no padding repeats, nothing dropped), on every loader."""
    n = open_packed(coded["path"], "test").count
    for world in (1, 2, 5, 7):
        pos = [j for rank in range(world) for b in _epoch(build_loader(
            _cfg(coded["path"], kind), "test", False, img_size=24, in_chans=1, rank=rank, world_size=world))
            for j in b[2].tolist()]
        assert sorted(pos) == list(range(n)), (kind, world, n)
    assert any(n % w for w in (2, 5, 7))  # some world size leaves a remainder


# ----------------------------------------------------------------------------- DDP, real processes

def test_ddp_two_gloo_processes_disjoint_and_cover(coded, tmp_path, gloo_positions):
    r = gloo_positions({k: _cfg(coded["path"], k) for k in ("raw", "ffcv")}, tmp_path)
    n = open_packed(coded["path"], "train").count
    for key in r[0]:
        a, b = r[0][key]["pos"], r[1][key]["pos"]
        assert r[0][key]["len"] == r[1][key]["len"], key
        if key.endswith("-False"):  # our sampler for both: exact cover, no repeats
            assert sorted(a + b) == list(range(n)), key
        else:
            assert not set(a) & set(b), key  # training shards are disjoint
            assert len(set(a + b)) >= n - 2 * 8 - 1, key  # and cover all but the dropped tail


# ----------------------------------------------------------------------------- bad input

def test_ffcv_loader_keeps_torch_threads(coded):
    """FFCV's Loader and epoch iterator set torch's thread count to num_workers; the trainer's
    matmuls must keep the threads it chose."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        loader = build_loader(_cfg(coded["path"], "ffcv", num_workers=1), "train", True, img_size=32, in_chans=1)
        _epoch(loader)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bad_input_errors(coded, tmp_path):
    from fasttrain.converters.synthetic import generate_phantoms
    with pytest.raises(LoaderError, match="data.path is not set"):
        build_loader(DataConfig(), "train", True, img_size=24, in_chans=1)
    with pytest.raises(LoaderError, match="no manifest.json"):
        build_loader(_cfg(str(tmp_path), "auto"), "train", True, img_size=24, in_chans=1)
    with pytest.raises(LoaderError, match="no split 'val'"):
        build_loader(_cfg(coded["path"], "raw"), "val", True, img_size=24, in_chans=1)
    with pytest.raises(LoaderError, match="data.loader must be"):
        build_loader(_cfg(coded["path"], "jpeg"), "train", True, img_size=24, in_chans=1)
    with pytest.raises(LoaderError, match="smaller than img_size 64"):
        build_loader(_cfg(coded["path"], "raw"), "train", True, img_size=64, in_chans=1)
    src = generate_phantoms(tmp_path / "src", 8, seed=0, size=32, progress=False)
    raw_only = _convert(src, tmp_path / "raw_only", 32, formats=("raw",))
    with pytest.raises(LoaderError, match="format 'ffcv' was not written.*--format ffcv"):
        build_loader(_cfg(str(raw_only), "ffcv"), "train", True, img_size=24, in_chans=1)
    assert build_loader(_cfg(str(raw_only), "auto"), "train", True, img_size=24, in_chans=1).name == "raw"
    with pytest.raises(LoaderError, match="PNGs missing"):
        build_loader(_cfg(str(raw_only), "reference", reference_images=str(tmp_path)), "train", True,
                     img_size=24, in_chans=1)


@pytest.mark.parametrize("kind,module,hint", [("ffcv", "ffcv.loader", r"pip install -e \.\[ffcv\].*apt-get"),
                                              ("dali", "nvidia.dali", r"pip install -e \.\[dali\]")])
def test_missing_library_names_the_install(coded, monkeypatch, kind, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(LoaderError, match=hint):
        build_loader(_cfg(coded["path"], kind), "train", True, img_size=24, in_chans=1)


# ----------------------------------------------------------------------------- prefetch thread

def test_prefetcher_forwards_errors_and_stops_early():
    def boom():
        yield 1
        raise KeyError("bad row 7")
    it = iter(Prefetcher(boom(), depth=1))
    assert next(it) == 1
    with pytest.raises(KeyError, match="bad row 7"):
        next(it)

    def endless():
        i = 0
        while True:
            yield i
            i += 1
    p = Prefetcher(endless(), depth=2)
    it = iter(p)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # consumer leaves early: the producer must stop, not block on the full queue
    p._thread.join(timeout=5)
    assert not p._thread.is_alive()


def test_raw_loader_reuses_batch_buffers_on_cpu(phantoms):
    """The CPU raw loader reuses spent uint8 batch buffers (a fresh buffer per batch costs a page
    fault per 4 KiB): a handful allocated over six epochs, and every batch still holds the
    sampler's images; a batch from feed() stays intact until two more have been taken."""
    ld = build_loader(DataConfig(path=phantoms["path"], loader="raw", batch_size=4, num_workers=1), "train", True,
                      img_size=48, in_chans=1)
    images = open_packed(phantoms["path"], "train").images
    batches = 0
    for epoch in range(6):
        ld.set_epoch(epoch)
        want = [np.sort(idx) for _, idx in ld.sampler.batches()]
        prev = None
        for k, (x, _) in enumerate(ld.feed()):
            assert np.array_equal(x.numpy(), images[want[k]])
            if prev is not None:  # the batch before is still what it was
                assert np.array_equal(prev.numpy(), images[want[k - 1]])
            prev = x
            batches += 1
        for out, _, pos in ld.iter_with_index():  # the augmenting path recycles too
            assert out.shape[0] == len(pos)
    # the batches in flight (queue, producer, consumer, the one held back) plus, per feed epoch,
    # its last batch, which the consumer may still hold when the epoch ends
    assert batches >= 24 and ld.buffers_allocated <= DataConfig().prefetch + 4 + 6 < 2 * batches


def test_ffcv_loader_keeps_its_batch_buffers_across_epochs(phantoms, monkeypatch):
    """FFCV allocates a fresh set of batch buffers for every epoch (a page fault per 4 KiB, every
    slot fresh when an epoch holds a few batches); on the CPU the loader hands a finished epoch's
    buffers to the next: one set over six epochs (two: an epoch left early keeps its own until its
    reader thread ends), and every batch still holds the sampler's images in the sampler's order."""
    from ffcv.pipeline.graph import Graph
    calls = []
    real = Graph.allocate_memory
    monkeypatch.setattr(Graph, "allocate_memory", lambda self, *a: calls.append(a) or real(self, *a))
    ld = build_loader(DataConfig(path=phantoms["path"], loader="ffcv", batch_size=4, num_workers=1), "train", True,
                      img_size=48, in_chans=1)
    images = open_packed(phantoms["path"], "train").images
    batches = 0
    for epoch in range(6):
        ld.set_epoch(epoch)
        want = [idx for _, idx in ld.sampler.batches()]
        for k, (x, _) in enumerate(ld.feed()):
            assert np.array_equal(x.numpy(), images[want[k]])
            batches += 1
    assert batches >= 24 and len(calls) == 1 and ld.buffers_allocated == 1
    ld.set_epoch(6)
    it = ld.feed()
    next(it)
    it.close()  # left early: its reader may still be writing, so the next epoch gets fresh buffers
    ld.set_epoch(7)
    assert sum(x.shape[0] for x, _ in ld.feed()) == ld.num_samples
    assert len(calls) <= 2


def test_raw_loader_index_out_of_range_is_a_clear_error(phantoms):
    """The gather runs np.take in mode "clip" (no temporary copy), so an out-of-range index would be
    clamped silently: the loader checks the batch's bounds itself and names the file."""
    from fasttrain.data.base import LoaderError
    ld = build_loader(DataConfig(path=phantoms["path"], loader="raw", batch_size=2, num_workers=1), "train", True,
                      img_size=48, in_chans=1)
    n = len(open_packed(phantoms["path"], "train"))
    ld.sampler.batches = lambda: iter([(0, np.array([0, n]))])
    with pytest.raises(LoaderError, match=f"image index 0..{n} outside the {n} images of raw memmap"):
        next(iter(ld.feed()))


# ----------------------------------------------------------------------------- bench

def test_bench_loader_json(phantoms, capsys):
    from fasttrain.bench.loader import main
    rc = main(["--data", phantoms["path"], "--batch-size", "4", "--batches", "2", "--windows", "1",
               "--img-size", "48", "--workers", "1", "--json"])
    assert rc == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["loader"] for r in recs] == ["reference", "raw", "ffcv", "dali-cpu"]
    for r in recs:
        for key in ("images_per_s", "feed_images_per_s", "ratio_vs_reference", "feed_ratio_vs_reference",
                    "memcpy_ceiling_images_per_s", "decode_one_core_images_per_s", "provenance", "source"):
            assert r[key] is not None, (r["loader"], key)
        assert r["images_per_s"] > 0 and r["feed_images_per_s"] > 0 and r["synthetic"] is True
        assert set(r["provenance"]) >= {"git_sha", "versions", "device", "cpu_cores"}
    assert recs[0]["ratio_vs_reference"] == 1.0 and "source files" in recs[0]["source"]
    assert recs[3]["decode_ceiling_images_per_s"] == recs[3]["decode_one_core_images_per_s"]  # x 1 worker


def test_bench_loader_plan_windows_and_budget(phantoms, capsys):
    """The run prints its plan and a line per window (stderr), and a timing that would overrun its
    share of --budget stops (after one timed window: every loader has a figure) with a note in its
    row instead of running on."""
    from fasttrain.bench.loader import main
    rc = main(["--data", phantoms["path"], "--batch-size", "4", "--seconds", "0.05", "--windows", "2",
               "--img-size", "48", "--workers", "1", "--loaders", "reference,raw", "--budget", "0.01", "--json"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert err.startswith("plan: 2 loaders (reference, raw), 3 timings") and "batch 4" in err
    lines = err.splitlines()  # each timing: its warm-up, one timed window (a figure), then stopped
    assert sum(ln.startswith("warm-up") for ln in lines) == 3 and sum(ln.startswith("window 1/2") for ln in lines) == 3
    assert "window 2/2" not in err
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for r in recs:
        assert r["images_per_s"] > 0 and len(r["windows"]) == 1 and r["ratio_vs_reference"] is not None
        assert "stopped after 1 of 2 windows" in r["note"] and r["budget_s"] == 0.01
    # without a budget every window runs, and each prints its line; an epoch of a few batches leaves
    # too few timed ones and the row says so
    assert all("timed batch(es) an epoch" in r["note"] for r in recs)
    assert main(["--data", phantoms["path"], "--batch-size", "2", "--seconds", "0.05", "--windows", "2",
                 "--img-size", "48", "--workers", "1", "--loaders", "reference,raw", "--budget", "0", "--json"]) == 0
    out, err = capsys.readouterr()
    assert sum(ln.startswith("window 2/2") for ln in err.splitlines()) == 3
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert all(r["note"] is None and len(r["windows"]) == 2 and r["images_per_s"] > 0 for r in recs)


def test_bench_loader_bad_input(tmp_path, capsys):
    from fasttrain.bench.loader import main
    assert main(["--data", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- DALI's GPU path, on the CPU

def _dali_ops(outputs):
    """(schema name, device) of every operator behind the pipeline's output DataNodes (DALI 2.4
    internals: DataNode.source is the operator instance, ._op its operator)."""
    ops, todo = set(), list(outputs)
    while todo:
        inst = todo.pop().source
        if inst is not None:  # (ExternalSource is a Python operator without a schema)
            ops.add((getattr(inst._op, "schema_name", type(inst._op).__name__), inst._op.device))
            todo += list(inst.inputs)
    return ops


@pytest.mark.parametrize("train", [True, False])
def test_dali_gpu_pipeline_defines_without_a_gpu(coded, train):
    """The GPU pipeline's graph (nvJPEG mixed decode + GPU crop/resize/normalise) is defined here,
    where DALI checks every argument name against its operator schemas; only running it needs
    the GPU (scripts/gpu_check.sh)."""
    from nvidia.dali import Pipeline
    ld = build_loader(_cfg(coded["path"], "dali"), "train", train, img_size=24, in_chans=1)
    ld.gpu = ld.dali_augment = True  # what device="cuda" sets
    with Pipeline(batch_size=8, num_threads=1, device_id=0):
        outs = ld._graph()
    assert [o.device for o in outs] == ["gpu", "cpu", "cpu"]  # images on the GPU, labels/positions host
    ops = _dali_ops(outs)
    assert {("decoders__Image", "mixed"), ("CropMirrorNormalize", "gpu"), ("ExternalSource", "cpu")} <= ops
    assert (("RandomResizedCrop", "gpu") in ops) == train and (("Resize", "gpu") in ops) == (not train)


def test_dali_gpu_augmentation_semantics_on_cpu_operators(coded, phantoms):
    """The GPU path's augmentation arguments run on DALI's CPU operators (same arguments, same
    semantics): eval pixels match the raw loader (JPEG + DALI's resize), training batches are
    [B, 1, s, s] channels-last with each image's labels."""
    ld = build_loader(_cfg(phantoms["path"], "dali"), "train", False, img_size=56, in_chans=3)
    ld.dali_augment = True
    x = torch.cat([b[0] for b in _epoch(ld)])
    ref = torch.cat([b[0] for b in _epoch(build_loader(_cfg(phantoms["path"], "raw"), "train", False,
                                                       img_size=56, in_chans=3))])
    assert x.shape == ref.shape and x.is_contiguous(memory_format=torch.channels_last)
    d = (x - ref).abs() * torch.tensor(norm_stats("imagenet", 3)[1]).view(1, 3, 1, 1)
    assert d.mean().item() < 3 * GREY  # the tolerance the CUDA test uses for DALI
    packed = open_packed(coded["path"], "train")
    tr = build_loader(_cfg(coded["path"], "dali"), "train", True, img_size=24, in_chans=1, seed=5)
    tr.dali_augment = True
    batches = _epoch(tr, epoch=1)
    assert len(batches) == len(tr) > 0
    for x, y, i in batches:
        assert x.shape == (8, 1, 24, 24) and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(_decode_code(x), torch.tensor([coded["code_of"][packed.ids[j]] for j in i.tolist()]))
        assert torch.equal(y, torch.from_numpy(packed.labels[i.numpy()]))


# ----------------------------------------------------------------------------- CUDA (scripts/gpu_check.sh)

def importable(module: str) -> bool:
    import importlib
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def phantoms_gpu(tmp_path_factory):
    """Phantoms packed in the formats whose libraries import here (the GPU box may lack FFCV/DALI,
    and a carried DALI wheel without simplejpeg, which writes the shards, must not break the raw test)."""
    from fasttrain.converters.synthetic import generate_phantoms
    root = tmp_path_factory.mktemp("phantoms_gpu")
    src = generate_phantoms(root / "src", 24, seed=2, size=64, progress=False)
    needs = (("ffcv", ("ffcv.loader",)), ("dali", ("nvidia.dali", "simplejpeg")))
    formats = ["raw"] + [f for f, mods in needs if all(importable(m) for m in mods)]
    return {"path": str(_convert(src, root / "packed", 64, formats=tuple(formats))), "formats": formats}


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["raw", "ffcv", "dali"])
def test_cuda_loaders_match_cpu_raw(phantoms_gpu, kind):
    """On the GPU: pinned raw / FFCV ToDevice / DALI nvJPEG + GPU resize give the CPU raw pixels (eval),
    and train batches are channels-last bf16 on the device with aligned labels."""
    if kind not in phantoms_gpu["formats"]:
        pytest.skip(f"{kind} does not import on this machine")
    path = phantoms_gpu["path"]
    cpu = build_loader(_cfg(path, "raw"), "train", False, img_size=56, in_chans=3)
    ref = torch.cat([b[0] for b in _epoch(cpu)])
    ld = build_loader(_cfg(path, kind), "train", False, img_size=56, in_chans=3, device="cuda")
    x = torch.cat([b[0] for b in _epoch(ld)]).cpu()
    d = (x - ref).abs() * torch.tensor(norm_stats("imagenet", 3)[1]).view(1, 3, 1, 1)
    if kind == "dali":  # JPEG + DALI's own resize/crop rounding
        assert d.mean().item() < 3 * GREY
    else:
        assert d.max().item() < 1e-4
    tr = build_loader(_cfg(path, kind), "train", True, img_size=48, in_chans=1, device="cuda",
                      dtype=torch.bfloat16)
    tr.set_epoch(0)
    n = 0
    for images, labels in tr:
        assert images.is_cuda and images.dtype == torch.bfloat16 and labels.is_cuda
        assert images.is_contiguous(memory_format=torch.channels_last) and images.shape[1:] == (1, 48, 48)
        n += 1
    assert n == len(tr) > 0
