"""FFCV loader: FFCV's compiled pipeline reads uint8 [H, W] arrays from the .beton (pages through
the OS cache or FFCV's own cache), then the shared batched device augmentation.

Order (FFCV's own traversal orders, seeded by `Loader(seed=...)` and the epoch number):
  single process, train: QUASI_RANDOM (page-aware shuffle: each batch reads few pages; FFCV 1.0.2
    derives its seed as seed * 912300 + epoch), falling back to RANDOM (rng(seed + epoch)) when the
    file is too small to have several pages;
  distributed (world_size > 1), train: RANDOM with distributed=True: FFCV wraps torch's
    DistributedSampler (seed, set_epoch), which needs torch.distributed initialised and pads the
    last round with repeated samples when N is not a multiple of world_size (as PyTorch does);
  eval: SEQUENTIAL (distributed=True shards it the same way).
FFCV 1.0.2's QUASI_RANDOM is not a function of (seed, epoch) alone: it shuffles its page table in
place, so each call continues from the previous one's state. We keep a pristine copy of the table
and restore it before each epoch's draw, which makes the order depend on (seed, epoch) only.
Epoch and mid-epoch resume: FFCV draws the order from `loader.next_epoch`; we set it, take
`next_traversal_order()` and start FFCV's EpochIterator at batch start_step ourselves, so skipped
batches are never read (FFCV's Loader.__iter__ has no skip; we replicate its four lines).

Mixtures (several packed datasets, fasttrain.data.mixture): one FFCV Loader per part, fed by our
own MixtureSampler instead of FFCV's orders, so the order, the DDP shards (no torch.distributed
needed) and mid-epoch resume are exactly those of the raw loader. Each part's EpochIterator reads,
in the global order, the images of that part in this rank's shard; batch t is then assembled from
the parts in the counts the global batch t holds (one copy), so every batch is the same fair
mixture the raw loader yields (its images grouped by part inside the batch).
"""
from __future__ import annotations

import numpy as np

from .ffcv_threads import keep_torch_threads
from .base import INSTALL_HINT, BaseLoader, LoaderError


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

    def __init__(self, packed, **kw):
        super().__init__(packed, **kw)
        f = self._ffcv = _import_ffcv()
        self.sampler = None
        if hasattr(packed, "parts"):
            self._init_mixture(packed)
            return
        distributed = self.world_size > 1
        if distributed:
            import torch.distributed as dist
            if not (dist.is_available() and dist.is_initialized()):
                raise LoaderError("the ffcv loader with world_size > 1 needs torch.distributed initialised "
                                  "(FFCV shards through torch's DistributedSampler); run under torchrun")
            if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
                raise LoaderError(f"ffcv loader: rank/world_size {self.rank}/{self.world_size} disagree with "
                                  f"torch.distributed's {dist.get_rank()}/{dist.get_world_size()}")
        O = f["OrderOption"]
        common = self._loader_args(distributed, self.drop_last)
        if getattr(packed, "subset", None) is not None:  # data.views / label_fraction: FFCV orders the subset
            common["indices"] = packed.subset
        if not self.train:
            order = O.SEQUENTIAL
        elif distributed:
            order = O.RANDOM
        else:
            order = O.QUASI_RANDOM
        try:
            with keep_torch_threads():  # Loader.__init__ sets torch's threads to num_workers
                self.loader = f["Loader"](packed.beton, order=order, **common)
        except ValueError as e:
            if order is not O.QUASI_RANDOM:
                raise
            # "Dataset won't benefit from QuasiRandom order": a file of one page
            with keep_torch_threads():
                self.loader = f["Loader"](packed.beton, order=O.RANDOM, **common)
            order = O.RANDOM
            self._fallback = str(e)
        self.order = order
        self._pristine_pages = None
        if order is O.QUASI_RANDOM:
            t = self.loader.traversal_order
            t.prepare_data_structures()  # the Loader's first draw already shuffled the table in place
            self._pristine_pages = t.page_to_samples_array.copy()
        self.augment = self.make_augment()

    def _loader_args(self, distributed: bool, drop_last: bool) -> dict:
        """FFCV Loader arguments (a fresh pipeline per Loader: FFCV's operations keep state)."""
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
                    os_cache=bool(self.cfg.os_cache), distributed=distributed, seed=self.seed,
                    pipelines=pipelines, drop_last=drop_last, batches_ahead=max(1, int(self.cfg.prefetch)))

    def _init_mixture(self, packed) -> None:
        """One FFCV Loader per part; the order is our MixtureSampler's (see the module docstring)."""
        f = self._ffcv
        self.sampler = self.make_sampler(packed)
        self.loaders = []
        for p in packed.parts:
            with keep_torch_threads():  # Loader.__init__ sets torch's threads to num_workers
                # SEQUENTIAL and no drop: the order we pass to each EpochIterator is the one read
                self.loaders.append(f["Loader"](p.beton, order=f["OrderOption"].SEQUENTIAL,
                                                **self._loader_args(False, False)))
        self.loader = None
        self.order = None
        self.augment = self.make_augment()

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        super().set_epoch(epoch, start_step)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        if self.sampler is not None:
            return len(self.sampler)
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        if self.sampler is not None:
            return self.sampled_num_samples()
        n = len(self.loader.first_traversal_order)
        return len(self) * self.batch_size if self.drop_last else n

    def _part_iterator(self, k: int, order: np.ndarray):
        f, L = self._ffcv, self.loaders[k]
        with keep_torch_threads():
            f["Compiler"].set_num_threads(L.num_workers)
        if L.code is None:
            L.generate_code()
        with keep_torch_threads():
            return f["EpochIterator"](L, order)

    def _mixture_iterator(self):
        """Batches start_step.. of this rank's shard of the global order: (images, labels, global index)."""
        import torch
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
                # labels from the mixture's table (parts may carry different label names: then [b, 0])
                yield torch.cat([p[0] for p in pieces]), torch.from_numpy(labels[gi.numpy()]), gi
        finally:  # an epoch left early: stop every part's reader thread
            for it in its:
                if it is not None:
                    it.close()

    def _epoch_iterator(self):
        """FFCV's Loader.__iter__ for epoch self.epoch, starting at batch self.start_step."""
        if self.sampler is not None:
            return self._mixture_iterator()
        f, L = self._ffcv, self.loader
        with keep_torch_threads():  # numba gets num_workers threads; torch keeps the trainer's
            f["Compiler"].set_num_threads(L.num_workers)
        L.next_epoch = self.epoch
        if self._pristine_pages is not None:
            np.copyto(L.traversal_order.page_to_samples_array, self._pristine_pages)
        order = L.next_traversal_order()
        selected = order[self.start_step * self.batch_size: len(self) * self.batch_size]
        L.next_epoch = self.epoch + 1
        if L.code is None:
            L.generate_code()
        with keep_torch_threads():  # EpochIterator.__init__ sets torch's threads too
            return f["EpochIterator"](L, selected)

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
        from .sampler import batch_rng
        return batch_rng(self.seed, self.epoch, self.rank, step)

    def describe(self) -> str:
        if self.sampler is not None:
            return f"ffcv, one reader per mixture part, batches mixed in the global order: {self.packed.describe()}"
        return f"ffcv {self.packed.beton} (order {self.order.name}, os_cache={bool(self.cfg.os_cache)})"
