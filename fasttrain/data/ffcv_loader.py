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
        image_ops = [f["NDArrayDecoder"](), f["ToTensor"]()]
        if self.device.type == "cuda":
            image_ops.append(f["ToDevice"](self.device, non_blocking=True))
        pipelines = {
            "image": image_ops,  # [B, H, W] uint8
            "label": [f["NDArrayDecoder"](), f["ToTensor"]()],  # [B, L] float32
            "index": [f["IntDecoder"](), f["ToTensor"](), f["Squeeze"]()],  # [B] int64 position in split
        }
        common = dict(batch_size=self.batch_size, num_workers=max(1, int(self.cfg.num_workers)),
                      os_cache=bool(self.cfg.os_cache), distributed=distributed, seed=self.seed,
                      pipelines=pipelines, drop_last=self.drop_last, batches_ahead=max(1, int(self.cfg.prefetch)))
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

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        n = len(self.loader.first_traversal_order)
        return len(self) * self.batch_size if self.drop_last else n

    def _epoch_iterator(self):
        """FFCV's Loader.__iter__ for epoch self.epoch, starting at batch self.start_step."""
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
        return f"ffcv {self.packed.beton} (order {self.order.name}, os_cache={bool(self.cfg.os_cache)})"
