"""Mixtures: several packed datasets read as one (fasttrain.data.mixture), through every loader kind.

Fixture: SYNTHETIC phantoms written in the NIH layout and in the CheXpert layout, each packed by its
real converter (raw + ffcv + dali, 32 px), plus a second NIH-layout pack (same label names) for the
fine-tuning paths. Images are compared by hash against `open_packed` of each part.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain.config import DataConfig, build_config
from fasttrain.data import build_loader, open_packed
from fasttrain.data.base import LoaderError
from fasttrain.data.mixture import MixtureSampler, PartSpec, parse_parts, shares

pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")
FORMATS = ("raw", "ffcv", "dali")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from fasttrain.converters.chexpert import convert_chexpert
    from fasttrain.converters.nih import convert_nih
    from fasttrain.converters.synthetic import generate_phantoms
    root = tmp_path_factory.mktemp("mix")
    kw = dict(formats=FORMATS, size=32, progress=False, workers=1, shard_size=20)
    nih = convert_nih(generate_phantoms(root / "nih_src", 50, seed=1, size=32, progress=False), root / "nih", **kw)
    nih2 = convert_nih(generate_phantoms(root / "nih2_src", 30, seed=2, size=32, progress=False), root / "nih2",
                       **kw)
    cx = convert_chexpert(generate_phantoms(root / "cx_src", 40, seed=3, size=32, layout="chexpert", progress=False),
                          root / "cx", **kw)
    return {"nih": str(nih), "nih2": str(nih2), "cx": str(cx), "root": root}


def _cfg(path, kind, **kw):
    return DataConfig(path=path, loader=kind, batch_size=kw.pop("batch_size", 8),
                      num_workers=kw.pop("num_workers", 1), **kw)


def _hashes(path, split="train", fmt="raw"):
    p = open_packed(path, split, fmt)
    return [hashlib.sha1(p.image(i).tobytes()).hexdigest() for i in range(len(p))]


def _feed_hashes(loader):
    out = []
    for x, _ in loader.feed():
        x = x.reshape(x.shape[0], *loader.image_size)  # DALI: [b, H, W, 1]
        out += [hashlib.sha1(np.ascontiguousarray(im.numpy()).tobytes()).hexdigest() for im in x]
    return out


# ----------------------------------------------------------------------------- parsing, config

def test_parse_parts_and_config_forms(parts, tmp_path):
    a, b = parts["nih"], parts["cx"]
    want = [PartSpec(a, None), PartSpec(b, "train")]
    assert parse_parts(f"{a},{b}:train") == want
    assert parse_parts(f"[{a}, {b}:train]") == want
    assert parse_parts([a, f"{b}:train"]) == want
    assert parse_parts(a) == [PartSpec(a, None)]
    # the CLI override and a YAML list give the same config value
    cli = build_config(None, [f"--data.path=[{a},{b}:train]", "--data.weights=[1,3]"])
    assert cli.data.path == [a, f"{b}:train"] and cli.data.weights == [1.0, 3.0]
    assert build_config(None, [f"--data.path={a},{b}"]).data.path == f"{a},{b}"
    y = tmp_path / "c.yaml"
    y.write_text(f"data:\n  path:\n    - {a}\n    - {b}:train\n  samples_per_epoch: 64\n")
    c = build_config(y)
    assert c.data.path == [a, f"{b}:train"] and c.data.samples_per_epoch == 64


def test_shares_sum_and_proportions():
    assert shares([1, 1], 7).tolist() in ([4, 3], [3, 4]) and shares([1, 1], 7).sum() == 7
    assert shares([1, 3], 100).tolist() == [25, 75]
    assert shares([0, 2, 1], 10).tolist() == [0, 7, 3]


# ----------------------------------------------------------------------------- every image once

@pytest.mark.parametrize("kind", ["raw", "ffcv", "dali"])
def test_every_image_of_every_part_once_per_epoch(parts, kind):
    """Concatenation (no weights): the uint8 images from feed() are exactly the parts' images, each
    once, in a shuffled order that mixes the parts inside batches."""
    fmt = "raw" if kind in ("raw", "ffcv") else "dali"  # DALI's images are its JPEGs, decoded
    want = Counter(_hashes(parts["nih"], fmt=fmt) + _hashes(parts["cx"], fmt=fmt))
    ld = build_loader(_cfg(f"{parts['nih']},{parts['cx']}", kind), "train", True, img_size=24, in_chans=1, seed=3,
                      drop_last=False, need_labels=False)
    n_nih = open_packed(parts["nih"], "train").count
    assert ld.dataset_size == sum(want.values()) and ld.label_names == []  # NIH 14 vs CheXpert 5 labels
    ld.set_epoch(2)
    assert Counter(_feed_hashes(ld)) == want
    ld.set_epoch(2)
    pos = [[int(j) for j in i] for _, _, i in ld.iter_with_index()]
    flat = [j for b in pos for j in b]
    assert sorted(flat) == list(range(len(flat)))
    assert sum(any(j < n_nih for j in b) and any(j >= n_nih for j in b) for b in pos) >= len(pos) // 2  # mixed


class _ReusingReader:
    """A part reader that reuses one buffer the way FFCV's slots are reused, at the earliest moment
    FFCV may: drawing the next batch scribbles over the one before."""

    def __init__(self, images: torch.Tensor, batch_size: int):
        self.images, self.b, self.at = images, batch_size, 0
        self.buf = torch.empty((batch_size, *images.shape[1:]), dtype=images.dtype)

    def __next__(self):
        if self.at >= len(self.images):
            raise StopIteration
        self.buf.fill_(255)  # whatever the last batch still pointed at is gone
        m = min(self.b, len(self.images) - self.at)
        self.buf[:m] = self.images[self.at:self.at + m]
        pos = np.arange(self.at, self.at + m, dtype=np.int64).reshape(-1, 1)  # [m, 1] as FFCV's IntDecoder
        self.at += m
        return self.buf[:m], pos


@pytest.mark.parametrize("sizes,batch_size,reader_batch", [((13, 29, 7), 8, 8), ((40, 1), 6, 4), ((5,), 4, 4),
                                                           ((9, 9), 5, 16)])
def test_assembly_into_reused_buffers_equals_concatenation(sizes, batch_size, reader_batch):
    """`assemble` (the FFCV mixture's batches: one copy of each image into a ring of reused buffers,
    each piece copied before its reader moves on) yields what concatenating the parts' next
    images for every batch yields, while the readers overwrite their buffers as FFCV does."""
    from fasttrain.data.ffcv_loader import assemble
    rng = np.random.default_rng(sum(sizes) + batch_size)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    parts = [torch.from_numpy(rng.integers(0, 255, (n, 3, 2), dtype=np.uint8)) for n in sizes]
    order = rng.permutation(int(offsets[-1]))  # global positions in reading order
    part_of = np.searchsorted(offsets, order, side="right") - 1
    readers = [_ReusingReader(p, reader_batch) for p in parts]
    ring = [None, None]
    want_next = [0] * len(sizes)  # a plain concatenation: each part's next images, parts in order
    seen, buffers = 0, set()
    for t, (x, gi) in enumerate(assemble(part_of, readers, offsets, batch_size, ring)):
        counts = np.bincount(part_of[t * batch_size:(t + 1) * batch_size], minlength=len(sizes))
        want_x, want_i = [], []
        for k, c in enumerate(counts):
            want_x.append(parts[k][want_next[k]:want_next[k] + c])
            want_i.append(np.arange(want_next[k], want_next[k] + c) + offsets[k])
            want_next[k] += c
        assert torch.equal(x, torch.cat(want_x)) and np.array_equal(gi, np.concatenate(want_i))
        seen += len(gi)
        buffers |= {id(r) for r in ring if r is not None}
    assert seen == offsets[-1] and len(buffers) <= len(ring)
    if len(sizes) == 1 and batch_size == reader_batch:  # one dataset: the reader's batches, no copy
        assert all(r is None for r in ring)


def test_ffcv_mixture_keeps_its_buffers_across_epochs(parts, monkeypatch):
    """An FFCV mixture on the CPU decodes each part's pieces straight into its batches: each part's
    reader buffers are allocated once and the batch buffers a handful of times over four epochs,
    and its batches hold the raw loader's images epoch after epoch."""
    from ffcv.pipeline.graph import Graph
    calls = []
    real = Graph.allocate_memory
    monkeypatch.setattr(Graph, "allocate_memory", lambda self, *a: calls.append(a) or real(self, *a))
    path = [parts["nih"], parts["cx"]]
    ld = {k: build_loader(_cfg(path, k), "train", True, img_size=24, in_chans=1, seed=4, need_labels=False)
          for k in ("raw", "ffcv")}
    assert ld["ffcv"].direct
    batches = 0
    for epoch in range(4):
        got = {}
        for k, loader in ld.items():
            loader.set_epoch(epoch)
            got[k] = [sorted(hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in x) for x, _ in loader.feed()]
        assert got["ffcv"] == got["raw"] and len(got["raw"]) > 3
        batches += len(got["raw"])
    assert len(calls) == 2 and ld["ffcv"].buffers_allocated == 2  # one set per part
    # the readers run at most prefetch + 2 pieces ahead of the batch taken
    assert ld["ffcv"].batch_buffers_allocated <= 2 * (DataConfig().prefetch + 2) + 1 < batches


