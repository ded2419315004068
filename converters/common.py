"""What every converter shares: items, image decoding + resizing, the process pool, atomic output
and the manifest.

A converter (nih.py, chexpert.py, dicom.py) only turns its source layout into `Item`s per split;
`pack()` here does the rest: decode + resize in a process pool, stream into the raw memmap (the
first format, always written), then write FFCV / DALI from that memmap, then the manifest, then the
atomic rename. Nothing holds the dataset in RAM: at most `window` chunks are in flight.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

FORMATS = ("raw", "ffcv", "dali")
MANIFEST_VERSION = 1
# Reading order of the formats when `open_packed(format=None)`: raw reads at memcpy speed.
FORMAT_PREFERENCE = ("raw", "ffcv", "dali")


class ConvertError(ValueError):
    """Bad source input or arguments; the message names the file / row and what is wrong."""


@dataclass
class Item:
    """One image to convert: its id (what `open_packed(...).ids` returns), its file, its labels."""
    id: str
    path: str  # absolute path of the source image file
    labels: np.ndarray  # float32 [C], NaN = ignored
    where: str  # where it came from, for errors: "Data_Entry_2017.csv row 17"
    group: str = ""  # patient id: val splits are carved patient-disjoint


@dataclass
class Skipped:
    id: str
    file: str
    reason: str

    def to_dict(self) -> dict:
        return {"id": self.id, "file": self.file, "reason": self.reason}


class Problems:
    """Collects bad-input problems: raise at once (`on_error="fail"`) or record (`"skip"`)."""

    def __init__(self, on_error: str):
        if on_error not in ("fail", "skip"):
            raise ConvertError(f"--on-error must be 'fail' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[Skipped] = []

    def report(self, id: str, file: str, reason: str) -> None:
        if self.on_error == "fail":
            raise ConvertError(f"{reason} (use --on-error skip to skip such items)")
        self.skipped.append(Skipped(id, file, reason))


# ----------------------------------------------------------------------------- CSV helpers

def read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Read a CSV into (header, [(line_number, row dict)]), checking the required columns.

    Empty header fields are dropped: the original NIH `Data_Entry_2017.csv` ends every line with a
    trailing comma (an unnamed, empty 12th column).
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    # PhysioNet publishes MIMIC-CXR's CSVs gzipped (mimic-cxr-2.0.0-*.csv.gz): read them as they come
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise ConvertError(f"{path}: empty CSV (no header)") from None
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise ConvertError(f"{path}: missing column(s) {missing}; found {[h for h in header if h]}")
            cols = [(i, h) for i, h in enumerate(header) if h]
            rows = []
            for rec in reader:
                if not rec or all(not v.strip() for v in rec):
                    continue
                # reader.line_num: the line the record ends on (a quoted field may span lines)
                rows.append((reader.line_num, {h: (rec[i].strip() if i < len(rec) else "") for i, h in cols}))
    except (UnicodeDecodeError, csv.Error, OSError, EOFError) as e:  # not text / bad gzip / bad quoting
        # only the csv module knows its line; text decoding runs ahead in blocks
        where = f" line {reader.line_num}" if isinstance(e, csv.Error) else ""
        raise ConvertError(f"{path}{where}: cannot read as a UTF-8 CSV: {type(e).__name__}: {e}") from None
    return [h for h in header if h], rows


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def patient_disjoint_split(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Carve `fraction` of the images (rounded to whole patients) out of `items` as a validation
    split with no patient in both: images of one patient are correlated, so a shared patient
    would leak. Patients are shuffled with `seed`; order inside each split is kept."""
    if not 0.0 < fraction < 1.0:
        raise ConvertError(f"--val-fraction must be in (0, 1), got {fraction}")
    groups = sorted({it.group for it in items})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    target = fraction * len(items)
    per_group: dict[str, int] = {}
    for it in items:
        per_group[it.group] = per_group.get(it.group, 0) + 1
    val_groups, n = set(), 0
    for gi in order:
        if n >= target:
            break
        val_groups.add(groups[gi])
        n += per_group[groups[gi]]
    train = [it for it in items if it.group not in val_groups]
    val = [it for it in items if it.group in val_groups]
    if not train or not val:
        raise ConvertError(f"--val-fraction {fraction} leaves an empty split ({len(items)} images, "
                           f"{len(groups)} patients)")
    return train, val


