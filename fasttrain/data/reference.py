"""The reference loader: the per-sample path of the baseline code, kept as the benchmark baseline and as the
oracle for the augmentation semantics.

Per sample, in torch DataLoader workers: PIL `Image.open`, `.convert('RGB')`, then torchvision
    train: RandomResizedCrop(img_size, scale, ratio, data.interpolation) -> RandomHorizontalFlip(hflip)
    eval:  Resize(R) -> CenterCrop(img_size)      (R = gpu_augment.eval_resize_size, as the fast loaders)
    -> ToTensor -> Normalize(mean, std)            (3 channels; 1-channel models keep channel 0,
                                                    normalised with the 1-channel stats)
    fine-tuning with RandAugment (data.randaug set): timm's own
    `create_transform(is_training=True, scale, ratio, hflip, interpolation, auto_augment=randaug,
    color_jitter=None, re_prob=0, mean, std)`, as Xiao et al. ran it: the oracle for
    fasttrain.data.randaug and the fine-tuning benchmark's baseline.
Images come from one of two places, and `describe()` says which:
  - a folder of PNGs of the packed images (`data.reference_images`, written by `export_png`): the
    same pixels the packed loaders read, so outputs are comparable image for image;
  - the source files of the packed ids (manifest "source" + `splits/<split>.files.txt`; see
    resolve_source_files): the baseline's exact inputs (e.g. 1024-px NIH PNGs).
Workers are persistent (forked at the first epoch): the epoch travels with each index.
Determinism: each sample's augmentation draws come from torch's RNG seeded with
(seed, epoch, rank, position in the split), so they do not depend on the worker count or on where
the epoch was resumed.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fasttrain.io import write_atomic_with

from .base import BaseLoader, LoaderError, LoaderSpec
from .gpu_augment import eval_resize_size, norm_stats
from .randaug import parse_policy
from .sampler import EpochSampler, mix_seed


def png_name(sample_id: str) -> str:
    """File name of a packed image in a PNG folder: the id, '/' -> '__', '.png' appended if needed."""
    name = sample_id.replace("/", "__")
    return name if name.lower().endswith(".png") else name + ".png"


def export_png(packed, out_dir) -> Path:
    """Write every image of a packed split as an 8-bit gray PNG named png_name(id) (atomic per file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, sid in enumerate(packed.ids):
        img = Image.fromarray(packed.image(i))
        write_atomic_with(out / png_name(sid), lambda f: img.save(f, format="PNG", compress_level=1))
    return out


def resolve_source_files(packed) -> list[str]:
    """Each id's source image file: `splits/<split>.files.txt` (paths relative to the manifest's
    source folder, written by the converters), else `<source>/<id>`, else a file-name lookup under
    the source folder (packs without files.txt)."""
    src = Path(packed.manifest.get("source") or "")
    meta = packed.manifest["splits"][packed.split]
    hint = "set data.reference_images to a PNG folder (fasttrain.data.reference.export_png writes one)"
    if not src.is_dir():
        raise LoaderError(f"{packed.root}: the reference loader reads the source images, but the manifest's "
                          f"source folder {src} does not exist here; {hint}")
    if meta.get("files"):
        rel = (packed.root / meta["files"]).read_text().splitlines()
        files = [str(src / r) for r in rel]
    else:
        direct = [src / sid for sid in packed.ids]
        if all(p.is_file() for p in direct):
            return [str(p) for p in direct]
        by_name: dict[str, Path] = {}
        for p in src.rglob("*"):
            if p.is_file():
                by_name.setdefault(p.name, p)
        files = [str(by_name.get(Path(sid).name, src / sid)) for sid in packed.ids]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or len(files) != len(packed.ids):
        raise LoaderError(f"{packed.root}: {len(missing)} source image(s) of split '{packed.split}' not found "
                          f"under {src} (e.g. {missing[:3]}), or the files list does not match the ids; {hint}")
    return files


class _FirstChannels:
    """Keep the first c channels ([3, h, w] -> [c, h, w]); the gray image is replicated by convert('RGB')."""

    def __init__(self, c: int):
        self.c = c

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[: self.c]


class ReferenceDataset(torch.utils.data.Dataset):
    """Indexed by (epoch, position): the epoch travels with each index, so persistent workers
    (forked once) still draw each epoch's augmentation."""

    def __init__(self, files: list[str], labels: np.ndarray, transform, seed: int, rank: int):
        self.files, self.labels, self.transform = files, labels, transform
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        with Image.open(self.files[i]) as im:
            img = im.convert("RGB")  # the baseline's path: gray replicated to 3 channels
        # per-sample draws from (seed, epoch, rank, i); fork_rng leaves the caller's RNG alone.
        # timm's transforms draw from Python's `random` and numpy's global RNG: seeded (and restored) too
        s = mix_seed(self.seed, epoch, self.rank, i, 0x4EF)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % 2**32)
                x = self.transform(img)  # [C, h, w] float32
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return x, torch.tensor(self.labels[i]), i  # [C, h, w], [L], position