def _batch_hashes(x) -> list:
    return sorted(hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in x)


@pytest.mark.parametrize("mixture", [False, True], ids=["one-set", "mixture"])
def test_two_open_ffcv_epochs_keep_their_own_batches(parts, mixture):
    """Two epochs of one FFCV loader read at once: the first's readers have queued every batch and
    ended when the second starts, and the first's later batches are still its own (its buffers
    are not handed to the second while it is open)."""
    path = [parts["nih"], parts["cx"]] if mixture else parts["nih"]
    raw = build_loader(_cfg(path, "raw"), "train", True, img_size=24, in_chans=1, seed=4, need_labels=False)
    ld = build_loader(_cfg(path, "ffcv", prefetch=16), "train", True, img_size=24, in_chans=1, seed=4,
                      need_labels=False)
    assert ld.direct == mixture
    want = {}
    for epoch in (0, 1):
        raw.set_epoch(epoch)
        want[epoch] = [_batch_hashes(x) for x, _ in raw.feed()]
    ld.set_epoch(0)
    first = ld.feed()
    got0 = [_batch_hashes(next(first)[0])]
    time.sleep(1.0)  # the short epoch fits the readers' queues: they read it all and end
    ld.set_epoch(1)
    second = ld.feed()
    got1 = [_batch_hashes(next(second)[0])]
    got0 += [_batch_hashes(x) for x, _ in first]
    got1 += [_batch_hashes(x) for x, _ in second]
    assert got0 == want[0] and got1 == want[1] and len(got0) > 3


