"""What every loader is built on: the errors, the background prefetcher, `BaseLoader` (the
interface the trainer sees; every loader reads in the order of our EpochSampler).

The bottom layer of fasttrain.data: the format loaders (raw_loader, ffcv_loader, dali_loader,
reference) import it, and loaders.py (the registry, `build_loader`) imports them; nothing here
imports upwards.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

from .gpu_augment import BatchAugment
from .sampler import EpochSampler

log = logging.getLogger("fasttrain.data")

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
    closing the consumer early stops the producer (it puts with a timeout and checks the stop flag)
    and waits for it to finish the item in hand: a daemon thread still inside a torch op when the
    interpreter exits is killed as it re-takes the GIL, and that unwinds through C++ frames that
    may not throw ("terminate called without an active exception", exit -6 after a finished run).
    The thread is a daemon all the same, so one stuck past `join_timeout_s` cannot keep the
    process alive.
    Why not a torch DataLoader: batches are produced by one vectorised gather each (numpy releases
    the GIL), so worker processes would only add IPC copies.
    """

    join_timeout_s = 60.0  # longer than any one batch takes to produce

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
        """Stop the producer and wait until its thread has ended (see the class docstring)."""
        self._stop.set()
        try:  # unblock a producer waiting on a full queue
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(self.join_timeout_s)
            if self._thread.is_alive():
                log.warning("%s: the prefetch thread is still producing after %.0f s", self._thread.name,
                            self.join_timeout_s)


# ----------------------------------------------------------------------------- common base

@dataclass(frozen=True)
class LoaderSpec:
    """How a loader reads its split: build_loader decides it once, every loader is built from it
    (and has each field as an attribute of the same name)."""
    train: bool  # shuffled order + random augmentation; False: every image once, in order
    img_size: int  # the model's input side
    in_chans: int
    batch_size: int  # per rank
    rank: int
    world_size: int
    device: torch.device  # with its index (device_with_index)
    dtype: torch.dtype  # of the augmented images
    seed: int  # order and augmentation are functions of (seed, epoch)
    drop_last: bool
    cfg: Any  # the data config (fasttrain.config.DataConfig)

    def sampler_args(self) -> dict:
        """EpochSampler's keywords for this rank (block_shuffle from the data config)."""
        return dict(shuffle=self.train, seed=self.seed, rank=self.rank, world_size=self.world_size,
                    drop_last=self.drop_last, block=int(getattr(self.cfg, "block_shuffle", 0) or 0))


def device_with_index(device) -> torch.device:
    """`device` as a torch.device; "cuda" gets the current index now: the raw loader's prefetch
    thread makes device tensors, and a new thread's current device is cuda:0 whatever
    torch.cuda.set_device said in this one."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class BaseLoader:
    """What the trainer sees: len, set_epoch, iteration, label_names, num_samples.

    num_samples: images this rank yields per epoch; dataset_size: images in the split.
    `packed` is a PackedMixture (fasttrain.data.mixture; one dataset is a mixture of one part).
    """
    name = "base"

    def __init__(self, packed, spec: LoaderSpec):
        self.packed = packed
        self.spec = spec
        for f in fields(spec):  # self.train, self.batch_size, self.device, ...
            setattr(self, f.name, getattr(spec, f.name))
        self.label_names: list[str] = list(packed.label_names)
        subset = packed.subset  # data.views / label_fraction: the images this loader reads
        self.dataset_size: int = len(packed) if subset is None else len(subset)
        self.image_size: tuple[int, int] = tuple(packed.image_size)
        self.epoch, self.start_step = 0, 0
        self.pin = self.device.type == "cuda"
        if min(self.image_size) < self.img_size:
            raise LoaderError(f"{packed.root}: packed images are {self.image_size[0]}x{self.image_size[1]} px, "
                              f"smaller than img_size {self.img_size}; convert again with a larger --size")
        # every loader kind reads in our order: one global permutation over every part per epoch
        # (mixture.MixtureSampler), sharded over ranks
        self.sampler = self.make_sampler(packed)

    def make_augment(self) -> BatchAugment:
        """The batched augmentation every packed loader shares (crop, flip, RandAugment, normalise),
        built from the data config in this one place; a bad policy or interpolation is a LoaderError."""
        c = self.cfg
        try:
            return self._make_augment(c)
        except ValueError as e:
            raise LoaderError(f"data config: {e}") from None

    def _make_augment(self, c) -> BatchAugment:
        return BatchAugment(self.image_size, self.img_size, self.in_chans, train=self.train,
                            scale=tuple(c.crop_scale), ratio=tuple(c.crop_ratio), hflip=c.hflip, norm=c.norm,
                            eval_resize=c.eval_resize, device=self.device, dtype=self.dtype,
                            interpolation=c.interpolation, randaug=c.randaug)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if start_step < 0 or start_step > len(self):
            raise ValueError(f"start_step {start_step} is outside epoch's {len(self)} batches")
        self.epoch, self.start_step = int(epoch), int(start_step)
        self.sampler.set_epoch(epoch, start_step)

    @property
    def num_samples(self) -> int:
        """Images an epoch of self.sampler yields on this rank (the dropped tail left out)."""
        s = self.sampler
        return s.shard_size - (s.shard_size % self.batch_size if self.drop_last else 0)

    def __len__(self) -> int:
        return len(self.sampler)

    def describe(self) -> str:
        return self.name

    def make_sampler(self, packed) -> EpochSampler:
        """Our order over `packed`: one global order over every part (mixture.MixtureSampler); every
        loader kind reads by it."""
        return packed.make_sampler(self.batch_size, **self.spec.sampler_args())

    def data_parts(self) -> list[dict]:
        """What this loader reads, for the run's provenance: per part path, split, count, manifest
        hash, weight (one part for a single packed dataset)."""
        subset = self.packed.subset_info  # what data.views / label_fraction kept
        parts = self.packed.provenance()
        if subset is not None:
            for part in parts:
                part["subset"] = subset
        return parts
