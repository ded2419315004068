"""Which samples each rank reads, in which order, batch by batch: one plain definition shared by
the raw, reference and (CPU) DALI paths so that they agree sample for sample.

- Order: a permutation drawn from (seed, epoch) when shuffling, else 0..N-1. With a `subset`
  (data.views, data.label_fraction: fasttrain.data.subset) the same order is drawn over the
  subset's N positions and mapped through it.
- DDP: rank r takes positions r, r + W, r + 2W, ... of that order (torch's DistributedSampler
  rule), so the ranks are disjoint and together cover the split. With drop_last (training) the
  order is first cut to a multiple of W, so every rank has the same number of samples (DDP needs
  equal step counts); without it (evaluation) nothing is dropped or repeated and ranks may differ
  by one sample.
- Batches: consecutive slices of the rank's shard; with drop_last the partial last batch is dropped.
- Mid-epoch resume: `batches(start_step)` starts at batch start_step of the same epoch; the
  augmentation generator of batch k is seeded from (seed, epoch, rank, k), so a resumed epoch yields
  exactly the remaining batches of the uninterrupted one.
"""
from __future__ import annotations

import numpy as np


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def batch_rng(seed: int, epoch: int, rank: int, step: int) -> np.random.Generator:
    """The host generator for batch `step`'s augmentation draws."""
    return np.random.Generator(np.random.PCG64(mix_seed(seed, epoch, rank, step, 0xA06)))


def block_permutation(n: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """A page-aware shuffle of 0..n-1 (FFCV's QUASI_RANDOM idea): blocks of `block` consecutive
    positions in random order, the positions inside each block shuffled. A batch then reads a few
    contiguous runs of the file instead of `batch` scattered images. int64 [n]."""
    starts = np.arange(0, n, block, dtype=np.int64)[rng.permutation(-(-n // block))]  # [n_blocks]
    pos = (starts[:, None] + np.arange(block, dtype=np.int64)[None, :])  # [n_blocks, block]
    keys = rng.random(pos.shape)  # shuffle inside each block: sort random keys per row
    pos = np.take_along_axis(pos, np.argsort(keys, axis=1), axis=1).reshape(-1)
    return pos[pos < n]  # the last block may be short


class EpochSampler:
    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, block: int = 0,
                 subset: np.ndarray | None = None):
        self.subset = None if subset is None else np.asarray(subset, dtype=np.int64)  # [num_samples] positions
        if self.subset is not None and len(self.subset) != num_samples:
            raise ValueError(f"subset of {len(self.subset)} positions for num_samples {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        if block < 0:
            raise ValueError(f"block_shuffle must be >= 0, got {block}")
        self.block = int(block) if block > 1 else 0  # > 0: the order is page-aware (block_permutation)
        self.epoch, self.start_step = 0, 0
        if drop_last:
            self.shard_size = self.num_samples // self.world_size
        else:  # positions rank, rank + W, ... < N
            self.shard_size = max(0, (self.num_samples - self.rank + self.world_size - 1) // self.world_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if start_step < 0 or start_step > len(self):
            raise ValueError(f"start_step {start_step} is outside the epoch's {len(self)} batches")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def order(self) -> np.ndarray:
        """The whole split's order for the current epoch, int64 [N] (positions of the subset's images
        when there is one)."""
        base = self.base_order()
        return base if self.subset is None else self.subset[base]

    def base_order(self) -> np.ndarray:
        """The order over 0..num_samples-1 for the current epoch, int64 [num_samples]."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(mix_seed(self.seed, self.epoch, 0x5A3)))
        if self.block:
            return block_permutation(self.num_samples, self.block, rng)
        return rng.permutation(self.num_samples).astype(np.int64)

    def shard(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in reading order."""
        order = self.order()
        if self.drop_last:
            order = order[: self.shard_size * self.world_size]
        return order[self.rank:: self.world_size]

    def batches(self, start_step: int | None = None):
        """Yield (step, indices int64 [b]) from start_step (default: the one set_epoch gave)."""
        step0 = self.start_step if start_step is None else start_step
        shard, b = self.shard(), self.batch_size
        for step in range(step0, len(self)):
            yield step, shard[step * b:(step + 1) * b]

    def rng(self, step: int) -> np.random.Generator:
        return batch_rng(self.seed, self.epoch, self.rank, step)