def test_an_ffcv_epoch_left_with_a_full_queue_frees_its_reader(parts):
    """An epoch closed with exactly `prefetch` batches untaken leaves its reader waiting to put its
    end marker on a full queue; the loader empties the queue, so the reader ends and its buffers
    serve the next epoch instead of a fresh set every epoch."""
    ld = build_loader(_cfg(parts["nih"], "ffcv", prefetch=2), "train", True, img_size=24, in_chans=1, seed=4,
                      need_labels=False)
    n = len(ld)
    assert n > 3
    for epoch in range(6):
        ld.set_epoch(epoch)
        it = ld.feed()
        for _ in range(n - 2):
            next(it)
        it.close()
    assert ld.buffers_allocated <= 3  # one set when every reader ends in time (six when none does)


def test_ffcv_mixture_decoded_in_place_equals_the_assembly(parts):
    """The two FFCV mixture paths give the same batches, image for image and position for position:
    pieces decoded into the batch buffers (CPU, OS cache) and the copy of whole reader batches'
    pieces (`assemble`, taken with data.os_cache=false); also after an epoch left early and from
    a mid-epoch start."""
    path = [parts["nih"], parts["cx"], parts["nih2"]]
    ld = {cache: build_loader(_cfg(path, "ffcv", os_cache=cache), "train", True, img_size=24, in_chans=1, seed=6,
                              need_labels=False) for cache in (True, False)}
    assert ld[True].direct and not ld[False].direct
    images = np.concatenate([open_packed(p, "train").images for p in path])  # [N, H, W] global positions
    for epoch, start in ((0, 0), (1, 0), (2, 3)):
        early = ld[True].feed()
        next(early)
        early.close()  # its readers may still be writing: the next epoch must not share their buffers
        got = {}
        for cache, loader in ld.items():
            loader.set_epoch(epoch, start)
            held = [x.clone() for x, _ in loader.feed()]  # as it is when taken (valid until the next)
            loader.set_epoch(epoch, start)
            got[cache] = (held, [i for _, _, i in loader.iter_with_index()])
        n = len(ld[True]) - start
        assert [len(v) for v in (*got[True], *got[False])] == [n] * 4
        for xa, ia, xb, ib in zip(*got[True], *got[False]):
            assert torch.equal(xa, xb) and torch.equal(ia, ib)
            assert np.array_equal(xa.numpy(), images[ia.numpy()])


