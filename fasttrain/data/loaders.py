"""`build_loader`: one entry point that turns a packed split into device batches.

    loader = build_loader(cfg.data, "train", train=True, img_size=224, in_chans=1, device="cuda")
    loader.set_epoch(epoch, start_step)      # order + augmentation fixed by (seed, epoch)
    for images, labels in loader: ...        # [B, C, H, W] channels-last `dtype`, [B, L] float32

Loaders (data.loader, or `auto`: raw > ffcv > dali among the formats written, else reference):
  raw        memmap -> uint8 batches (pinned on CUDA) in a background thread -> BatchAugment
  ffcv       FFCV's compiled Loader over the .beton -> uint8 batches -> BatchAugment
  dali       DALI pipeline over the webdataset shards (GPU decode + augment on CUDA; CPU decode +
             BatchAugment otherwise)
  reference  PIL + torch DataLoader + torchvision transforms per sample (the seed's path): the
             benchmark's baseline and the oracle for the augmentation semantics

Every loader also offers `feed()`: the host side alone, yielding the uint8 batches that would go
to the device (what `fasttrain bench loader` reports as feed_images_per_s).
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .gpu_augment import BatchAugment
from .sampler import EpochSampler

LOADERS = ("raw", "ffcv", "dali", "reference")
INSTALL_HINT = {
    "ffcv": ("pip install -e .[ffcv]  (needs first: apt-get install -y --no-install-recommends "
             "pkg-config libturbojpeg0-dev libopencv-dev)"),
    "dali": "pip install -e .[dali]  (nvidia-dali-cuda130, matching torch's CUDA 13 build)",
}


class LoaderError(ValueError):
    """A loader that cannot be built: missing packed format, split, library or config value."""


# ----------------------------------------------------------------------------- background prefetch

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    """Run a generator in a daemon thread, `depth` items ahead, behind a bounded queue.

    Exceptions raised in the thread re-raise in the consumer; the end of the generator is a
    sentinel, so the consumer never waits on a thread that is gone (it also checks liveness);
    closing the consumer early stops the producer (it puts with a timeout and checks the stop flag),
    and the thread is a daemon, so it can never keep the process alive.
    Why not a torch DataLoader: batches are produced by one vectorised gather each (numpy releases
    the GIL), so worker processes would only add IPC copies.
    """

    def __init__(self, gen: Iterator, depth: int = 2, name: str = "fasttrain-prefetch"):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(gen,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, gen: Iterator) -> None:
        try:
            for item in gen:
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            self._put(_Failure(e))
            return
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()
        self._put(_END)

    def __iter__(self):
        try:
            while True:
                try:
                    item = self._q.get(timeout=0.5)
                except queue.Empty:
                    if not self._thread.is_alive() and self._q.empty():
                        raise RuntimeError("loader prefetch thread died without a result") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        try:  # unblock a producer waiting on a full queue
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass


# ----------------------------------------------------------------------------- common base

class BaseLoader:
    """What the trainer sees: len, set_epoch, iteration, label_names, num_samples.

    num_samples: images this rank yields per epoch; dataset_size: images in the split.
    """
    name = "base"

    def __init__(self, packed, *, train: bool, img_size: int, in_chans: int, batch_size: int,
                 rank: int, world_size: int, device, dtype, seed: int, drop_last: bool, cfg):
        self.packed = packed
        self.train = bool(train)
        self.img_size, self.in_chans = int(img_size), int(in_chans)
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # pin the index now: the raw loader's prefetch thread makes device tensors, and a new
            # thread's current device is cuda:0 whatever torch.cuda.set_device said in this one
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.cfg = cfg
        self.label_names: list[str] = list(packed.label_names)
        self.dataset_size: int = len(packed)
        self.image_size: tuple[int, int] = tuple(packed.image_size)
        self.epoch, self.start_step = 0, 0
        self.pin = self.device.type == "cuda"
        if min(self.image_size) < self.img_size:
            raise LoaderError(f"{packed.root}: packed images are {self.image_size[0]}x{self.image_size[1]} px, "
                              f"smaller than img_size {self.img_size}; convert again with a larger --size")

    def make_augment(self) -> BatchAugment:
        c = self.cfg
        return BatchAugment(self.image_size, self.img_size, self.in_chans, train=self.train,
                            scale=tuple(c.crop_scale), ratio=tuple(c.crop_ratio), hflip=c.hflip, norm=c.norm,
                            eval_resize=c.eval_resize, device=self.device, dtype=self.dtype)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if start_step < 0 or start_step > len(self):
            raise ValueError(f"start_step {start_step} is outside epoch's {len(self)} batches")
        self.epoch, self.start_step = int(epoch), int(start_step)

    @property
    def num_samples(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class SampledLoader(BaseLoader):
    """A loader whose order comes from our EpochSampler (raw, reference): FFCV and DALI order
    their own reads."""

    def __init__(self, packed, **kw):
        super().__init__(packed, **kw)
        self.sampler = EpochSampler(len(packed), self.batch_size, shuffle=self.train, seed=self.seed,
                                    rank=self.rank, world_size=self.world_size, drop_last=self.drop_last)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def num_samples(self) -> int:
        return self.sampler.shard_size - (self.sampler.shard_size % self.batch_size if self.drop_last else 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        super().set_epoch(epoch, start_step)
        self.sampler.set_epoch(epoch, start_step)


# ----------------------------------------------------------------------------- raw

class RawLoader(SampledLoader):
    """uint8 memmap -> pinned uint8 batches (background thread) -> batched device augmentation."""
    name = "raw"

    def __init__(self, packed, **kw):
        super().__init__(packed, **kw)
        self.images = packed.images  # [N, H, W] uint8 read-only memmap
        self.labels = np.ascontiguousarray(packed.labels, dtype=np.float32)  # [N, L]
        self.augment = self.make_augment()

    def _gather(self, plan: bool = True):
        """Host side: yields (step, uint8 [b, H, W], labels [b, L], positions [b], augmentation plan)
        in reading order; the plan (random draws + interpolation taps) is made here, in the thread."""
        h, w = self.image_size
        if self.pin:
            # this body runs in the prefetch thread, whose current CUDA device is cuda:0 until told
            # otherwise: pinned allocations and the plan's device ops would otherwise open a
            # context on GPU 0 in every DDP rank (torch's own pin-memory thread does the same)
            torch.cuda.set_device(self.device)
        for step, idx in self.sampler.batches():
            # ascending file offsets within a batch: sequential-ish page cache / readahead reads;
            # the batch's contents are unchanged, only their order inside the batch
            idx = np.sort(idx)
            buf = torch.empty((len(idx), h, w), dtype=torch.uint8, pin_memory=self.pin)  # [b, H, W]
            np.take(self.images, idx, axis=0, out=buf.numpy())  # one gather, GIL released
            labels = torch.from_numpy(self.labels[idx])  # [b, L] (fancy indexing copies)
            aug = self.augment.plan(len(idx), self.sampler.rng(step)) if plan else None
            yield step, buf, labels, torch.from_numpy(idx), aug

    def feed(self):
        """uint8 batches ready for the device (pinned on CUDA), prefetched in the thread."""
        for _, x, y, _, _ in Prefetcher(self._gather(plan=False), self.cfg.prefetch):
            yield x, y

    def iter_with_index(self):
        """(images, labels, positions in the split): for tests and label-alignment checks."""
        for _, x, y, i, plan in Prefetcher(self._gather(), self.cfg.prefetch):
            yield self.augment.apply(x, plan), y, i

    def __iter__(self):
        for _, x, y, _, plan in Prefetcher(self._gather(), self.cfg.prefetch):
            images = self.augment.apply(x, plan)  # [b, C, h, w] on device
            yield images, y.to(self.device, non_blocking=True)

    def describe(self) -> str:
        return f"raw memmap {self.packed.root}/raw/{self.packed.split}.u8"


# ----------------------------------------------------------------------------- entry point

def _pick(data_cfg, formats: list[str]) -> str:
    kind = data_cfg.loader
    if kind == "auto":
        return next((f for f in ("raw", "ffcv", "dali") if f in formats), "reference")
    if kind not in LOADERS:
        raise LoaderError(f"data.loader must be auto or one of {', '.join(LOADERS)}, got {kind!r}")
    return kind


def build_loader(data_cfg, split: str, train: bool, *, img_size: int, in_chans: int, rank: int = 0,
                 world_size: int = 1, device="cpu", dtype=torch.float32, seed: int = 0,
                 drop_last: Optional[bool] = None, batch_size: Optional[int] = None):
    """The loader for one split of the packed dataset at data_cfg.path (see the module docstring).

    drop_last defaults to `train` (equal step counts on every rank; evaluation keeps every image);
    batch_size defaults to data_cfg.batch_size (per rank).
    """
    from .packed import PackedError, open_packed, read_manifest

    if not data_cfg.path:
        raise LoaderError("data.path is not set: point it at a packed dataset (written by `fasttrain convert`)")
    root = Path(data_cfg.path)
    try:
        manifest = read_manifest(root)
    except PackedError as e:
        raise LoaderError(str(e)) from None
    if split not in manifest.get("splits", {}):
        raise LoaderError(f"{root}: no split '{split}'; it has {sorted(manifest.get('splits', {}))}")
    formats = list(manifest.get("formats", []))
    kind = _pick(data_cfg, formats)
    if kind != "reference" and kind not in formats:
        raise LoaderError(f"{root}: data.loader={kind} but format '{kind}' was not written (it has "
                          f"{formats}); convert again with `fasttrain convert ... --format {kind}`")
    if not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is outside world_size {world_size}")
    kw = dict(train=train, img_size=img_size, in_chans=in_chans,
              batch_size=int(batch_size or data_cfg.batch_size), rank=rank, world_size=world_size,
              device=device, dtype=dtype, seed=seed, drop_last=train if drop_last is None else drop_last,
              cfg=data_cfg)
    try:
        if kind == "raw":
            return RawLoader(open_packed(root, split, "raw"), **kw)
        if kind == "ffcv":
            from .ffcv_loader import FFCVLoader
            return FFCVLoader(open_packed(root, split, "ffcv"), **kw)
        if kind == "dali":
            from .dali_loader import DALILoader
            return DALILoader(open_packed(root, split, "dali"), **kw)
        from .reference import ReferenceLoader
        return ReferenceLoader(open_packed(root, split), **kw)
    except PackedError as e:
        raise LoaderError(str(e)) from None
