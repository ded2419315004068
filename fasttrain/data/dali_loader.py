"""DALI loader: a DALI pipeline over the webdataset shards (1-channel JPEG + labels + position).

CUDA device: `fn.decoders.image(device="mixed")` (nvJPEG) and DALI's own GPU random-resized-crop
(area/aspect/10 attempts, as torchvision) / flip, or resize-shorter + center crop for evaluation;
then the shared normalise (and gray -> C expansion) in torch.
CPU (no CUDA): `device_id=None` pipeline that decodes on the CPU threads, then the same batched
BatchAugment as the raw and FFCV loaders (one op per batch, not DALI's per-sample CPU operators).

Order and sharding: `fn.readers.webdataset(shard_id, num_shards, pad_last_batch, name="Reader")`,
the iterator reads the epoch size from the reader (`reader_name`). DALI's shuffle is a buffer
shuffle seeded by the pipeline seed, so we build one pipeline per epoch with
seed = mix(seed, epoch): the order is fixed by (seed, epoch). When training with drop_last the ranks
rotate over the shards (shard_id = (rank + epoch) % world_size, stick_to_shard): disjoint and
covering every epoch, a different contiguous slice each epoch; every rank runs the same number of
batches (that of the smallest shard). Evaluation reads shard `rank`, in order, keeping every sample
(the reader pads the last batch; the iterator's PARTIAL policy trims the padding).
Mid-epoch resume: DALI readers cannot seek, so the first start_step batches are run and dropped
(they cost their decode time; batch start_step onwards is identical to the uninterrupted epoch).

Mixtures (several packed datasets, fasttrain.data.mixture): DALI's webdataset reader takes no
external order, so a mixture feeds the JPEG bytes through `fn.external_source` in the order of our
MixtureSampler (the raw loader's global order, DDP shards and resume, which then skips batches
without decoding them); the bytes are slices of the memory-mapped shards (positioned by the index
files), decoding and augmentation are the same DALI operators as for one dataset.
"""
from __future__ import annotations

import gc

import numpy as np
import torch

from .base import INSTALL_HINT, BaseLoader, LoaderError
from .sampler import batch_rng, mix_seed


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise LoaderError(f"the dali loader needs NVIDIA DALI, which failed to import ({e}); install it with "
                          f"{INSTALL_HINT['dali']}") from e
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