def test_reference_reads_a_mixture_in_the_raw_order(parts):
    """The reference loader's positions follow the same global order as the raw loader's."""
    path = [parts["nih"], parts["nih2"]]
    orders = {}
    for kind in ("raw", "reference"):
        ld = build_loader(_cfg(path, kind, num_workers=0), "train", True, img_size=24, in_chans=1, seed=5)
        ld.set_epoch(1)
        orders[kind] = [sorted(int(j) for j in i) for _, _, i in ld.iter_with_index()]
        assert ld.label_names == open_packed(parts["nih"], "train").label_names
    assert orders["raw"] == orders["reference"]


def test_labels_follow_their_images(parts):
    """Two NIH packs (same label names): each position's labels are its part's labels."""
    ld = build_loader(_cfg([parts["nih"], parts["nih2"]], "raw"), "train", True, img_size=24, in_chans=1, seed=1)
    a, b = open_packed(parts["nih"], "train"), open_packed(parts["nih2"], "train")
    want = np.concatenate([a.labels, b.labels])
    ld.set_epoch(0)
    for _, y, i in ld.iter_with_index():
        np.testing.assert_array_equal(y.numpy(), want[i.numpy()])


# ----------------------------------------------------------------------------- weights

def test_weighted_epochs_follow_the_weights_without_replacement():
    sizes, w, S = [10, 40], [3, 1], 24
    s = MixtureSampler(sizes, w, S, 4, shuffle=True, seed=7)
    c = shares(w, S)  # [18, 6]: part 0 (10 images) is used up inside every epoch, part 1 every ~7
    stream = {0: [], 1: []}
    for e in range(20):
        s.set_epoch(e)
        o = s.order()
        assert len(o) == S and (o < 10).sum() == c[0] and (o >= 10).sum() == c[1]
        for k in (0, 1):
            d = s._part_draws(k)
            # the epoch's order holds exactly the part's draws for this epoch
            assert Counter(d.tolist()) == Counter((o[(o >= s.offsets[k]) & (o < s.offsets[k + 1])]
                                                   - s.offsets[k]).tolist())
            stream[k] += d.tolist()
    for k, n in ((0, 10), (1, 40)):
        # without replacement until the part is used up: every block of n stream positions is a permutation
        full = stream[k]
        for start in range(0, len(full) - n + 1, n):
            assert sorted(full[start:start + n]) == list(range(n)), (k, start)
        assert full[:n] != full[n:2 * n]  # a fresh permutation each pass
    # the same (seed, epoch) -> the same order; another epoch -> another
    s.set_epoch(3)
    o3 = s.order().copy()
    s.set_epoch(4)
    assert not np.array_equal(o3, s.order())
    s.set_epoch(3)
    np.testing.assert_array_equal(o3, s.order())


def test_weighted_loader_counts_within_sampling_error(parts):
    """Through the raw loader: weights 1:3 over many epochs give part shares of 1/4 and 3/4 of the
    draws in every epoch, and every batch is a mixture."""
    cfg = _cfg([parts["nih"], parts["cx"]], "raw", weights=[1, 3], samples_per_epoch=64)
    ld = build_loader(cfg, "train", True, img_size=24, in_chans=1, seed=2, need_labels=False)
    n_nih = open_packed(parts["nih"], "train").count
    assert len(ld) == 8 and ld.num_samples == 64
    tot = Counter()
    for e in range(6):
        ld.set_epoch(e)
        idx = np.concatenate([i.numpy() for _, _, i in ld.iter_with_index()])
        c = Counter(idx < n_nih)
        assert c[True] == 16 and c[False] == 48
        tot.update(idx.tolist())
    cx_draws = {j: v for j, v in tot.items() if j >= n_nih}
    n_cx = open_packed(parts["cx"], "train").count
    # 288 CheXpert draws over its images, without replacement per pass: each drawn 288 // n or +1 times
    assert set(cx_draws) == set(range(n_nih, n_nih + n_cx))
    assert max(cx_draws.values()) - min(cx_draws.values()) <= 1


