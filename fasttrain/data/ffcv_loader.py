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
four lines). Every batch is the one the raw loader yields, its images grouped by part:
- one dataset: FFCV's own batches, no copy;
- a mixture on the CPU through the OS cache: each part's reader reads exactly its piece of each
  batch and decodes it into that batch's rows (`PieceReader`, `BatchBuffers`): no copy either;
- otherwise (CUDA, data.os_cache=false): `assemble` copies each piece once into a reused buffer.
On the CPU the readers' buffers are kept from epoch to epoch (`BufferPool`): fresh ones cost a page
fault per 4 KiB, more than reading the images.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import defaultdict

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
            from ffcv.transforms import ToDevice, ToTensor
    except ImportError as e:
        raise LoaderError(f"the ffcv loader needs FFCV, which failed to import ({e}); install it with "
                          f"{INSTALL_HINT['ffcv']}") from e
    return dict(IntDecoder=IntDecoder, NDArrayDecoder=NDArrayDecoder, Loader=Loader, OrderOption=OrderOption,
                EpochIterator=EpochIterator, Compiler=Compiler, ToDevice=ToDevice,
                ToTensor=ToTensor)


class Epoch:
    """Held by an epoch's generator while the epoch is open (its consumer may still read its
    batches): buffers lent to the epoch are not handed to another until it is gone."""
    __slots__ = ("__weakref__",)


def in_use(readers: list, epoch: weakref.ref) -> bool:
    """Buffers lent to an epoch are in use while the epoch is open or any of its readers runs."""
    return epoch() is not None or any(r.is_alive() for r in readers)


class BufferPool:
    """The batch buffers of one part's FFCV Loader, kept from epoch to epoch (CPU).

    Each FFCV EpochIterator asks its Loader's graph for fresh buffers (batches_ahead + 2 slots, each
    a whole batch). Fresh pages fault on their first write, one fault per 4 KiB (4,096 for a batch
    of 256 images at 256 px), which costs more than reading the images; when an epoch holds a few
    batches every slot is fresh. The pool is the graph's allocate_memory: it hands a finished
    epoch's buffers to the next one. The buffers of an epoch that is still open (two epochs of one
    loader read at once) or whose reader thread still runs are not handed out (`in_use`).
    """

    def __init__(self, graph):
        self.allocate = graph.allocate_memory  # FFCV's own (fresh buffers)
        self._free: list = []  # [(batch_size, slots), buffers]
        self._lent: list = []  # [thread, weakref to its Epoch, (batch_size, slots), buffers]
        self._last = None
        self.allocated = 0  # fresh allocations so far
        graph.allocate_memory = self  # what EpochIterator.__init__ calls

    def __call__(self, batch_size: int, slots: int):
        busy = [in_use([e[0]], e[1]) for e in self._lent]  # once per entry: a thread may end meanwhile
        self._free += [e[2:] for e, b in zip(self._lent, busy) if not b]
        self._lent = [e for e, b in zip(self._lent, busy) if b]
        key = (batch_size, slots)
        for n, (k, buffers) in enumerate(self._free):
            if k == key:
                del self._free[n]
                self._last = (key, buffers)
                return buffers
        self.allocated += 1
        self._last = (key, self.allocate(batch_size, slots))
        return self._last[1]

    def lend(self, thread, epoch: Epoch) -> None:
        """The buffers handed out last now belong to `thread` (an EpochIterator) of `epoch` until
        both are gone."""
        if self._last is not None:
            self._lent.append([thread, weakref.ref(epoch), *self._last])
            self._last = None


