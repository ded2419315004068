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
        # one memmap per part (a single packed dataset is a mixture of one): [N_k, H, W] uint8
        self.parts = [p.images for p in packed.parts] if hasattr(packed, "parts") else [packed.images]
        self.offsets = getattr(packed, "offsets", np.array([0, len(packed)], np.int64))  # [P + 1]
        self.images = self.parts[0] if len(self.parts) == 1 else None  # [N, H, W] (one part)
        self.labels = np.ascontiguousarray(packed.labels, dtype=np.float32)  # [N, L]
        self.augment = self.make_augment()

    def _take(self, idx: np.ndarray, out: np.ndarray) -> None:
        """out[i] = image idx[i] (idx ascending): one vectorised gather per part, GIL released."""
        if len(self.parts) == 1:
            np.take(self.parts[0], idx, axis=0, out=out)
            return
        # ascending global positions: each part's images are one contiguous run of the batch
        cut = np.searchsorted(idx, self.offsets)  # [P + 1] run boundaries
        for k, mm in enumerate(self.parts):
            a, b = int(cut[k]), int(cut[k + 1])
            if b > a:
                np.take(mm, idx[a:b] - self.offsets[k], axis=0, out=out[a:b])

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
            self._take(idx, buf.numpy())  # one gather per part, GIL released
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
        if hasattr(self.packed, "parts"):
            return f"raw memmaps of a mixture: {self.packed.describe()}"
        return f"raw memmap {self.packed.root}/raw/{self.packed.split}.u8"
