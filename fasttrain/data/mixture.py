"""Mixtures: several packed datasets read as one (the paper pre-trains on NIH + CheXpert).

    data.path: [/data/nih_packed, /data/chexpert_packed:train]     # or "A,B" / "[A,B]" on the CLI
    data.weights: [1, 2]                # optional sampling proportions, one per part
    data.samples_per_epoch: 200000      # with weights: draws per epoch (default: the total size)

`parse_parts` turns data.path into (path, split) parts; `open_mixture` opens each part's split
(every bad input is an error naming the part, before any training) into a `PackedMixture`: the
parts' images side by side in one index space (part k holds global positions
offsets[k] .. offsets[k+1]-1), with the concatenated labels. `MixtureSampler` is the epoch order
over that space, so DDP sharding, batching and mid-epoch resume are EpochSampler's, unchanged:

- no weights: plain concatenation; the shuffled order is a permutation of all N images (every image
  of every part exactly once per epoch) drawn from (seed, epoch), as for one dataset.
- weights w_k: an epoch is S = data.samples_per_epoch draws; part k gives its share
  c_k = S w_k / sum(w), rounded by largest remainder so the shares sum to S. Part k's draws come
  from an endless stream of permutations of the part (permutation j seeded by (seed, k, j)):
  epoch e takes stream positions e c_k .. (e+1) c_k - 1, so inside a part there is no replacement
  until the part is used up, then a fresh permutation starts (across epoch boundaries too), and
  the order is still a function of (seed, epoch) alone. The S draws are then shuffled together.
  Evaluation loaders (no shuffle) ignore weights: every image of every part once, in order.

Imports: format (manifest, packed) <- mixture <- base (the sampler choice) <- loaders; nothing here imports a loader.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fasttrain.format.manifest import FORMAT_PREFERENCE, PackedError, read_manifest
from fasttrain.format.packed import PackedSplit, open_packed

from .sampler import EpochSampler, mix_seed

log = logging.getLogger(__name__)


class MixtureError(ValueError):
    """A mixture that cannot be read: a part missing or without the split, bad weights, mixed sizes."""


@dataclass(frozen=True)
class PartSpec:
    path: str
    split: Optional[str]  # None: the split the caller asks for (data.train_split for training)


def _split_spec(text: str) -> PartSpec:
    """'PATH:SPLIT' -> (PATH, SPLIT); a PATH that exists as given (even with ':' in it) wins."""
    text = text.strip()
    if not text:
        raise MixtureError("data.path has an empty part (check for a stray ',')")
    head, sep, tail = text.rpartition(":")
    if sep and head and tail and "/" not in tail and not os.path.exists(text):
        return PartSpec(head, tail)
    return PartSpec(text, None)


def parse_parts(path) -> list[PartSpec]:
    """data.path -> parts: one path, a list (YAML), 'A,B' or '[A,B]' (CLI), each 'PATH' or 'PATH:SPLIT'."""
    if path is None:
        raise MixtureError("data.path is not set: point it at one packed dataset or a list of them")
    if isinstance(path, (list, tuple)):
        items = [str(p) for p in path]
    else:
        text = str(path).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        items = text.split(",") if not os.path.exists(text) else [text]
    if not items:
        raise MixtureError("data.path is an empty list: name at least one packed dataset")
    return [_split_spec(t) for t in items]


def part_splits(parts: Sequence[PartSpec], split: str, train_split: str) -> list[str]:
    """The split each part reads: its own ':SPLIT' when the caller asks for the training split,
    else `split` (validation / test read each part's split of that name)."""
    return [p.split if (p.split is not None and split == train_split) else split for p in parts]


def check_weights(weights, n_parts: int) -> Optional[list[float]]:
    if weights is None:
        return None
    w = [float(x) for x in weights]
    if len(w) != n_parts:
        raise MixtureError(f"data.weights has {len(w)} value(s) but data.path names {n_parts} part(s); "
                           f"give one weight per part")
    for k, x in enumerate(w):
        if not math.isfinite(x) or x < 0:
            raise MixtureError(f"data.weights[{k}] = {x} (part {k}): weights must be finite and >= 0")
    if sum(w) <= 0:
        raise MixtureError(f"data.weights {w}: all zero, no part would be read")
    return w


def shares(weights: Sequence[float], total: int) -> np.ndarray:
    """Draws per part: total * w / sum(w), rounded by largest remainder (they sum to `total`)."""
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    c = np.floor(exact).astype(np.int64)
    rest = int(total - c.sum())
    if rest:
        c[np.argsort(-(exact - c), kind="stable")[:rest]] += 1
    return c


def manifest_sha256(root) -> str:
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()


class PackedMixture:
    """PackedSplits in one index space, what every loader reads (one dataset is a mixture of one part)."""

    def __init__(self, parts: list[PackedSplit], weights: Optional[list[float]], samples_per_epoch: Optional[int],
                 need_labels: bool):
        self.parts = parts
        self.weights = weights
        self.format = parts[0].format
        sizes = np.array([len(p) for p in parts], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [P + 1]
        self.count = int(self.offsets[-1])
        self.image_size = parts[0].image_size
        for k, p in enumerate(parts[1:], 1):
            if tuple(p.image_size) != tuple(self.image_size):
                raise MixtureError(f"mixture parts disagree on the packed image size: part 0 {parts[0].root} "
                                   f"({parts[0].split}) is {self.image_size[0]}x{self.image_size[1]} px, part {k} "
                                   f"{p.root} ({p.split}) is {p.image_size[0]}x{p.image_size[1]} px; pack them "
                                   f"with the same --size")
        same = all(p.label_names == parts[0].label_names for p in parts)
        if not same and need_labels:
            lines = [f"part {k} {p.root} ({p.split}): {p.label_names}" for k, p in enumerate(parts)]
            common = set(parts[0].label_names).intersection(*[set(p.label_names) for p in parts[1:]])
            raise MixtureError("fine-tuning or evaluating on a mixture needs the same label names in every part; "
                               "they differ:\n  " + "\n  ".join(lines) +
                               f"\n  (only in some parts: {sorted(set().union(*[set(p.label_names) for p in parts]) - common)})")
        if same:
            self.label_names = list(parts[0].label_names)
            self.labels = np.concatenate([p.labels for p in parts]).astype(np.float32)  # [N, L]
        else:  # pre-training ignores labels: none rather than a misleading union
            self.label_names = []
            self.labels = np.zeros((self.count, 0), np.float32)  # [N, 0]
        self.labels.setflags(write=False)
        self.ids = [i for p in parts for i in p.ids]
        self.synthetic = any(p.synthetic for p in parts)
        self.samples_per_epoch = self._epoch_size(samples_per_epoch)
        self.epoch_size_given = samples_per_epoch is not None  # else an epoch is every image (of the subset) once
        # data.views / data.label_fraction (fasttrain.data.subset): the positions read, what chose them
        self.subset: Optional[np.ndarray] = None
        self.subset_info: Optional[dict] = None
        self.root = Path(parts[0].root)  # for messages that name "the" dataset; describe() names all
        self.split = "+".join(p.split for p in parts)
        # one part: its own manifest (source, dataset, ...); several: what they share
        self.manifest = parts[0].manifest if len(parts) == 1 else {
            "dataset": " + ".join(str(p.manifest.get("dataset")) for p in parts),
            "synthetic": self.synthetic, "formats": [self.format]}

    @property
    def metadata(self) -> dict[str, np.ndarray]:
        """The parts' metadata end to end (PackedSplit.metadata): every column some part has,
        missing (None / NaN) over the parts without it."""
        metas = [p.metadata for p in self.parts]
        names = list(dict.fromkeys(c for m in metas for c in m))
        out = {}
        for c in names:
            cols = [m[c] if c in m else np.full(len(p), np.nan if c == "age" else None, dtype=np.float64 if c == "age"
                                               else object) for m, p in zip(metas, self.parts)]
            out[c] = np.concatenate(cols)
        return out

    def _epoch_size(self, samples_per_epoch: Optional[int]) -> int:
        if samples_per_epoch is None:
            return self.count
        if self.weights is None:
            raise MixtureError("data.samples_per_epoch needs data.weights (without weights an epoch is every "
                               "image of every part once)")
        if samples_per_epoch < 1:
            raise MixtureError(f"data.samples_per_epoch must be >= 1, got {samples_per_epoch}")
        return int(samples_per_epoch)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"PackedMixture({', '.join(repr(p) for p in self.parts)}, weights={self.weights})"

    def locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions int64 [n] -> (part int64 [n], position in the part int64 [n])."""
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        return part, idx - self.offsets[part]

    def check_raw_file(self) -> None:
        """PackedSplit.check_raw_file for every part (the raw loader calls it before each gather)."""
        for p in self.parts:
            p.check_raw_file()

    def image(self, i: int) -> np.ndarray:
        if not 0 <= i < self.count:
            raise IndexError(f"index {i} out of range for a mixture of {self.count} images")
        k, j = self.locate(np.array([i]))
        return self.parts[int(k[0])].image(int(j[0]))

    def make_sampler(self, batch_size: int, *, shuffle: bool, seed: int, rank: int, world_size: int,
                     drop_last: bool, block: int = 0) -> "MixtureSampler":
        subset = self.subset
        n = self.count if subset is None else len(subset)
        weighted = self.weights is not None and shuffle
        draws = self.samples_per_epoch if weighted and self.epoch_size_given else n
        return MixtureSampler([len(p) for p in self.parts], self.weights if shuffle else None,
                              draws, batch_size, shuffle=shuffle,
                              seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, block=block,
                              subset=subset)

    def provenance(self) -> list[dict]:
        return [dict(path=str(Path(p.root).absolute()), split=p.split, count=len(p),
                     manifest_sha256=manifest_sha256(p.root), dataset=p.manifest.get("dataset"),
                     weight=None if self.weights is None else self.weights[k], synthetic=p.synthetic)
                for k, p in enumerate(self.parts)]

    def describe(self) -> str:
        w = self.weights or [None] * len(self.parts)
        return " + ".join(f"{p.root}:{p.split} ({len(p)}{'' if wk is None else f', w={wk:g}'})"
                          for p, wk in zip(self.parts, w))


class MixtureSampler(EpochSampler):
    """EpochSampler over a mixture's global index space (see the module docstring for the order)."""

    def __init__(self, sizes: Sequence[int], weights: Optional[Sequence[float]], samples_per_epoch: int,
                 batch_size: int, subset: Optional[np.ndarray] = None, **kw):
        full = np.asarray(sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(full)]).astype(np.int64)  # [P + 1] global positions
        # a subset (data.views, data.label_fraction): part k draws from its subset positions only
        self.part_index = None
        if subset is not None:
            subset = np.asarray(subset, np.int64)
            self.part_index = [subset[(subset >= self.offsets[k]) & (subset < self.offsets[k + 1])] - self.offsets[k]
                               for k in range(len(full))]
        self.sizes = full if subset is None else np.array([len(ix) for ix in self.part_index], np.int64)
        self.weights = None if weights is None else list(weights)
        if self.weights is None and samples_per_epoch != int(self.sizes.sum()):
            raise MixtureError("samples_per_epoch differs from the total size but no weights are given")
        self.counts = shares(self.weights, samples_per_epoch) if self.weights is not None else self.sizes.copy()
        for k, c in enumerate(self.counts):
            if c and not self.sizes[k]:
                raise MixtureError(f"part {k} has no images but weight {self.weights[k]}")
        unweighted = self.weights is None or not kw.get("shuffle", False)
        super().__init__(samples_per_epoch, batch_size, subset=subset if unweighted else None, **kw)
        if self.weights is not None and self.shuffle and self.block:
            # weighted draws are random across each part: no page-aware order to keep, and `block`
            # is what the raw loader reads its access pattern from (MADV_SEQUENTIAL on random
            # gathers was the slowest cold-cache case measured)
            log.warning("data.block_shuffle=%d is not applied to a weighted mixture (its draws are random)",
                        self.block)
            self.block = 0

    def _part_draws(self, k: int) -> np.ndarray:
        """Part k's draws for this epoch: stream positions e c_k .. (e+1) c_k - 1 -> positions in part k."""
        n, c = int(self.sizes[k]), int(self.counts[k])
        pos = np.arange(self.epoch * c, (self.epoch + 1) * c, dtype=np.int64)
        out = np.empty(c, np.int64)
        perm_of = pos // n
        for j in np.unique(perm_of):  # one permutation per pass over the part (c_k / n_k + 1 at most)
            rng = np.random.Generator(np.random.PCG64(mix_seed(self.seed, k, int(j), 0x9A7)))
            sel = perm_of == j
            out[sel] = rng.permutation(n)[pos[sel] % n]
        return out

    def order(self) -> np.ndarray:
        if self.weights is None or not self.shuffle:
            # concatenation: a permutation of every image (or 0..N-1); with block_shuffle its blocks
            # may straddle two parts, which is harmless: each piece is contiguous in its own file
            return super().order()
        local = [self._part_draws(k) for k in range(len(self.sizes))]  # positions among each part's images
        if self.part_index is not None:
            local = [self.part_index[k][d] for k, d in enumerate(local)]
        draws = np.concatenate([self.offsets[k] + d for k, d in enumerate(local)])  # [S]
        rng = np.random.Generator(np.random.PCG64(mix_seed(self.seed, self.epoch, 0x5A3)))
        return draws[rng.permutation(len(draws))]


def open_mixture(path, split: str, fmt: Optional[str], *, train_split: str = "train", weights=None,
                 samples_per_epoch: Optional[int] = None, need_labels: bool = True) -> PackedMixture:
    """Open `split` of every part of data.path in format `fmt` (None: the best every part has) as
    a PackedMixture; one packed dataset is a mixture of one part. A problem with one of several
    parts is a MixtureError naming the part; a single dataset's own errors (PackedError) pass as they are."""
    specs = parse_parts(path)
    w = check_weights(weights, len(specs))
    splits = part_splits(specs, split, train_split)
    many = len(specs) > 1
    if fmt is None and many:  # one dataset: open_packed picks its best format
        fmt = common_format(specs)
    parts = []
    for k, (spec, s) in enumerate(zip(specs, splits)):
        try:
            parts.append(open_packed(spec.path, s, fmt))
        except (PackedError, OSError) as e:
            if not many:
                raise
            raise MixtureError(f"mixture part {k} ({spec.path}:{s}): {e}") from None
    return PackedMixture(parts, w, samples_per_epoch, need_labels)


def part_manifests(path) -> list[tuple[PartSpec, dict]]:
    """(spec, manifest) per part; a missing or unreadable part is an error naming it."""
    out = []
    specs = parse_parts(path)
    for k, spec in enumerate(specs):
        try:
            out.append((spec, read_manifest(spec.path)))
        except (PackedError, OSError, ValueError) as e:
            raise MixtureError(f"mixture part {k} ({spec.path}): {e}" if len(specs) > 1 else str(e)) from None
    return out


def packed_resize_mode(path) -> str:
    """How data.path's frames were fitted to the square (the converter's --resize; a mixture's
    first part, as its label names and size); squash for data packed without the key."""
    return part_manifests(path)[0][1].get("resize", "squash")


def missing_split(path, split: str, train_split: str = "train") -> list[str]:
    """Parts of data.path that lack `split` (their ':SPLIT' for the training split), as
    'PATH (has a, b)' strings; [] when every part has it."""
    mans = part_manifests(path)
    splits = part_splits([s for s, _ in mans], split, train_split)
    return [f"{spec.path}:{s} (it has {', '.join(m.get('splits', {}))})"
            for (spec, m), s in zip(mans, splits) if s not in m.get("splits", {})]


def shared_formats(mans) -> list[str]:
    """The packed formats every part (part_manifests) has, best first (raw > ffcv > dali)."""
    have = [set(m.get("formats", [])) for _, m in mans]
    return [f for f in FORMAT_PREFERENCE if all(f in h for h in have)]


def common_format(specs: Sequence[PartSpec]) -> str:
    """The best packed format every part has (raw > ffcv > dali)."""
    mans = part_manifests([s.path for s in specs])
    formats = shared_formats(mans)
    if formats:
        return formats[0]
    have = [set(m.get("formats", [])) for _, m in mans]
    raise MixtureError("mixture parts share no packed format: " +
                       "; ".join(f"part {k} {s.path} has {sorted(h)}" for k, (s, h) in enumerate(zip(specs, have))))