# ----------------------------------------------------------------------------- decoding

def to_uint8_resized(img: np.ndarray, size: int, full_scale: Optional[float] = None) -> np.ndarray:
    """Resize a 2-D grey image to [size, size] with area interpolation and quantise to uint8.

    uint8 input is resized directly (cv2's INTER_AREA on uint8 rounds correctly and is 3x faster
    than going through float). Other inputs are resized in float32 first, then mapped to 0..255
    with `full_scale` (the value that becomes 255), so quantisation happens once, at the end.
    """
    import cv2
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"empty image {img.shape}")
    interp = cv2.INTER_AREA if (img.shape[0] >= size and img.shape[1] >= size) else cv2.INTER_LINEAR
    if img.dtype == np.uint8:
        if img.shape == (size, size):
            return np.ascontiguousarray(img)
        return cv2.resize(img, (size, size), interpolation=interp)
    x = img.astype(np.float32)
    if img.shape != (size, size):
        x = cv2.resize(x, (size, size), interpolation=interp)
    scale = 255.0 / float(full_scale if full_scale is not None else 1.0)
    return np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)


def png_significant_bits(path: str) -> Optional[int]:
    """The grey sample's significant bits from a PNG's sBIT chunk (before IDAT), or None.

    Hand-read because neither PIL nor cv2 exposes sBIT: 8-byte signature, then chunks of
    (length u32 BE, type, data, crc)."""
    import struct
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            n, kind = struct.unpack(">I4s", head)
            if kind == b"sBIT":
                data = f.read(n)
                return data[0] if data else None  # grey (+ alpha): the first byte is grey's
            if kind in (b"IDAT", b"IEND"):
                return None
            f.seek(n + 4, 1)


def decode_raster(path: str, size: int) -> np.ndarray:
    """Decode a PNG (8 / 16 bit, grey / RGB / RGBA / palette) or JPEG file to uint8 [size, size].

    PIL, not cv2, decodes: PIL raises on truncated files where cv2 (libjpeg) silently fills the
    missing rows with grey. Colour goes to grey with ITU-R 601 luma (PIL's 'L'); alpha is dropped
    (NIH's RGBA PNGs carry the same grey in R, G and B). 16-bit images map 0..65535 to 0..255, or
    0..2^b-1 when the PNG's sBIT chunk declares b significant bits (12-bit radiographs).
    """
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im)
            if mode == "I" and arr.max(initial=0) > 65535:
                raise ValueError(f"32-bit integer image with values up to {arr.max()}")
            # a 12-bit radiograph saved as 16-bit PNG declares it in sBIT; 0..65535 would make it
            # nearly black (max 16/255)
            bits = png_significant_bits(path)
            full = float(2 ** bits - 1) if bits and 8 <= bits < 16 else 65535.0
            return to_uint8_resized(arr.astype(np.float32), size, full_scale=full)
        if mode == "F":
            raise ValueError("floating-point images are not supported")
        if mode != "L":
            im = im.convert("L")
        arr = np.asarray(im)
    return to_uint8_resized(arr, size)


# ----------------------------------------------------------------------------- the pool

DecodeFn = Callable[[str, int], np.ndarray]


def _decode_chunk(args) -> list:
    """Worker: decode a chunk of (position, path); return [(position, image | None, error | None)]."""
    decode, size, chunk = args
    out = []
    for pos, path in chunk:
        try:
            if not os.path.exists(path):
                raise FileNotFoundError("file not found")
            img = decode(path, size)
            if img.shape != (size, size) or img.dtype != np.uint8:
                raise ValueError(f"decoder returned {img.dtype} {img.shape}, expected uint8 {(size, size)}")
            out.append((pos, img, None))
        except Exception as e:  # every failure becomes a named, reported problem, never a hang
            msg = str(e) or type(e).__name__
            if msg.startswith(f"{path}: "):  # the caller prefixes the path already
                msg = msg[len(path) + 2:]
            out.append((pos, None, f"{type(e).__name__}: {msg}"))
    return out


