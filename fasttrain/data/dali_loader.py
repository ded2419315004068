"""DALI loader: a DALI pipeline over the webdataset shards (1-channel JPEG + labels + position).

CUDA device: `fn.decoders.image(device="mixed")` (nvJPEG) and DALI's own GPU random-resized-crop
(area/aspect/10 attempts, as torchvision) / flip, or resize-shorter + center crop for evaluation;
then the shared normalise (and gray -> C expansion) in torch.
CPU (no CUDA): `device_id=None` pipeline that decodes on the CPU threads, then the same batched
BatchAugment as the raw and FFCV loaders (one op per batch, not DALI's per-sample CPU operators).

Order: ours, as the raw loader's. One dataset reads as a mixture of one part (mixture.open_mixture):
the JPEG bytes go through `fn.external_source` in the order of our EpochSampler / MixtureSampler
(one permutation per (seed, epoch), page-aware blocks only with data.block_shuffle, DDP shards of
it, evaluation reading every image once), as slices of the memory-mapped webdataset shards
(positioned by the index files). DALI's own webdataset reader would instead shuffle through a
buffer of <= 4096 samples over a sequential read of shards written in file (patient) order: each
batch from a window of neighbouring files, the coarse order repeating every epoch, and under DDP
each rank one contiguous slice. Decoding and augmentation are DALI's operators as before.
Mid-epoch resume: the source starts at batch start_step without decoding the skipped batches,
unless DALI draws the crops (its random stream starts at batch 0 of the epoch's seed: the skipped
batches then run and are dropped; batch start_step onwards is identical to the uninterrupted epoch).
"""
from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch

from fasttrain.format.dali import read_index

from .base import INSTALL_HINT, BaseLoader, LoaderError, LoaderSpec
from .gpu_augment import eval_resize_size
from .raw_loader import map_advised
from .sampler import batch_rng, mix_seed


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise LoaderError(f"the dali loader needs NVIDIA DALI, which failed to import ({e}); install it with "
                          f"{INSTALL_HINT['dali']}") from e
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


class _JpegTable:
    """Where each sample's JPEG lies in a part's webdataset shards (from the index files), with the
    shards memory-mapped: bytes(j) is a zero-copy slice."""

    def __init__(self, shard: np.ndarray, offset: np.ndarray, size: np.ndarray, maps: list):
        self.shard, self.offset, self.size, self.maps = shard, offset, size, maps

    def bytes(self, j: int) -> np.ndarray:
        k, o = int(self.shard[j]), int(self.offset[j])
        return self.maps[k][o:o + int(self.size[j])]


def _jpeg_table(p) -> _JpegTable:
    shard, offset, size = [], [], []
    for k, idx in enumerate(p.index_files):
        for comps in read_index(Path(idx)):
            off, n = comps["jpg"]
            shard.append(k)
            offset.append(off)
            size.append(n)
    if len(shard) != len(p):
        raise LoaderError(f"{p.root}: DALI index files list {len(shard)} samples, the manifest says {len(p)}")
    # random slices: MADV_RANDOM, so a cold page fault reads its pages, not a readahead window
    maps = [map_advised(f, (-1,), "random") for f in p.shards]
    return _JpegTable(np.array(shard), np.array(offset, np.int64), np.array(size, np.int64), maps)