# ----------------------------------------------------------------------------- DDP, resume

@pytest.mark.parametrize("kind", ["raw", pytest.param("ffcv", marks=pytest.mark.slow), "dali"])
def test_resume_mid_epoch_gives_the_remaining_order(parts, kind):
    path = f"{parts['nih']},{parts['cx']}"
    ld = build_loader(_cfg(path, kind), "train", True, img_size=24, in_chans=1, seed=9, need_labels=False)
    ld.set_epoch(1)
    full = [(x, i) for x, _, i in ld.iter_with_index()]
    ld2 = build_loader(_cfg(path, kind), "train", True, img_size=24, in_chans=1, seed=9, need_labels=False)
    ld2.set_epoch(1, start_step=3)
    rest = [(x, i) for x, _, i in ld2.iter_with_index()]
    assert len(rest) == len(full) - 3
    for (xa, ia), (xb, ib) in zip(full[3:], rest):
        assert torch.equal(ia, ib)
        torch.testing.assert_close(xa, xb)


def test_resume_mid_epoch_dali_drawing_its_own_crops(parts):
    """With DALI's own crop / flip (the GPU path's dali_augment, run here on its CPU operators) a
    resumed mixture epoch still gives the uninterrupted batches: DALI's random stream starts at
    batch 0 of the epoch, so the source starts there too and the skipped batches are dropped."""
    path = f"{parts['nih']},{parts['cx']}"
    runs = []
    for start in (0, 3):
        ld = build_loader(_cfg(path, "dali"), "train", True, img_size=24, in_chans=1, seed=9, need_labels=False)
        ld.dali_augment = True  # what device="cuda" sets
        ld.set_epoch(1, start_step=start)
        runs.append([(x, i) for x, _, i in ld.iter_with_index()])
    full, rest = runs
    assert len(rest) == len(full) - 3
    for (xa, ia), (xb, ib) in zip(full[3:], rest):
        assert torch.equal(ia, ib)
        torch.testing.assert_close(xa, xb)


@pytest.mark.slow
def test_two_gloo_ranks_disjoint_and_covering(parts, tmp_path, gloo_positions):
    path = f"{parts['nih']},{parts['cx']}"
    # raw only: ffcv and dali read the same sampler's shard (checked below, and by test_resume...)
    r = gloo_positions({"raw": _cfg(path, "raw")}, tmp_path, need_labels=False)
    n = open_packed(parts["nih"], "train").count + open_packed(parts["cx"], "train").count
    for kind in ("raw",):
        a, b = r[0][f"{kind}-False"]["pos"], r[1][f"{kind}-False"]["pos"]
        assert sorted(a + b) == list(range(n)), kind  # evaluation: exact cover, no repeats
        a, b = r[0][f"{kind}-True"]["pos"], r[1][f"{kind}-True"]["pos"]
        assert r[0][f"{kind}-True"]["len"] == r[1][f"{kind}-True"]["len"]
        assert not set(a) & set(b) and len(set(a + b)) >= n - 2 * 8, kind  # disjoint; all but the dropped tail
    # the same shards as the in-process sampler for each rank (what ffcv and dali mixtures read too)
    for rank in range(2):
        ld = build_loader(_cfg(path, "ffcv"), "train", True, img_size=24, in_chans=1, rank=rank, world_size=2,
                          seed=4, need_labels=False)
        ld.set_epoch(1)
        shard = ld.sampler.shard()[: len(ld) * 8].reshape(-1, 8)
        assert np.sort(shard, axis=1).reshape(-1).tolist() == r[rank]["raw-True"]["pos"]  # raw sorts inside a batch


# ----------------------------------------------------------------------------- bad input, provenance

