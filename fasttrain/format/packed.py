"""Read back what `fasttrain convert` wrote: `open_packed(path, split, format)` -> PackedSplit.

Reads only the manifest and the packed files, never the source dataset. `image(i)` is the plain
per-sample path (tests, the reference loader, inspection); the fast loaders use the
format-specific handles (`.images` memmap, `.beton`, `.shards` + `.index_files`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from fasttrain.format import dali, ffcv, raw
# PackedError and read_manifest are part of this module's interface (its callers catch / call them here)
from fasttrain.format.manifest import FORMAT_PREFERENCE, PackedError, read_manifest


def metadata_arrays(columns: dict[str, list], count: int, where: str) -> dict[str, np.ndarray]:
    """{column: [value per image]} as written by the converters -> {column: numpy array [count]}:
    float64 with NaN for missing for the numeric 'age', object with None for missing otherwise."""
    out = {}
    for name, values in columns.items():
        if len(values) != count:
            raise PackedError(f"{where}: metadata column '{name}' has {len(values)} values for {count} images")
        if name == "age":
            out[name] = np.array([np.nan if v is None else float(v) for v in values], np.float64)
        else:
            arr = np.empty(count, dtype=object)
            arr[:] = values
            out[name] = arr
        out[name].setflags(write=False)
    return out


class PackedSplit:
    def __init__(self, root: Path, manifest: dict, split: str, fmt: str):
        self.root = root
        self.manifest = manifest
        self.split = split
        self.format = fmt
        self.label_names: list[str] = list(manifest["label_names"])
        self.image_size: tuple[int, int] = tuple(manifest["image_size"])  # (H, W)
        self.synthetic: bool = bool(manifest.get("synthetic", False))
        meta = manifest["splits"][split]
        self.count: int = int(meta["count"])
        self.ids: list[str] = (root / meta["ids"]).read_text().splitlines()
        self.labels: np.ndarray = np.load(root / meta["labels"])  # [N, C] float32, NaN = ignored
        self.labels.setflags(write=False)
        if len(self.ids) != self.count or self.labels.shape != (self.count, len(self.label_names)):
            raise PackedError(f"{root}: split '{split}' has {len(self.ids)} ids and labels {self.labels.shape}, "
                              f"manifest says {self.count} x {len(self.label_names)}")
        self._metadata: Optional[dict[str, np.ndarray]] = None
        details = manifest["format_details"][fmt]
        self.details = details
        self.images: Optional[np.memmap] = None
        self.beton: Optional[str] = None
        self.shards: list[str] = []
        self.index_files: list[str] = []
        if fmt == "raw":
            try:
                self.images = raw.open_images(root, split, self.count, self.image_size)  # [N, H, W] uint8
            except (OSError, ValueError) as e:
                raise PackedError(f"{root}: raw images of split '{split}' unreadable: {e}") from e
            self._raw_path = Path(self.images.filename)
            self._raw_bytes = self.count * self.image_size[0] * self.image_size[1]
            # an fd on the file itself: fstat sees a truncation even after the path was unlinked
            self._raw_fd = os.open(self._raw_path, os.O_RDONLY)
        elif fmt == "ffcv":
            self.beton = str(root / details["files"][split])
            if not Path(self.beton).is_file():
                raise PackedError(f"{self.beton}: missing")
            self._ffcv_ptrs = None
        elif fmt == "dali":
            self.shards = [str(root / p) for p in details["shards"][split]]
            self.index_files = [str(root / p) for p in details["index_files"][split]]
            missing = [p for p in self.shards + self.index_files if not Path(p).is_file()]
            if missing:
                raise PackedError(f"{root}: DALI files missing: {missing[:3]}")
            self._dali_where = None

    @property
    def metadata(self) -> dict[str, np.ndarray]:
        """Per-image metadata the converter found in the source: {column: array [count]} over
        'patient', 'sex' ('M' / 'F'), 'age' (years, float, NaN = missing), 'view' ('PA', 'AP', 'LL',
        'LATERAL', ...), in the split's image order; None = missing. Empty for a dataset packed
        without metadata. Read on first use (training never needs it)."""
        if self._metadata is None:
            rel = self.manifest["splits"][self.split].get("metadata")
            if rel is None:
                self._metadata = {}
            else:
                path = self.root / rel
                try:
                    columns = json.loads(path.read_text())
                except (OSError, ValueError) as e:
                    raise PackedError(f"{path}: metadata of split '{self.split}' unreadable: {e}") from e
                self._metadata = metadata_arrays(columns, self.count, str(path))
        return self._metadata

    def check_raw_file(self) -> None:
        """Before each gather (two stats, microseconds): the raw file is still where it was and
        still whole. A memmap page past a truncated end raises SIGBUS, which kills the process
        without a word (and with it the chance of a clean error); a deleted file would make the
        next restart fail. Both become a PackedError naming the file; the trainer then stops
        without writing, so the last checkpoint stays good."""
        try:  # one stat, not exists() then stat(): the file can vanish between the two
            on_disk = self._raw_path.stat().st_size
        except FileNotFoundError:
            raise PackedError(f"{self._raw_path}: the packed file disappeared under the running job "
                              f"(split '{self.split}'); restore it and resume with --resume auto") from None
        size = min(os.fstat(self._raw_fd).st_size, on_disk)
        if size < self._raw_bytes:
            raise PackedError(f"{self._raw_path}: the packed file was truncated under the running job to {size} "
                              f"bytes (expected {self._raw_bytes}); re-convert or restore it and resume with "
                              "--resume auto")

    def __del__(self):
        fd = getattr(self, "_raw_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"PackedSplit({str(self.root)!r}, split={self.split!r}, format={self.format!r}, n={self.count}, "
                f"size={self.image_size}, labels={len(self.label_names)}{', SYNTHETIC' if self.synthetic else ''})")

    def image(self, i: int) -> np.ndarray:
        """Image i as uint8 [H, W] (a copy)."""
        if not -self.count <= i < self.count:
            raise IndexError(f"index {i} out of range for split '{self.split}' of {self.count} images")
        i = i % self.count
        if self.format == "raw":
            return np.array(self.images[i])
        if self.format == "ffcv":
            return self._ffcv_image(i)
        return self._dali_image(i)

    # ffcv: the NDArrayField's metadata is the file offset of each sample's bytes
    def _ffcv_image(self, i: int) -> np.ndarray:
        if self._ffcv_ptrs is None:
            with ffcv.keep_torch_threads():
                from ffcv.reader import Reader
            r = Reader(self.beton)
            if r.num_samples != self.count:
                raise PackedError(f"{self.beton}: {r.num_samples} samples, manifest says {self.count}")
            if "image" not in r.field_names:
                raise PackedError(f"{self.beton}: no 'image' field (fields: {r.field_names})")
            # metadata columns are positional (f0, f1, ...) in the order the fields were declared
            self._ffcv_ptrs = np.array(r.metadata[f"f{r.field_names.index('image')}"], dtype=np.int64)
        h, w = self.image_size
        return np.fromfile(self.beton, dtype=np.uint8, count=h * w, offset=int(self._ffcv_ptrs[i])).reshape(h, w)

    # dali: find sample i's JPEG through the index files, decode with simplejpeg
    def _dali_image(self, i: int) -> np.ndarray:
        import simplejpeg
        data = self.dali_component(i, "jpg")
        return simplejpeg.decode_jpeg(data, colorspace="GRAY")[:, :, 0]

    def dali_component(self, i: int, ext: str) -> bytes:
        if self._dali_where is None:
            where = []
            for k, idx in enumerate(self.index_files):
                where += [(k, s) for s in dali.read_index(Path(idx))]
            if len(where) != self.count:
                raise PackedError(f"{self.root}: DALI index files list {len(where)} samples, manifest says {self.count}")
            self._dali_where = where
        k, comps = self._dali_where[i]
        off, n = comps[ext]
        with open(self.shards[k], "rb") as f:
            f.seek(off)
            return f.read(n)


def open_packed(path, split: str = "train", format: Optional[str] = None) -> PackedSplit:
    """Open one split of a packed dataset in one format (None: raw > ffcv > dali, what was written)."""
    root = Path(path)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise PackedError(f"{root}: no split '{split}'; it has {list(manifest['splits'])}")
    written = manifest["formats"]
    if format is None:
        format = next(f for f in FORMAT_PREFERENCE if f in written)
    if format not in FORMAT_PREFERENCE:
        raise PackedError(f"{root}: unknown format {format!r}; the packed formats are {list(FORMAT_PREFERENCE)} "
                          f"(this dataset has {written})")
    if format not in written:
        raise PackedError(f"{root}: format '{format}' was not written (it has {written}); "
                          f"convert again with --format {format}")
    return PackedSplit(root, manifest, split, format)