def shard_sizes(n: int, world_size: int) -> list[int]:
    """DALI's reader shards: shard k holds samples [floor(n k / W), floor(n (k + 1) / W))."""
    return [n * (k + 1) // world_size - n * k // world_size for k in range(world_size)]


class _JpegTable:
    """Where each sample's JPEG lies in a part's webdataset shards (from the index files), with the
    shards memory-mapped: bytes(j) is a zero-copy slice."""

    def __init__(self, shard: np.ndarray, offset: np.ndarray, size: np.ndarray, maps: list):
        self.shard, self.offset, self.size, self.maps = shard, offset, size, maps

    def bytes(self, j: int) -> np.ndarray:
        k, o = int(self.shard[j]), int(self.offset[j])
        return self.maps[k][o:o + int(self.size[j])]


def _jpeg_table(p) -> _JpegTable:
    from fasttrain.converters.dali_writer import read_index
    from pathlib import Path
    shard, offset, size = [], [], []
    for k, idx in enumerate(p.index_files):
        for comps in read_index(Path(idx)):
            off, n = comps["jpg"]
            shard.append(k)
            offset.append(off)
            size.append(n)
    if len(shard) != len(p):
        raise LoaderError(f"{p.root}: DALI index files list {len(shard)} samples, the manifest says {len(p)}")
    from .raw_loader import map_advised
    # random slices: MADV_RANDOM, so a cold page fault reads its pages, not a readahead window
    maps = [map_advised(f, (-1,), "random") for f in p.shards]
    return _JpegTable(np.array(shard), np.array(offset, np.int64), np.array(size, np.int64), maps)


class DALILoader(BaseLoader):
    name = "dali"

    def __init__(self, packed, *, gpu: bool | None = None, **kw):
        super().__init__(packed, **kw)
        self._dali = _import_dali()
        self.gpu = (self.device.type == "cuda") if gpu is None else bool(gpu)
        if self.gpu and self.device.type != "cuda":
            raise LoaderError("the DALI GPU pipeline needs a CUDA device")
        self.name = "dali-gpu" if self.gpu else "dali-cpu"
        self.sampler = None
        if hasattr(packed, "parts"):  # a mixture: our order through external_source
            self.sampler = self.make_sampler(packed)
            self._tables = [_jpeg_table(p) for p in packed.parts]
            self._labels = np.ascontiguousarray(packed.labels, dtype=np.float32)  # [N, L]
        self.sizes = shard_sizes(len(packed), self.world_size)
        self.rotate = self.train and self.drop_last and self.world_size > 1
        # crop/flip/resize inside DALI on the GPU (then only `normalise` in torch); on the CPU
        # pipeline BatchAugment does them, one op per batch instead of DALI's per-sample operators.
        # Fine-tuning (RandAugment or bicubic): BatchAugment on the GPU after nvJPEG decode, because
        # DALI's resize filters and its auto_aug.rand_augment do not reproduce timm's (see randaug.py)
        self.dali_augment = self.gpu and self.cfg.randaug is None and self.cfg.interpolation == "bilinear"
        self.augment = self.make_augment()
        self._pipe = self._iter = None

    def __len__(self) -> int:
        if self.sampler is not None:
            return len(self.sampler)
        if self.drop_last:
            return min(self.sizes) // self.batch_size
        return -(-self.sizes[self.rank] // self.batch_size)

    @property
    def num_samples(self) -> int:
        if self.sampler is not None:
            return self.sampled_num_samples()
        return len(self) * self.batch_size if self.drop_last else self.sizes[self.rank]

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        super().set_epoch(epoch, start_step)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_step)

    def _source_start(self) -> int:
        """The batch a mixture's source starts at: start_step, unless DALI draws the crops (its random
        stream starts at batch 0 of the epoch's seed: the skipped batches run and are dropped)."""
        return 0 if self.dali_augment else self.start_step

    def _mixture_source(self):
        """Batches _source_start().. of this rank's shard: (JPEG bytes, labels [L], global index [1]) per sample."""
        b, s = self.batch_size, self.sampler
        shard = s.shard()
        for step in range(self._source_start(), len(s)):
            sel = np.sort(shard[step * b:(step + 1) * b])  # ascending: file order within each part
            part, local = self.packed.locate(sel)
            jpgs = [self._tables[k].bytes(j) for k, j in zip(part.tolist(), local.tolist())]
            yield jpgs, list(self._labels[sel]), list(sel.reshape(-1, 1))

    def _shard_id(self) -> int:
        return (self.rank + self.epoch) % self.world_size if self.rotate else self.rank

    def _graph(self, seed: int):
        """The pipeline body (call inside a DALI pipeline): DataNodes (images, labels, positions).

        gpu: nvJPEG decode (`device="mixed"`). dali_augment (on with gpu): crop/flip or eval
        resize + center crop inside DALI, on the device the images are on (-> [s, s, 1] float in
        [0, 1]); off: uint8 [H, W, 1] for BatchAugment. Tests run dali_augment on CPU operators
        (same arguments) and define the GPU graph without a GPU."""
        fn, _, types, _, _ = self._dali
        p, cfg, s = self.packed, self.cfg, self.img_size
        from .gpu_augment import eval_resize_size
        if self.sampler is not None:  # a mixture: our global order (see the module docstring)
            jpg, lbl, idx = fn.external_source(source=self._mixture_source, num_outputs=3, batch=True,
                                               dtype=[types.UINT8, types.FLOAT, types.INT64], cycle="raise")
        else:
            jpg, lbl, idx = fn.readers.webdataset(
                paths=p.shards, index_paths=p.index_files, ext=["jpg", "lbl", "idx"],
                dtypes=[types.UINT8, types.FLOAT, types.INT64], shard_id=self._shard_id(),
                num_shards=self.world_size, stick_to_shard=True, random_shuffle=self.train,
                initial_fill=min(4096, max(self.sizes)), pad_last_batch=True, name="Reader", seed=seed)
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
            return self._graph(seed)

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.gpu else None
        self._pipe = pipe(batch_size=self.batch_size, num_threads=max(1, int(cfg.num_workers)),
                          device_id=device_id, seed=seed, prefetch_queue_depth=max(1, int(cfg.prefetch)))
        self._pipe.build()
        if self.sampler is not None:  # the source ends the epoch (StopIteration), its batches already cut
            self._iter = DALIGenericIterator(self._pipe, ["images", "labels", "index"],
                                             last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
            return
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        self._iter = DALIGenericIterator(self._pipe, ["images", "labels", "index"], reader_name="Reader",
                                         last_batch_policy=policy, auto_reset=False)

    def close(self) -> None:
        self._iter = self._pipe = None
        gc.collect()  # DALI pipelines hold threads and buffers until collected

    def _batches(self):
        """(step, images uint8 [b, H, W, 1] or float [b, s, s, 1], labels [b, L], index [b])."""
        self._build()
        n = len(self)
        step0 = self._source_start() if self.sampler is not None else 0  # where a mixture's source starts
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
        if self.sampler is not None:
            return f"{self.name} external_source in the global mixture order: {self.packed.describe()}"
        return (f"{self.name} {len(self.packed.shards)} webdataset shard(s) under {self.packed.root}/dali "
                f"({'nvJPEG mixed decode + DALI GPU crop' if self.gpu else 'CPU decode + BatchAugment'})")