def _worker_init() -> None:
    import cv2
    cv2.setNumThreads(1)  # one image per process: threads inside cv2 only oversubscribe


def bounded_imap(fn: Callable, tasks: Iterable, workers: int, window: Optional[int] = None,
                 initializer: Optional[Callable] = _worker_init) -> Iterator:
    """Ordered `map(fn, tasks)` over a process pool with at most `window` tasks in flight.

    `Pool.imap` / `Executor.map` queue every result the workers produce even when the consumer
    is slower; the window bounds memory whatever the dataset size. workers <= 1 runs in this process (tests,
    tiny sets: no fork cost). fork, not spawn: workers start in milliseconds and inherit the
    memmaps; they only run numpy / PIL / cv2 / simplejpeg, no threads of the parent.
    """
    if workers <= 1:
        for t in tasks:
            yield fn(t)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    window = window or 4 * workers
    # ProcessPoolExecutor, not multiprocessing.Pool: when a worker dies (OOM killer, segfault in a
    # decoder) Pool waits forever for the lost task; the executor raises BrokenProcessPool.
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer) as pool:
        pending = []
        it = iter(tasks)
        for t in it:
            pending.append(pool.submit(fn, t))
            if len(pending) >= window:
                break
        try:
            while pending:
                res = pending.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(fn, nxt))
                yield res
        except BrokenProcessPool as e:
            raise ConvertError(f"a worker process died ({e}); out of memory? retry with fewer --workers") from e
        finally:
            for f in pending:
                f.cancel()


def decode_stream(paths: Sequence[str], decode: DecodeFn, size: int, workers: int,
                  chunk: int = 32) -> Iterator[tuple[int, Optional[np.ndarray], Optional[str]]]:
    """Yield (position, uint8 [size, size] | None, error | None) in input order."""
    tasks = ((decode, size, list(zip(range(s, min(s + chunk, len(paths))), paths[s:s + chunk])))
             for s in range(0, len(paths), chunk))
    for res in bounded_imap(_decode_chunk, tasks, workers):
        yield from res


def default_workers(workers: Optional[int]) -> int:
    if workers is not None:
        return max(0, int(workers))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr)


# ----------------------------------------------------------------------------- atomic output

class AtomicDir:
    """Write into `.<name>.incomplete` beside `out`; rename to `out` on success.

    An interrupted run leaves only the `.incomplete` sibling (never a manifest under `out`); the
    next run removes it and starts clean. An existing `out` is an error: we never overwrite a
    dataset someone may be training on.
    """

    def __init__(self, out: Path):
        self.out = Path(out).absolute()
        if self.out.exists():
            raise ConvertError(f"{self.out}: output folder already exists; remove it or choose another --out")
        self.tmp = self.out.parent / f".{self.out.name}.incomplete"

    def __enter__(self) -> Path:
        import fcntl
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # Two conversions to the same --out would otherwise share (and delete) one temporary
        # folder, and the first to finish would rename a mix of both: a lock held for the whole
        # run (released by the kernel if the process dies, so it never goes stale).
        self.lock_path = self.out.parent / f".{self.out.name}.lock"
        self.lock = open(self.lock_path, "a")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.close()
            raise ConvertError(f"{self.out}: another conversion is writing it right now (lock {self.lock_path})") from None
        if self.out.exists():  # finished while we waited for the lock
            self._unlock()
            raise ConvertError(f"{self.out}: output folder already exists; remove it or choose another --out")
        if self.tmp.exists():
            print(f"fasttrain convert: removing leftovers of an interrupted run: {self.tmp}", file=sys.stderr)
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self.out.exists():
                    raise ConvertError(f"{self.out}: appeared while converting; result left in {self.tmp}")
                os.replace(self.tmp, self.out)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._unlock()

    def _unlock(self) -> None:
        self.lock_path.unlink(missing_ok=True)
        self.lock.close()  # closing releases the flock


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- pack