class _EpochBatches:
    """batch_sampler over the loader's current (epoch, start_step): re-read at every iter()."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __iter__(self):
        e = self.sampler.epoch
        for _, idx in self.sampler.batches():
            yield [(e, int(i)) for i in idx]

    def __len__(self) -> int:
        return len(self.sampler) - self.sampler.start_step


class ReferenceLoader(BaseLoader):
    name = "reference"

    def __init__(self, packed, spec: LoaderSpec):
        super().__init__(packed, spec)
        import torchvision.transforms as T  # heavy: only the reference loader needs torchvision
        cfg = self.cfg
        if cfg.reference_images:
            folder = Path(cfg.reference_images)
            self.files = [str(folder / png_name(sid)) for sid in packed.ids]
            missing = [f for f in self.files if not os.path.isfile(f)]
            if missing:
                raise LoaderError(f"data.reference_images={folder}: {len(missing)} of {len(self.files)} PNGs missing, "
                                  f"e.g. {missing[0]} (write them with fasttrain.data.reference.export_png)")
            self.source = f"PNG folder of the packed images {folder}"
        else:
            # each part's files, in the global index order
            self.files = [f for p in packed.parts for f in resolve_source_files(p)]
            self.source = "source files under " + ", ".join(str(p.manifest.get("source")) for p in packed.parts)
        self.labels = np.array(packed.labels, dtype=np.float32)  # [N, L] writable copy
        mean, std = norm_stats(cfg.norm, self.in_chans)
        mean3, std3 = (mean * 3, std * 3) if self.in_chans == 1 else (mean, std)
        modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
        if cfg.interpolation not in modes:
            raise LoaderError(f"data.interpolation must be one of {tuple(modes)}, got {cfg.interpolation!r}")
        bil = modes[cfg.interpolation]
        self.finetune_aug = self.train and cfg.randaug is not None
        if self.finetune_aug:
            self.transform = T.Compose([self._timm_transform(cfg, mean3, std3), _FirstChannels(self.in_chans)])
        elif self.train:
            geo = [T.RandomResizedCrop(self.img_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                       interpolation=bil),
                   T.RandomHorizontalFlip(cfg.hflip)]
        else:  # evaluation stays bilinear whatever data.interpolation (the packed loaders' and predict's)
            r = eval_resize_size(self.image_size, self.img_size, cfg.eval_resize)
            geo = [T.Resize(r, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(self.img_size)]
        if not self.finetune_aug:
            self.transform = T.Compose(geo + [T.ToTensor(), T.Normalize(mean3, std3), _FirstChannels(self.in_chans)])
        self._dl = None

    def _timm_transform(self, cfg, mean3, std3):
        """timm's training transform with our settings (Xiao et al.'s create_transform call)."""
        from timm.data import create_transform  # heavy: only fine-tuning's reference path needs timm
        if cfg.randaug is not None:
            try:
                parse_policy(cfg.randaug)  # the same errors as the packed loaders (timm would assert)
            except ValueError as e:
                raise LoaderError(f"data.randaug: {e}") from None
        return create_transform(self.img_size, is_training=True, scale=tuple(cfg.crop_scale),
                                ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip, color_jitter=None,
                                auto_augment=cfg.randaug, interpolation=cfg.interpolation, re_prob=0.0,
                                mean=tuple(mean3), std=tuple(std3))

    def _dataloader(self):
        if self._dl is None:  # one DataLoader, persistent workers: forked once, not every epoch
            ds = ReferenceDataset(self.files, self.labels, self.transform, self.seed, self.rank)
            workers = max(0, int(self.cfg.num_workers))
            self._dl = torch.utils.data.DataLoader(
                ds, batch_sampler=_EpochBatches(self.sampler), num_workers=workers, pin_memory=self.pin,
                persistent_workers=workers > 0, prefetch_factor=max(1, int(self.cfg.prefetch)) if workers else None)
        return self._dl

    def iter_with_index(self):
        for x, y, i in self._dataloader():
            yield self._to_device(x), y, i

    def feed(self):
        """For the reference the host side *is* the whole pipeline (per-sample CPU transforms)."""
        for x, y, _ in self._dataloader():
            yield x, y

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def __iter__(self):
        for x, y, _ in self._dataloader():
            yield self._to_device(x), y.to(self.device, non_blocking=True)

    def describe(self) -> str:
        how = "timm create_transform" if self.finetune_aug else "PIL + torchvision"
        return f"reference ({how} per sample) reading {self.source}"