def assemble(part_of: np.ndarray, part_batches: list, offsets: np.ndarray, batch_size: int, ring: list):
    """Our batches from the parts' reader batches: yields (images [b, H, W], global positions int64 [b]).

    part_of [n]: the part of each image in reading order; part_batches[k]: an iterator of part k's
    batches (images [m, H, W], positions in part k [m]) in that order, each valid only until the
    next one is drawn from the same iterator (FFCV reuses its buffers); offsets [P + 1]: the parts'
    first global positions. Batch t holds the images of part_of[t b:(t + 1) b], grouped by part.
    A batch served by one reader batch is a view of it (no copy); any other is copied piece by piece
    into ring[t % len(ring)] (a list of buffers [batch_size, H, W] or None, made on first use and
    kept by the caller across epochs), each piece before its reader advances. So every batch is
    valid until the next is drawn."""
    n_parts = len(part_batches)
    current: list = [None] * n_parts  # part k's reader batch: (images, positions in the part)
    used = [0] * n_parts  # images of it already placed
    for n_out, t in enumerate(range(0, len(part_of), batch_size)):
        counts = np.bincount(part_of[t:t + batch_size], minlength=n_parts)
        b = int(counts.sum())
        ks = np.flatnonzero(counts)
        k = int(ks[0])
        if current[k] is None or used[k] == len(current[k][0]):
            current[k], used[k] = next(part_batches[k]), 0
        if len(ks) == 1 and len(current[k][0]) - used[k] >= b:  # one reader batch holds it all
            x, i = current[k]
            used[k] += b
            yield x[used[k] - b:used[k]], i.reshape(-1)[used[k] - b:used[k]] + offsets[k]
            continue
        slot, like = n_out % len(ring), current[k][0]
        if ring[slot] is None or ring[slot].shape != (batch_size, *like.shape[1:]) or ring[slot].device != like.device:
            ring[slot] = torch.empty((batch_size, *like.shape[1:]), dtype=like.dtype, device=like.device)
        out, gi, a = ring[slot][:b], np.empty(b, np.int64), 0
        for k in map(int, ks):
            c = int(counts[k])
            while c:
                if current[k] is None or used[k] == len(current[k][0]):
                    current[k], used[k] = next(part_batches[k]), 0
                x, i = current[k]
                m = min(c, len(x) - used[k])
                out[a:a + m].copy_(x[used[k]:used[k] + m])  # before part k's reader moves on
                gi[a:a + m] = i.reshape(-1)[used[k]:used[k] + m] + offsets[k]
                a, c, used[k] = a + m, c - m, used[k] + m
        yield out, gi


class BatchBuffers:
    """uint8 batch buffers [batch_size, H, W] by global batch number, for one mixture epoch: the
    part readers' image decoders write their pieces of batch t straight into get(t) (from their
    threads), the consumer hands it out and releases it when the next batch is taken. Released
    buffers are reused (kept across epochs by the loader), so their pages fault once."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self._lock = threading.Lock()  # the readers' threads and the consumer
        self._live: dict[int, torch.Tensor] = {}
        self._free: list[torch.Tensor] = []
        self.allocated = 0

    def get(self, t: int) -> torch.Tensor:
        with self._lock:
            buf = self._live.get(t)
            if buf is None:
                if self._free:
                    buf = self._free.pop()
                else:
                    buf = torch.empty(self.shape, dtype=torch.uint8)
                    self.allocated += 1
                self._live[t] = buf
            return buf

    def release(self, t: int) -> None:
        with self._lock:
            buf = self._live.pop(t, None)
            if buf is not None:
                self._free.append(buf)

    def release_all(self) -> None:
        """Every buffer free again (only once no reader of the epoch still runs)."""
        with self._lock:
            self._free += self._live.values()
            self._live.clear()


class PieceDestinations:
    """What a part reader's image decoder writes its j-th batch into: plan[j] = (t, a, c), the
    rows a..a+c-1 of global batch t's buffer. FFCV asks for buffer[slot][:count] once per batch, in
    order, from the reader's thread."""

    def __init__(self, buffers: BatchBuffers, plan: list):
        self._buffers, self._plan = buffers, iter(plan)

    def __getitem__(self, slot: int) -> np.ndarray:
        t, a, c = next(self._plan)
        return self._buffers.get(t).numpy()[a:a + c]  # [c, H, W] uint8, C-contiguous as FFCV's slots


