"""The raw loader: uint8 memmap -> pinned uint8 batches gathered in a background thread ->
batched device augmentation."""
from __future__ import annotations

import numpy as np
import torch

from .base import Prefetcher, SampledLoader

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
            self.packed.check_raw_file()  # a vanished/truncated file: clear error, not SIGBUS
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