def test_bad_mixtures_name_the_part(parts, tmp_path):
    from fasttrain.converters.nih import convert_nih
    from fasttrain.converters.synthetic import generate_phantoms
    a, cx = parts["nih"], parts["cx"]

    def build(path, **kw):
        need = kw.pop("need_labels", False)
        return build_loader(_cfg(path, "raw", **kw), "train", True, img_size=16, in_chans=1, need_labels=need)

    with pytest.raises(LoaderError, match=r"part 1 \(/nonexistent/x\).*no manifest"):
        build(f"{a},/nonexistent/x")
    with pytest.raises(LoaderError, match=rf"part 1 \({cx}\): no split 'val'"):
        build(f"{a},{cx}:val")
    with pytest.raises(LoaderError, match="3 value.*2 part"):
        build([a, cx], weights=[1, 2, 3])
    with pytest.raises(LoaderError, match=r"weights\[1\] = -1.0 \(part 1\)"):
        build([a, cx], weights=[1, -1])
    with pytest.raises(LoaderError, match="all zero"):
        build([a, cx], weights=[0, 0])
    with pytest.raises(LoaderError, match="samples_per_epoch needs data.weights"):
        build([a, cx], samples_per_epoch=10)
    with pytest.raises(LoaderError, match="empty part"):
        build(f"{a},,{cx}")
    big = convert_nih(generate_phantoms(tmp_path / "s", 12, seed=0, size=48, progress=False), tmp_path / "p48",
                      size=48, progress=False, workers=1)
    with pytest.raises(LoaderError, match=rf"part 0 {a} \(train\) is 32x32 px, part 1 {big} \(train\) is 48x48"):
        build([a, str(big)])
    # fine-tuning needs equal label names: the error lists both parts' names
    with pytest.raises(LoaderError, match=r"(?s)same label names.*part 0.*Atelectasis.*part 1.*Pleural Effusion"):
        build([a, cx], need_labels=True)
    with pytest.raises(LoaderError, match="was not written in"):
        build_loader(_cfg([a, str(big)], "ffcv"), "train", True, img_size=16, in_chans=1)


def test_provenance_lists_every_part(parts):
    ld = build_loader(_cfg([parts["nih"], f"{parts['cx']}:train"], "raw", weights=[2, 1]), "train", True,
                      img_size=24, in_chans=1, need_labels=False)
    prov = ld.data_parts()
    assert [p["path"] for p in prov] == [str(Path(parts["nih"]).absolute()), str(Path(parts["cx"]).absolute())]
    assert [p["weight"] for p in prov] == [2.0, 1.0] and [p["split"] for p in prov] == ["train", "train"]
    assert prov[0]["count"] == open_packed(parts["nih"], "train").count
    assert prov[1]["manifest_sha256"] == hashlib.sha256((Path(parts["cx"]) / "manifest.json").read_bytes()).hexdigest()
    single = build_loader(_cfg(parts["nih"], "raw"), "train", True, img_size=24, in_chans=1).data_parts()
    assert len(single) == 1 and single[0]["weight"] is None


# ----------------------------------------------------------------------------- bigger than memory

def test_block_shuffle_is_a_page_aware_permutation():
    from fasttrain.data.sampler import EpochSampler, block_permutation
    rng = np.random.default_rng(0)
    p = block_permutation(103, 10, rng)
    assert sorted(p.tolist()) == list(range(103))
    # each block's positions are read one after another: the block id changes only between blocks
    ids = p // 10
    assert int((ids[1:] != ids[:-1]).sum()) == 10 and not np.array_equal(p, np.arange(103))
    s = EpochSampler(103, 10, shuffle=True, seed=1, block=10)
    s.set_epoch(2)
    o = s.order()
    assert sorted(o.tolist()) == list(range(103)) and not np.array_equal(o, np.arange(103))


@pytest.mark.parametrize("advice", ["auto", "normal", "sequential"])
def test_raw_advice_and_blocks_read_the_same_images(parts, advice):
    """madvise changes only how pages are read; block_shuffle only the order: every image once."""
    want = Counter(_hashes(parts["nih"]) + _hashes(parts["cx"]))
    cfg = _cfg([parts["nih"], parts["cx"]], "raw", raw_advice=advice, block_shuffle=4 if advice == "auto" else 0)
    ld = build_loader(cfg, "train", True, img_size=24, in_chans=1, seed=3, drop_last=False, need_labels=False)
    assert ld.advice == {"auto": "sequential"}.get(advice, advice)  # auto with blocks keeps readahead
    assert build_loader(_cfg(parts["nih"], "raw"), "train", True, img_size=24, in_chans=1).advice == "random"
    assert build_loader(_cfg(parts["nih"], "raw"), "train", False, img_size=24, in_chans=1).advice == "sequential"
    ld.set_epoch(0)
    assert Counter(_feed_hashes(ld)) == want
    with pytest.raises(LoaderError, match="raw_advice"):
        build_loader(_cfg(parts["nih"], "raw", raw_advice="willneed"), "train", True, img_size=24, in_chans=1)
    # a weighted mixture's draws are random: block_shuffle is not applied, and auto reads randomly
    weighted = _cfg([parts["nih"], parts["cx"]], "raw", weights=[1, 1], block_shuffle=4)
    ld = build_loader(weighted, "train", True, img_size=24, in_chans=1, seed=3, need_labels=False)
    assert ld.sampler.block == 0 and ld.advice == "random"


