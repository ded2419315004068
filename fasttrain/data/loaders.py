"""`build_loader`: one entry point that turns a packed split into device batches.

    loader = build_loader(cfg.data, "train", train=True, img_size=224, in_chans=1, device="cuda")
    loader.set_epoch(epoch, start_step)      # order + augmentation fixed by (seed, epoch)
    for images, labels in loader: ...        # [B, C, H, W] channels-last `dtype`, [B, L] float32

Loaders (data.loader, or `auto`: raw > ffcv > dali among the formats written, else reference):
  raw        memmap -> uint8 batches (pinned on CUDA) in a background thread -> BatchAugment
  ffcv       FFCV's compiled Loader over the .beton -> uint8 batches -> BatchAugment
  dali       DALI pipeline over the webdataset shards (GPU decode + augment on CUDA; CPU decode +
             BatchAugment otherwise)
  reference  PIL + torch DataLoader + torchvision transforms per sample (the baseline's path): the
             benchmark's baseline and the oracle for the augmentation semantics

Every loader also offers `feed()`: the host side alone, yielding the uint8 batches that would go
to the device (what `fasttrain bench loader` reports as feed_images_per_s).
"""
from __future__ import annotations

from typing import Optional

import torch

from fasttrain.format.packed import PackedError

# the registry sits above the format loaders (imports run base -> *_loader -> loaders)
from .base import LOADERS, LoaderError, LoaderSpec, device_with_index
from .dali_loader import DALILoader
from .ffcv_loader import FFCVLoader
from .mixture import MixtureError, open_mixture, part_manifests, part_splits, shared_formats
from .raw_loader import RawLoader
from .reference import ReferenceLoader
from .subset import select as select_subset


# ----------------------------------------------------------------------------- entry point

def _pick(data_cfg, formats: list[str]) -> str:
    kind = data_cfg.loader
    if kind == "auto":
        return formats[0] if formats else "reference"  # (formats: best first, mixture.shared_formats)
    if kind not in LOADERS:
        raise LoaderError(f"data.loader must be auto or one of {', '.join(LOADERS)}, got {kind!r}")
    return kind


def build_loader(data_cfg, split: str, train: bool, *, img_size: int, in_chans: int, rank: int = 0,
                 world_size: int = 1, device="cpu", dtype=torch.float32, seed: int = 0,
                 drop_last: Optional[bool] = None, batch_size: Optional[int] = None, need_labels: bool = True):
    """The loader for one split of the packed dataset(s) at data_cfg.path (see the module docstring).

    data_cfg.path may name several packed datasets (a mixture, fasttrain.data.mixture): every
    loader kind then reads one global order over all parts. drop_last defaults to `train` (equal
    step counts on every rank; evaluation keeps every image); batch_size defaults to
    data_cfg.batch_size (per rank). need_labels=False (pre-training, benchmarks) lets a mixture's
    parts carry different label names.
    """
    if not data_cfg.path:
        raise LoaderError("data.path is not set: point it at a packed dataset (written by `fasttrain convert`)")
    try:
        mans = part_manifests(data_cfg.path)
    except MixtureError as e:
        raise LoaderError(str(e)) from None
    many = len(mans) > 1
    splits = part_splits([s for s, _ in mans], split, data_cfg.train_split)
    for k, ((spec, manifest), s) in enumerate(zip(mans, splits)):
        if s not in manifest.get("splits", {}):
            where = f"mixture part {k} ({spec.path})" if many else spec.path
            raise LoaderError(f"{where}: no split '{s}'; it has {sorted(manifest.get('splits', {}))}")
    per_part = [list(m.get("formats", [])) for _, m in mans]
    formats = shared_formats(mans)  # what every part has
    kind = _pick(data_cfg, formats)
    if kind != "reference" and kind not in formats:
        lacking = [f"{'part %d ' % k if many else ''}{spec.path} (has {fs})"
                   for k, ((spec, _), fs) in enumerate(zip(mans, per_part)) if kind not in fs]
        raise LoaderError(f"data.loader={kind} but format '{kind}' was not written in {'; '.join(lacking)}; "
                          f"convert again with `fasttrain convert ... --format {kind}`")
    if not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is outside world_size {world_size}")
    spec = LoaderSpec(train=bool(train), img_size=int(img_size), in_chans=int(in_chans),
                      batch_size=int(batch_size or data_cfg.batch_size), rank=int(rank), world_size=int(world_size),
                      device=device_with_index(device), dtype=dtype, seed=int(seed),
                      drop_last=bool(train if drop_last is None else drop_last), cfg=data_cfg)
    try:
        packed = open_mixture(data_cfg.path, split, None if kind == "reference" else kind,
                              train_split=data_cfg.train_split, weights=data_cfg.weights,
                              samples_per_epoch=data_cfg.samples_per_epoch, need_labels=need_labels)
        # data.views / data.label_fraction: the positions the sampler draws from (None: all)
        subset = select_subset(packed, data_cfg, split, seed, need_labels)
        packed.subset = subset
        if kind == "raw":
            return RawLoader(packed, spec)
        if kind == "ffcv":
            return FFCVLoader(packed, spec)
        if kind == "dali":
            return DALILoader(packed, spec)
        return ReferenceLoader(packed, spec)
    except (PackedError, MixtureError) as e:
        raise LoaderError(str(e)) from None