class DALILoader(BaseLoader):
    name = "dali"

    def __init__(self, packed, spec: LoaderSpec, gpu: bool | None = None):
        super().__init__(packed, spec)
        self._dali = _import_dali()
        self.gpu = (self.device.type == "cuda") if gpu is None else bool(gpu)
        if self.gpu and self.device.type != "cuda":
            raise LoaderError("the DALI GPU pipeline needs a CUDA device")
        self.name = "dali-gpu" if self.gpu else "dali-cpu"
        self._tables = [_jpeg_table(p) for p in self.packed.parts]
        self._labels = np.ascontiguousarray(self.packed.labels, dtype=np.float32)  # [N, L]
        # crop/flip/resize inside DALI on the GPU (then only `normalise` in torch); on the CPU
        # pipeline BatchAugment does them, one op per batch instead of DALI's per-sample operators.
        # Fine-tuning (RandAugment or bicubic): BatchAugment on the GPU after nvJPEG decode, because
        # DALI's resize filters and its auto_aug.rand_augment do not reproduce timm's (see randaug.py)
        self.dali_augment = self.gpu and self.cfg.randaug is None and self.cfg.interpolation == "bilinear"
        self.augment = self.make_augment()
        self._pipe = self._iter = None

    def _source_start(self) -> int:
        """The batch the source starts at: start_step, unless DALI draws the crops (its random
        stream starts at batch 0 of the epoch's seed: the skipped batches run and are dropped)."""
        return 0 if self.dali_augment else self.start_step

    def _source(self):
        """Batches _source_start().. of this rank's shard: (JPEG bytes, labels [L], global index [1]) per sample."""
        b, s = self.batch_size, self.sampler
        shard = s.shard()
        for step in range(self._source_start(), len(s)):
            sel = np.sort(shard[step * b:(step + 1) * b])  # ascending: file order within each part
            part, local = self.packed.locate(sel)
            jpgs = [self._tables[k].bytes(j) for k, j in zip(part.tolist(), local.tolist())]
            yield jpgs, list(self._labels[sel]), list(sel.reshape(-1, 1))

    def _graph(self):
        """The pipeline body (call inside a DALI pipeline): DataNodes (images, labels, positions).

        gpu: nvJPEG decode (`device="mixed"`). dali_augment (on with gpu): crop/flip or eval
        resize + center crop inside DALI, on the device the images are on (-> [s, s, 1] float in
        [0, 1]); off: uint8 [H, W, 1] for BatchAugment. Tests run dali_augment on CPU operators
        (same arguments) and define the GPU graph without a GPU."""
        fn, _, types, _, _ = self._dali
        cfg, s = self.cfg, self.img_size
        # our global order (see the module docstring)
        jpg, lbl, idx = fn.external_source(source=self._source, num_outputs=3, batch=True,
                                           dtype=[types.UINT8, types.FLOAT, types.INT64], cycle="raise")
        img = fn.decoders.image(jpg, device="mixed" if self.gpu else "cpu",
                                output_type=types.GRAY)  # [H, W, 1] uint8 (on the GPU when mixed)
        if not self.dali_augment:
            return img, lbl, idx
        if self.train:
            img = fn.random_resized_crop(img, size=[s, s], random_area=list(cfg.crop_scale),
                                         random_aspect_ratio=list(cfg.crop_ratio), num_attempts=10,
                                         interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = fn.random.coin_flip(probability=float(cfg.hflip))
        else:
            resize = eval_resize_size(self.image_size, s, cfg.eval_resize)
            img = fn.resize(img, resize_shorter=float(resize), interp_type=types.INTERP_LINEAR,
                            antialias=True)
            mirror = 0
        # [s, s, 1] float in [0, 1]; center crop for eval (no-op after the random crop)
        img = fn.crop_mirror_normalize(img, crop=[s, s], mirror=mirror, mean=[0.0], std=[255.0],
                                       dtype=types.FLOAT, output_layout="HWC")
        return img, lbl, idx

    def _build(self):
        """One pipeline + iterator for the current epoch."""
        _, pipeline_def, _, DALIGenericIterator, LastBatchPolicy = self._dali
        self.close()
        cfg = self.cfg
        seed = mix_seed(self.seed, self.epoch, 0xDA1) & 0x7FFFFFFF

        @pipeline_def
        def pipe():
            return self._graph()

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.gpu else None
        self._pipe = pipe(batch_size=self.batch_size, num_threads=max(1, int(cfg.num_workers)),
                          device_id=device_id, seed=seed, prefetch_queue_depth=max(1, int(cfg.prefetch)))
        self._pipe.build()
        # the source ends the epoch (StopIteration), its batches already cut
        self._iter = DALIGenericIterator(self._pipe, ["images", "labels", "index"],
                                         last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)

    def close(self) -> None:
        self._iter = self._pipe = None
        gc.collect()  # DALI pipelines hold threads and buffers until collected

    def _batches(self):
        """(step, images uint8 [b, H, W, 1] or float [b, s, s, 1], labels [b, L], index [b])."""
        self._build()
        n = len(self)
        step0 = self._source_start()  # where the source starts
        for j, out in enumerate(self._iter):
            step = step0 + j
            if step >= n:
                break
            if step < self.start_step:  # DALI cannot seek: run and drop
                continue
            d = out[0]
            yield step, d["images"], d["labels"], d["index"].view(-1)
        self.close()

    def feed(self):
        for _, x, y, _ in self._batches():
            yield x, y

    def iter_with_index(self):
        for step, x, y, i in self._batches():
            yield self._finish(step, x), y.clone(), i.clone()

    def _finish(self, step: int, x: torch.Tensor) -> torch.Tensor:
        if self.dali_augment:  # DALI already cropped, flipped and scaled to [0, 1]: [b, s, s, 1]
            return self.augment.normalise(x[..., 0].to(self.augment.cdtype))
        return self.augment(x, rng=batch_rng(self.seed, self.epoch, self.rank, step))

    def __iter__(self):
        for step, x, y, _ in self._batches():
            # labels: a host copy first, so the non-blocking device copy never reads DALI's own
            # (possibly pinned, recycled once released) output buffer after we let go of it
            yield self._finish(step, x), y.clone().to(self.device, non_blocking=True)

    def describe(self) -> str:
        return (f"{self.name} external_source in our sampler's order "
                f"({'nvJPEG mixed decode + DALI GPU crop' if self.gpu else 'CPU decode + BatchAugment'}): "
                f"{self.packed.describe()}")