def test_bench_loader_times_a_mixture(parts, capsys):
    """`fasttrain bench loader --data A --data B` (and --data A,B) builds every loader over the mixture."""
    from fasttrain.bench.loader import main as bench_main
    common = ["--batch-size", "8", "--batches", "1", "--windows", "1", "--img-size", "24", "--loaders",
              "reference,raw", "--json", "--workers", "1"]
    for data in (["--data", parts["nih"], "--data", parts["cx"]], ["--data", f"{parts['nih']},{parts['cx']}"]):
        assert bench_main(data + common) == 0
        recs = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
        assert [r["loader"] for r in recs] == ["reference", "raw"]
        n = open_packed(parts["nih"], "train").count + open_packed(parts["cx"], "train").count
        assert all(r["images"] == n and len(r["data"]) == 2 and r["images_per_s"] > 0 for r in recs)
    assert bench_main(["--data", parts["nih"], "--data", "/nonexistent/x"] + common) == 2
    assert "part 1" in capsys.readouterr().err


def test_tile_raw_makes_a_bigger_set_of_the_same_images(parts, tmp_path):
    from fasttrain.bench.mixture import tile_raw
    big = tile_raw(parts["nih"], tmp_path / "big", 3)
    a, b = open_packed(parts["nih"], "train"), open_packed(big, "train")
    assert len(b) == 3 * len(a) and b.synthetic
    np.testing.assert_array_equal(b.image(2 * len(a) + 5), a.image(5))
    np.testing.assert_array_equal(b.labels[len(a):2 * len(a)], a.labels)


def test_paper_pretraining_configs_name_nih_and_chexpert_train():
    from fasttrain.data.mixture import part_splits
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("pretrain_vitb_to_vitt.yaml", "pretrain_vits_to_vitt.yaml"):
        cfg = build_config(root / name)
        specs = parse_parts(cfg.data.path)
        assert [Path(s.path).name for s in specs] == ["nih256", "chexpert256"], name
        assert part_splits(specs, cfg.data.train_split, cfg.data.train_split) == ["train", "train"]
        over = build_config(root / name, ["--data.path=/x/nih:train,/x/cx:train"])
        assert parse_parts(over.data.path) == [PartSpec("/x/nih", "train"), PartSpec("/x/cx", "train")]


def test_mixture_bench_plan_and_budget(parts, capsys):
    """mixture_bench prints its plan and a line per window; a budget too small for a second
    window stops each timing after one, with a note; --full plans 5 windows and no budget."""
    from fasttrain.bench.mixture import main
    base = ["--parts", parts["nih"], parts["cx"], "--single", parts["nih2"], "--loaders", "raw", "--modes", "feed",
            "--batch-size", "8", "--batches", "1", "--img-size", "24", "--workers", "1", "--json"]
    assert main(base + ["--windows", "2", "--budget", "1e-9"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("plan: 1 loaders (raw) x mixture, single x feed = 2 timings x (1 warm-up + 2 windows)")
    assert "budget 1e-09 s" in err and "window 1/2  mixture/feed" in err
    rec = json.loads(out.splitlines()[0])
    assert len(rec["windows"]["mixture/feed"]) == 1 and "stopped after 1 of 2 windows" in rec["note"]
    assert main(base + ["--full"]) == 0
    out, err = capsys.readouterr()
    assert "(1 warm-up + 5 windows) x 1 batches of 8" in err and "no budget" in err
    rec = json.loads(out.splitlines()[0])
    assert len(rec["windows"]["single/feed"]) == 5 and rec["note"] is None
