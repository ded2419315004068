"""The raw loader: uint8 memmap -> pinned uint8 batches gathered in a background thread ->
batched device augmentation.

Bigger than memory: each part's file is mapped here with madvise advice (data.raw_advice). With the
kernel's default, every page fault of a random gather pulls the disk's whole readahead window
(a 20 GB mixture, cold cache: 7,984 MB read for 84 MB of images); MADV_RANDOM makes a fault read its
own pages only (auto for shuffled training). data.block_shuffle gives a page-aware order
(sampler.block_permutation): a batch reads a few contiguous runs, so readahead pays again and auto
picks MADV_SEQUENTIAL, as for in-order evaluation. Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import mmap
import queue
from collections import deque

import numpy as np
import torch

from .base import BaseLoader, LoaderError, LoaderSpec, Prefetcher

ADVICE = {"random": mmap.MADV_RANDOM, "sequential": mmap.MADV_SEQUENTIAL, "normal": mmap.MADV_NORMAL}


def map_advised(path, shape: tuple[int, ...], advice: str) -> np.ndarray:
    """A read-only uint8 array [N, H, W] over `path`, its mapping madvise'd with `advice`.

    Mapped here (mmap + np.frombuffer) rather than through np.memmap because madvise needs the
    mmap object, which np.memmap keeps private."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the mapping outlives the descriptor
    m.madvise(ADVICE[advice])
    return np.frombuffer(m, dtype=np.uint8).reshape(shape)

class RawLoader(BaseLoader):
    """uint8 memmap -> pinned uint8 batches (background thread) -> batched device augmentation."""
    name = "raw"

    def __init__(self, packed, spec: LoaderSpec):
        super().__init__(packed, spec)
        # one mapping per part (a single packed dataset is a mixture of one): [N_k, H, W] uint8
        advice = self.cfg.raw_advice
        if advice == "auto":  # page-aware blocks and in-order eval read runs: keep (doubled) readahead
            advice = "random" if self.train and not self.sampler.block else "sequential"
        if advice not in ADVICE:
            raise LoaderError(f"data.raw_advice must be auto or one of {', '.join(ADVICE)}, got {advice!r}")
        self.advice = advice
        self.parts = [p.images if len(p) == 0 else map_advised(p.images.filename, p.images.shape, advice)
                      for p in packed.parts]
        self.offsets = packed.offsets  # [P + 1]
        self.images = self.parts[0] if len(self.parts) == 1 else None  # [N, H, W] (one part)
        self.labels = np.ascontiguousarray(packed.labels, dtype=np.float32)  # [N, L]
        self.augment = self.make_augment()
        # Spent uint8 batch buffers, reused by the gather thread (CPU only). A fresh 8-16 MB buffer
        # per batch is fresh pages: ~1,500 page faults a 128-image batch, which held the host feed
        # to 15k img/s where a reused buffer fed 77k (memcpy of the same bytes: 150k). On CUDA the
        # batches are pinned, and torch's caching host allocator already reuses those pages.
        self._spare: queue.SimpleQueue = queue.SimpleQueue()
        self.buffers_allocated = 0  # fresh batch buffers so far (bounded by the batches in flight)

    def _take(self, idx: np.ndarray, out: np.ndarray) -> None:
        """out[i] = image idx[i] (idx ascending): one vectorised gather per part, GIL released.

        np.take's default mode="raise" gathers into a temporary and copies it into `out` (numpy
        buffers `out` in that mode): a second copy of the batch into freshly faulted pages, which
        measured 2.8x slower than mode="clip" writing straight into `out`. The bounds are checked
        here instead (ascending: the first and last index)."""
        if len(idx) and (idx[0] < 0 or idx[-1] >= self.offsets[-1]):
            raise LoaderError(f"raw loader: image index {int(idx[0])}..{int(idx[-1])} outside the "
                              f"{int(self.offsets[-1])} images of {self.describe()}")
        if len(self.parts) == 1:
            np.take(self.parts[0], idx, axis=0, out=out, mode="clip")
            return
        # ascending global positions: each part's images are one contiguous run of the batch
        cut = np.searchsorted(idx, self.offsets)  # [P + 1] run boundaries
        for k, mm in enumerate(self.parts):
            a, b = int(cut[k]), int(cut[k + 1])
            if b > a:
                np.take(mm, idx[a:b] - self.offsets[k], axis=0, out=out[a:b], mode="clip")

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
            self.packed.check_raw_file()  # a vanished/truncated file: clear error, not SIGBUS
            buf = self._buffer((len(idx), h, w))  # [b, H, W]
            self._take(idx, buf.numpy())  # one gather per part, GIL released
            labels = torch.from_numpy(self.labels[idx])  # [b, L] (fancy indexing copies)
            aug = self.augment.plan(len(idx), self.sampler.rng(step)) if plan else None
            yield step, buf, labels, torch.from_numpy(idx), aug

    def _buffer(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """A uint8 batch buffer: a spent one of this shape if there is one (CPU), else a fresh one
        (pinned on CUDA). Spares of another shape (an epoch's short last batch) are dropped."""
        if not self.pin:
            try:
                while True:
                    buf = self._spare.get_nowait()
                    if tuple(buf.shape) == shape:
                        return buf
            except queue.Empty:
                pass
        self.buffers_allocated += 1
        return torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin)

    def _recycle(self, buf: torch.Tensor) -> None:
        """Hand a spent batch buffer back to the gather thread (CPU: the augmentation's output
        never aliases its input, and it has run by the time this is called)."""
        if not self.pin and self.augment.device.type == "cpu":
            self._spare.put(buf)

    def feed(self):
        """uint8 batches ready for the device (pinned on CUDA), prefetched in the thread.
        On the CPU a batch's buffer is reused once two more batches have been taken (as FFCV's
        loader reuses its buffers): copy a batch to keep it longer."""
        held: deque = deque()
        for _, x, y, _, _ in Prefetcher(self._gather(plan=False), self.cfg.prefetch):
            yield x, y
            held.append(x)
            if len(held) > 1:
                self._recycle(held.popleft())

    def iter_with_index(self):
        """(images, labels, positions in the split): for tests and label-alignment checks."""
        for _, x, y, i, plan in Prefetcher(self._gather(), self.cfg.prefetch):
            images = self.augment.apply(x, plan)
            self._recycle(x)
            yield images, y, i

    def __iter__(self):
        for _, x, y, _, plan in Prefetcher(self._gather(), self.cfg.prefetch):
            images = self.augment.apply(x, plan)  # [b, C, h, w] on device
            self._recycle(x)
            yield images, y.to(self.device, non_blocking=True)

    def describe(self) -> str:
        if len(self.packed.parts) > 1:
            return f"raw memmaps (madvise {self.advice}) of a mixture: {self.packed.describe()}"
        return f"raw memmap {self.packed.root}/raw/{self.packed.split}.u8 (madvise {self.advice})"