@dataclass
class PackOptions:
    formats: tuple[str, ...] = ("raw",)
    size: int = 256  # the paper resizes every image to 256x256
    workers: Optional[int] = None  # decode processes; None = all cores
    on_error: str = "fail"
    jpeg_quality: int = 95  # DALI shards: q95 keeps mean |diff| < 2 grey levels (tested)
    shard_size: int = 4096  # DALI samples per tar: ~60 MB at 256 px, many shards per rank on NIH
    ffcv_workers: int = 2  # FFCV DatasetWriter processes (it only copies bytes from the memmap)
    progress: bool = True

    def check(self) -> None:
        fmts = tuple(dict.fromkeys(self.formats))
        bad = [f for f in fmts if f not in FORMATS]
        if bad or not fmts:
            raise ConvertError(f"unknown format(s) {bad or list(self.formats)}; choose from {list(FORMATS)}")
        self.formats = fmts
        if not 8 <= int(self.size) <= 4096:
            raise ConvertError(f"--size must be in 8..4096, got {self.size}")
        if not 1 <= int(self.jpeg_quality) <= 100:
            raise ConvertError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.shard_size < 1:
            raise ConvertError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.on_error not in ("fail", "skip"):
            raise ConvertError(f"--on-error must be 'fail' or 'skip', got {self.on_error!r}")


def begin(src, **options) -> tuple[Path, PackOptions, Problems]:
    """How every converter starts: the source folder exists, the options are valid, and a
    collector of bad-input problems for the chosen --on-error policy."""
    src = Path(src)
    if not src.is_dir():
        raise ConvertError(f"{src}: source folder not found")
    opts = PackOptions(**options)
    opts.check()
    return src, opts, Problems(opts.on_error)


def check_unique_ids(splits: dict[str, list[Item]], problems: Problems) -> dict[str, list[Item]]:
    """Duplicate ids (within or across splits) are an error: one image must never count twice."""
    seen: dict[str, str] = {}
    out = {}
    for name, items in splits.items():
        keep = []
        for it in items:
            if it.id in seen:
                problems.report(it.id, it.path, f"{it.where}: duplicate id {it.id!r} (first seen at {seen[it.id]})")
                continue
            seen[it.id] = f"{it.where} (split {name})"
            keep.append(it)
        out[name] = keep
    return out