def piece_reader_class(EpochIterator):
    """FFCV's EpochIterator reading given pieces (index arrays of up to the batch size each) rather
    than chunks of the batch size, its image field decoded into PieceDestinations. Made on first
    use: FFCV is an optional import."""

    class PieceReader(EpochIterator):
        def __init__(self, loader, pieces: list, image_shape: tuple, destinations: PieceDestinations):
            self._pieces, self._image_shape, self._dest = pieces, tuple(image_shape), destinations
            super().__init__(loader, np.concatenate(pieces))

        def start(self):
            # EpochIterator.__init__ ends by starting its thread: swap our pieces and destinations in
            # first (the OS-cache memory manager ignores the batch schedule it was given)
            ops = {n: v for n, v in self.memory_allocations["operation"].items()}
            image = [n for n, v in ops.items() if isinstance(v, np.ndarray) and v.dtype == np.uint8
                     and v.shape[2:] == self._image_shape]
            if len(image) != 1:
                raise LoaderError(f"ffcv: expected one uint8 image buffer of {self._image_shape} in the reader's "
                                  f"pipeline, found {len(image)}")
            ops[image[0]] = self._dest
            self.memory_allocations = defaultdict(dict, {**self.memory_allocations, "operation": ops})
            self.iter_ixes = iter(self._pieces)
            super().start()

    return PieceReader


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
        # CPU only: on CUDA a new epoch's reader would overwrite device buffers the last epoch's
        # queued steps may still read, and torch's caching allocators already reuse those pages
        self.pools = [BufferPool(L.graph) for L in self.loaders] if self.device.type == "cpu" else []
        self._rings: list = []  # [ring, its Epoch]: the assembled batches' buffers, see assemble()
        # a mixture on the CPU through the OS cache: the parts' readers decode into our batches
        self.direct = len(self.loaders) > 1 and self.device.type == "cpu" and bool(self.cfg.os_cache)
        self._piece_reader = piece_reader_class(f["EpochIterator"]) if self.direct else None
        self._buffer_sets: list = []  # [BatchBuffers, the readers that may write into them, their Epoch]
        self.augment = self.make_augment()

    @property
    def buffers_allocated(self) -> int:
        """Fresh FFCV buffer sets allocated so far, over every part (CPU)."""
        return sum(p.allocated for p in self.pools)

    @property
    def batch_buffers_allocated(self) -> int:
        """Fresh batch buffers the parts' readers decoded into so far (a mixture on the CPU)."""
        return sum(entry[0].allocated for entry in self._buffer_sets)

    def _loader_args(self) -> dict:
        """FFCV Loader arguments (a fresh pipeline per Loader: FFCV's operations keep state); no
        distributed, no drop: our sampler shards and drops. Labels are not decoded (they come from
        the mixture's table); on the CPU every field stays numpy, so each batch is one compiled
        stage with no per-batch Python operations."""
        f = self._ffcv
        image_ops = [f["NDArrayDecoder"]()]  # [B, H, W] uint8
        if self.device.type == "cuda":
            image_ops += [f["ToTensor"](), f["ToDevice"](self.device, non_blocking=True)]
        pipelines = {
            "image": image_ops,
            "label": None,
            "index": [f["IntDecoder"]()],  # [B, 1] int64 position in the split
        }
        return dict(batch_size=self.batch_size, num_workers=max(1, int(self.cfg.num_workers)),
                    os_cache=bool(self.cfg.os_cache), distributed=False, seed=self.seed,
                    pipelines=pipelines, drop_last=False, batches_ahead=max(1, int(self.cfg.prefetch)))

    def _part_iterator(self, k: int, epoch: Epoch, order, destinations=None):
        """Part k's FFCV reader over `order` (an index array, read in batches of the batch size), or
        with `destinations` over the pieces `order` lists, decoded into them."""
        f, L = self._ffcv, self.loaders[k]
        with keep_torch_threads():
            f["Compiler"].set_num_threads(L.num_workers)
        if L.code is None:
            L.generate_code()
        with keep_torch_threads():
            if destinations is None:
                it = f["EpochIterator"](L, order)
            else:
                it = self._piece_reader(L, order, self.image_size, destinations)
        if self.pools:
            self.pools[k].lend(it, epoch)
        return it

    def _epoch_iterator(self):
        """Batches start_step.. of this rank's shard of the global order: (images, labels, global index)."""
        b, s = self.batch_size, self.sampler
        sel = s.shard()[self.start_step * b: len(s) * b]  # global positions, reading order
        part, local = self.packed.locate(sel)
        epoch = Epoch()  # held while this generator is open
        if self.direct:
            yield from self._direct_epoch(part, local, epoch)
            return
        its = [self._part_iterator(k, epoch, local[part == k]) if (part == k).any() else None
               for k in range(len(self.loaders))]
        labels = self.packed.labels  # [N, L] float32, the parts' labels in the global index space
        batches = [None if it is None else ((torch.as_tensor(x), i) for x, i in it) for it in its]
        finished = False
        try:
            ring = self._ring(epoch)
            for x, gi in assemble(part, batches, self.packed.offsets, b, ring):  # x: [b, H, W] uint8
                # labels from the mixture's table (parts may carry different label names: then [b, 0])
                yield x, torch.from_numpy(labels[gi]), torch.from_numpy(gi)
            finished = True
        finally:
            self._stop(its, finished)

    def _ring(self, epoch: Epoch) -> list:
        """The assembly buffers of `epoch`: those of an epoch that is gone, or new ones (two epochs
        read at once must not share them)."""
        for entry in self._rings:
            if entry[1]() is None:
                entry[1] = weakref.ref(epoch)
                return entry[0]
        self._rings.append([[None, None], weakref.ref(epoch)])
        return self._rings[-1][0]

    @staticmethod
    def _stop(readers: list, finished: bool) -> None:
        """Stop the parts' reader threads and wait a moment for them (1 s after a whole epoch, 0.2 s
        after one left early), so their buffers are free for the next epoch. A reader whose queue is
        full waits to put its end marker: its queue is emptied (the epoch is over) so it can end."""
        for it in readers:
            if it is None:
                continue
            it.close()
            deadline = time.monotonic() + (1.0 if finished else 0.2)
            while it.is_alive() and time.monotonic() < deadline:
                try:
                    while True:
                        it.output_queue.get_nowait()
                except queue.Empty:
                    pass
                it.join(timeout=0.01)

    def _direct_epoch(self, part: np.ndarray, local: np.ndarray, epoch: Epoch):
        """A mixture's epoch with no assembly copy: part k's reader reads, for each batch t holding
        part k's images, exactly those (a piece) and decodes them into rows a..a+c-1 of batch t's
        buffer, where a is the count of images of parts < k in batch t (grouped by part, as
        `assemble` groups them). Batch t is complete once every part in it has delivered its piece."""
        b, n_parts = self.batch_size, len(self.loaders)
        n_batches = -(-len(part) // b)
        counts = np.bincount(np.arange(len(part)) // b * n_parts + part, minlength=n_batches * n_parts)
        counts = counts.reshape(n_batches, n_parts)  # [T, P] images of part k in batch t
        start = np.cumsum(counts, axis=1) - counts  # [T, P] row of part k's first image in batch t
        buffers = self._free_batch_buffers(epoch)
        readers: list = [None] * n_parts
        finished = False
        try:
            for k in range(n_parts):
                rows = np.flatnonzero(counts[:, k])
                if len(rows) == 0:
                    continue
                pieces = np.split(local[part == k], np.cumsum(counts[rows, k])[:-1])
                plan = [(int(t), int(start[t, k]), int(counts[t, k])) for t in rows]
                readers[k] = self._part_iterator(k, epoch, pieces, PieceDestinations(buffers[0], plan))
                buffers[1].append(readers[k])
            labels = self.packed.labels  # [N, L] float32
            for t in range(n_batches):
                gi = np.empty(int(counts[t].sum()), np.int64)  # [b] global positions
                for k in np.flatnonzero(counts[t]):
                    x, i = next(readers[k])  # its piece of batch t is decoded into our buffer now
                    a = start[t, k]
                    if np.asarray(x).ctypes.data != buffers[0].get(t)[a].data_ptr():
                        # PieceReader relies on how FFCV hands out its buffers: fail loudly, never misplace rows
                        raise LoaderError(f"ffcv: part {k}'s reader decoded batch {t} outside its rows of our "
                                          "batch (an FFCV this loader does not know); set data.os_cache=false")
                    gi[a:a + counts[t, k]] = i.reshape(-1) + self.packed.offsets[k]
                yield buffers[0].get(t)[:len(gi)], torch.from_numpy(labels[gi]), torch.from_numpy(gi)
                buffers[0].release(t)  # the consumer took the next batch
            finished = True
        finally:
            self._stop(readers, finished)

    def _free_batch_buffers(self, epoch: Epoch) -> list:
        """[BatchBuffers, its readers, its epoch] for `epoch`: a set no reader writes into and no
        open epoch reads any more (every buffer free again), or a new one."""
        for entry in self._buffer_sets:
            if not in_use(entry[1], entry[2]):
                entry[0].release_all()
                entry[1:] = [[], weakref.ref(epoch)]
                return entry
        self._buffer_sets.append([BatchBuffers((self.batch_size, *self.image_size)), [], weakref.ref(epoch)])
        return self._buffer_sets[-1]

    def feed(self):
        """uint8 batches [b, H, W] and labels [b, L]; a batch's images stay valid until the next
        batch is taken (they are FFCV's reused buffers, or the assembly ring's)."""
        for x, y, _ in self._epoch_iterator():
            yield x, y

    def __iter__(self):
        step = self.start_step
        for x, y, _ in self._epoch_iterator():
            images = self.augment(x, rng=self._rng(step))  # [b, C, h, w]
            # y is gathered from the label table per batch (its own memory, pageable: the device
            # copy stages it at once), so nothing FFCV overwrites later is read by a queued copy
            yield images, y.to(self.device, non_blocking=True)
            step += 1

    def iter_with_index(self):
        """(images, labels, positions in the split): for tests and label-alignment checks."""
        step = self.start_step
        for x, y, i in self._epoch_iterator():
            yield self.augment(x, rng=self._rng(step)), y, i
            step += 1

    def _rng(self, step: int) -> np.random.Generator:
        return batch_rng(self.seed, self.epoch, self.rank, step)

    def describe(self) -> str:
        return (f"ffcv (os_cache={bool(self.cfg.os_cache)}), one SEQUENTIAL reader per part in our sampler's "
                f"order: {self.packed.describe()}")
