"""FFCV loader: FFCV's compiled pipeline reads uint8 [H, W] arrays from the .beton (pages through
the OS cache or FFCV's own cache), then the shared batched device augmentation.

Order: ours, not FFCV's traversal orders. One dataset reads as a mixture of one part
(mixture.open_mixture), so every FFCV read follows the raw loader's EpochSampler / MixtureSampler:
one permutation per (seed, epoch) (page-aware blocks only with data.block_shuffle), DDP shards of
it without torch.distributed and without padding (evaluation scores every image once), and
mid-epoch resume that never reads the skipped batches. FFCV's own orders differ: QUASI_RANDOM (its
single-process default) is a page-aware shuffle, not a permutation, and its distributed orders wrap
torch's DistributedSampler, which repeats samples to pad the last round.
Each part has one FFCV Loader in SEQUENTIAL order; its EpochIterator reads, in the global order, the
images of that part in this rank's shard (FFCV's Loader.__iter__ has no skip; we replicate its
four lines); batch t is then assembled from the parts in the counts the global batch t holds (one
copy), so every batch is the one the raw loader yields (its images grouped by part inside the batch).
"""
from __future__ import annotations

import numpy as np
import torch

from fasttrain.format.ffcv import keep_torch_threads

from .base import INSTALL_HINT, BaseLoader, LoaderError, LoaderSpec
from .sampler import batch_rng


def _import_ffcv():
    try:
        with keep_torch_threads():  # FFCV's compiler module sets torch to 1 thread on import
            from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.loader.epoch_iterator import EpochIterator
            from ffcv.pipeline.compiler import Compiler
            from ffcv.transforms import Squeeze, ToDevice, ToTensor
    except ImportError as e:
        raise LoaderError(f"the ffcv loader needs FFCV, which failed to import ({e}); install it with "
                          f"{INSTALL_HINT['ffcv']}") from e
    return dict(IntDecoder=IntDecoder, NDArrayDecoder=NDArrayDecoder, Loader=Loader, OrderOption=OrderOption,
                EpochIterator=EpochIterator, Compiler=Compiler, Squeeze=Squeeze, ToDevice=ToDevice,
                ToTensor=ToTensor)


class FFCVLoader(BaseLoader):
    name = "ffcv"

    def __init__(self, packed, spec: LoaderSpec):
        super().__init__(packed, spec)
        f = self._ffcv = _import_ffcv()
        self.loaders = []  # one per part
        for p in self.packed.parts:
            with keep_torch_threads():  # Loader.__init__ sets torch's threads to num_workers
                # SEQUENTIAL and no drop: the order we pass to each EpochIterator is the one read
                self.loaders.append(f["Loader"](p.beton, order=f["OrderOption"].SEQUENTIAL, **self._loader_args()))
        self.augment = self.make_augment()

    def _loader_args(self) -> dict:
        """FFCV Loader arguments (a fresh pipeline per Loader: FFCV's operations keep state); no
        distributed, no drop: our sampler shards and drops."""
        f = self._ffcv
        image_ops = [f["NDArrayDecoder"](), f["ToTensor"]()]
        if self.device.type == "cuda":
            image_ops.append(f["ToDevice"](self.device, non_blocking=True))
        pipelines = {
            "image": image_ops,  # [B, H, W] uint8
            "label": [f["NDArrayDecoder"](), f["ToTensor"]()],  # [B, L] float32
            "index": [f["IntDecoder"](), f["ToTensor"](), f["Squeeze"]()],  # [B] int64 position in split
        }
        return dict(batch_size=self.batch_size, num_workers=max(1, int(self.cfg.num_workers)),
                    os_cache=bool(self.cfg.os_cache), distributed=False, seed=self.seed,
                    pipelines=pipelines, drop_last=False, batches_ahead=max(1, int(self.cfg.prefetch)))

    def _part_iterator(self, k: int, order: np.ndarray):
        f, L = self._ffcv, self.loaders[k]
        with keep_torch_threads():
            f["Compiler"].set_num_threads(L.num_workers)
        if L.code is None:
            L.generate_code()
        with keep_torch_threads():
            return f["EpochIterator"](L, order)

    def _epoch_iterator(self):
        """Batches start_step.. of this rank's shard of the global order: (images, labels, global index)."""
        b, s = self.batch_size, self.sampler
        sel = s.shard()[self.start_step * b: len(s) * b]  # global positions, reading order
        part, local = self.packed.locate(sel)
        n_parts = len(self.loaders)
        its = [self._part_iterator(k, local[part == k]) if (part == k).any() else None for k in range(n_parts)]
        pending: list = [None] * n_parts  # (x, y, i) not yet used, per part
        labels = self.packed.labels  # [N, L] float32, the parts' labels in the global index space

        def take(k: int, c: int):
            out = []
            while c > 0:
                if pending[k] is None or len(pending[k][0]) == 0:
                    pending[k] = next(its[k])
                x, y, i = pending[k]
                i = i.reshape(-1)  # FFCV's Squeeze makes a batch of one 0-dim
                m = min(c, len(x))
                out.append((x[:m], None, i[:m] + int(self.packed.offsets[k])))
                # the rest waits for the next batch: copy it out of FFCV's recycled buffers
                pending[k] = (x[m:].clone(), None, i[m:].clone()) if m < len(x) else None
                c -= m
            return out

        try:
            for t in range(0, len(sel), b):
                counts = np.bincount(part[t:t + b], minlength=n_parts)
                pieces = [piece for k in range(n_parts) if counts[k] for piece in take(k, int(counts[k]))]
                gi = torch.cat([p[2] for p in pieces])  # [b] global positions
                # one piece (one dataset, or a batch from one part): FFCV's batch as is, no copy
                x = pieces[0][0] if len(pieces) == 1 else torch.cat([p[0] for p in pieces])
                # labels from the mixture's table (parts may carry different label names: then [b, 0])
                yield x, torch.from_numpy(labels[gi.numpy()]), gi
        finally:  # an epoch left early: stop every part's reader thread
            for it in its:
                if it is not None:
                    it.close()

    def feed(self):
        for x, y, _ in self._epoch_iterator():
            yield x, y

    def __iter__(self):
        step = self.start_step
        for x, y, _ in self._epoch_iterator():
            images = self.augment(x, rng=self._rng(step))  # [b, C, h, w]
            # FFCV reuses its (pinned) output buffers batches_ahead + 2 batches later, and its
            # worker thread overwrites them on the host without waiting for the device. A
            # non-blocking copy straight from that buffer would read it whenever the stream gets
            # there (the trainer queues steps ahead), possibly after the overwrite: copy the tiny
            # [B, L] labels out on the host first (pageable: the device copy stages it at once).
            yield images, y.clone().to(self.device, non_blocking=True)
            step += 1

    def iter_with_index(self):
        """(images, labels, positions in the split): for tests and label-alignment checks."""
        step = self.start_step
        for x, y, i in self._epoch_iterator():
            yield self.augment(x, rng=self._rng(step)), y.clone(), i.clone()
            step += 1

    def _rng(self, step: int) -> np.random.Generator:
        return batch_rng(self.seed, self.epoch, self.rank, step)

    def describe(self) -> str:
        return (f"ffcv (os_cache={bool(self.cfg.os_cache)}), one SEQUENTIAL reader per part in our sampler's "
                f"order: {self.packed.describe()}")