def pack(*, dataset: str, source: Path, out: Path, splits: dict[str, list[Item]], label_names: list[str],
         decode: DecodeFn, opts: PackOptions, problems: Problems, source_files: Sequence[Path],
         extra: Optional[dict] = None, synthetic: bool = False) -> Path:
    """Decode, resize and write every split in every requested format, then the manifest."""
    from fasttrain import __version__
    from . import raw as raw_writer

    opts.check()
    splits = check_unique_ids(splits, problems)
    for name, items in splits.items():
        if not items:
            raise ConvertError(f"split '{name}' is empty ({dataset} source {source})")
    # fail fast: a missing writer library is found before decoding, not after
    t_setup = time.perf_counter()
    if "ffcv" in opts.formats:
        from . import ffcv_writer
        ffcv_writer.require()
    if "dali" in opts.formats:
        from . import dali_writer
        dali_writer.require()
    workers = default_workers(opts.workers)
    size = int(opts.size)
    t_all = time.perf_counter()
    setup_s = t_all - t_setup  # importing the writers (FFCV pulls in torch + numba: seconds)
    rates = {}
    with AtomicDir(out) as tmp:
        (tmp / "splits").mkdir()
        split_meta = {}
        details: dict[str, dict] = {}
        for name, items in splits.items():
            t0 = time.perf_counter()
            kept, skipped = raw_writer.write_split(tmp, name, items, decode, size, workers, opts.progress,
                                                   problems)
            rates[name] = {"decode_images_per_s": round(len(items) / max(time.perf_counter() - t0, 1e-9), 1)}
            if not kept:
                raise ConvertError(f"split '{name}' is empty after skipping {skipped} bad item(s)")
            labels = np.stack([it.labels for it in kept]).astype(np.float32)  # [N, C], row i = raw image i
            np.save(tmp / "splits" / f"{name}.labels.npy", labels)
            (tmp / "splits" / f"{name}.ids.txt").write_text("".join(it.id + "\n" for it in kept))
            # each id's source file relative to `source`: the PIL reference loader reads these
            src_abs = os.path.abspath(source)
            (tmp / "splits" / f"{name}.files.txt").write_text(
                "".join(os.path.relpath(os.path.abspath(it.path), src_abs) + "\n" for it in kept))
            with np.errstate(invalid="ignore"):
                prevalence = {ln: (None if np.all(np.isnan(labels[:, j])) else round(float(np.nanmean(labels[:, j])), 6))
                              for j, ln in enumerate(label_names)}
            split_meta[name] = {
                "count": len(kept),
                "ids": f"splits/{name}.ids.txt",
                "labels": f"splits/{name}.labels.npy",
                "files": f"splits/{name}.files.txt",
                "prevalence": prevalence,
                "ignored_labels": int(np.isnan(labels).sum()),
            }
        details["raw"] = raw_writer.details(split_meta, size)
        if "ffcv" in opts.formats:
            from . import ffcv_writer
            t0 = time.perf_counter()
            details["ffcv"] = ffcv_writer.write(tmp, split_meta, size, len(label_names), opts)
            rates["ffcv_images_per_s"] = round(sum(m["count"] for m in split_meta.values())
                                               / max(time.perf_counter() - t0, 1e-9), 1)
        if "dali" in opts.formats:
            from . import dali_writer
            t0 = time.perf_counter()
            details["dali"] = dali_writer.write(tmp, split_meta, size, len(label_names), opts, workers)
            rates["dali_images_per_s"] = round(sum(m["count"] for m in split_meta.values())
                                               / max(time.perf_counter() - t0, 1e-9), 1)
        if "raw" not in opts.formats:
            # raw was only the staging copy for ffcv / dali
            shutil.rmtree(tmp / "raw")
            details.pop("raw")
        elapsed = time.perf_counter() - t_all
        total = sum(m["count"] for m in split_meta.values())
        manifest = {
            "fasttrain_manifest": MANIFEST_VERSION,
            "dataset": dataset,
            "synthetic": bool(synthetic),
            "note": ("SYNTHETIC phantom images generated by fasttrain, not real radiographs"
                     if synthetic else None),
            "source": str(Path(source).absolute()),
            "label_names": list(label_names),
            "num_labels": len(label_names),
            "image_size": [size, size],
            "formats": [f for f in FORMAT_PREFERENCE if f in opts.formats],
            "splits": split_meta,
            "format_details": details,
            "preprocessing": {
                "grayscale": "ITU-R 601 luma for colour inputs, alpha dropped",
                "resize": f"whole image to {size}x{size}, cv2.INTER_AREA (INTER_LINEAR when upsampling)",
                "dtype": "uint8",
                "bit_depth": "16-bit PNG: 0..65535 -> 0..255 (0..2^b-1 when sBIT declares b bits); DICOM: see dicom section",
                **({"jpeg_quality": opts.jpeg_quality} if "dali" in opts.formats else {}),
                **(extra or {}).get("preprocessing", {}),
            },
            "source_sha256": {Path(p).name: sha256_file(Path(p)) for p in source_files},
            "fasttrain_version": __version__,
            "skipped": [s.to_dict() for s in problems.skipped],
            "conversion": {"seconds": round(elapsed, 2), "images": total,
                           "images_per_s": round(total / max(elapsed, 1e-9), 1), "workers": workers,
                           "writer_import_seconds": round(setup_s, 2),
                           **rates},
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest.update({k: v for k, v in (extra or {}).items() if k != "preprocessing"})
        # the manifest is the last file written: a folder with a manifest is complete
        write_json_atomic(tmp / "manifest.json", manifest)
    return Path(out).absolute()
