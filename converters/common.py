"""The converters' bottom layer: items, errors, the bad-input collector, CSV reading, patient
splits, decoding through the process pool, atomic output and the pack options.

Imports run one way: fasttrain.pool, fasttrain.format (the packed format and its writers) and
decode (pixels) <- common <- pack (`begin`, `pack`: the pipeline that drives the writers) <- the
source converters (nih, chexpert, dicom, ...) <- cli. Nothing here imports a module above it.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import gzip
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from fasttrain.format.manifest import FORMATS, METADATA_COLUMNS, WriteError, incomplete_path
# default_workers and worker_init are also this module's interface (predict and the benchmarks
# import the converters' pool settings from here)
from fasttrain.pool import WorkerDied, bounded_imap, default_workers, worker_init  # noqa: F401

from .decode import RESIZE_MODES


class ConvertError(ValueError):
    """Bad source input or arguments, or a writer or worker that failed; the message names the
    file / row and what is wrong. Every converter raises it for whatever stops a conversion."""


@contextlib.contextmanager
def convert_errors():
    """Inside: the format writers' WriteError and the pool's WorkerDied leave as a ConvertError."""
    try:
        yield
    except (WriteError, WorkerDied) as e:
        raise ConvertError(str(e)) from e


@dataclass
class Item:
    """One image to convert: its id (what `open_packed(...).ids` returns), its file, its labels."""
    id: str
    path: str  # absolute path of the source image file
    labels: np.ndarray  # float32 [C], NaN = ignored
    where: str  # where it came from, for errors: "Data_Entry_2017.csv row 17"
    group: str = ""  # patient id: val splits are carved patient-disjoint
    # per-image metadata the source has (METADATA_COLUMNS: sex "M"/"F", age in years, view); never
    # read by training, only by `evaluate --by` and view filters
    meta: dict = field(default_factory=dict)


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


# ----------------------------------------------------------------------------- metadata

SEX_NAMES = {"m": "M", "male": "M", "f": "F", "female": "F"}


def parse_sex(value: str) -> Optional[str]:
    """'M' / 'Male' / 'F' / 'Female' (any case) -> 'M' / 'F'; anything else (blank, 'O', 'Unknown') -> None."""
    return SEX_NAMES.get(str(value).strip().lower())


def parse_age(value: str) -> Optional[float]:
    """Age in years: '58', '58.5', NIH's original '058Y', DICOM's '058Y' / '006M' / '010D'; blank or
    unreadable -> None (metadata is optional: a bad age never stops a conversion)."""
    text = str(value).strip().upper()
    scale = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}.get(text[-1:], None) if text else None
    if scale is not None:
        text = text[:-1]
    try:
        age = float(text) * (scale or 1.0)
    except ValueError:
        return None
    return age if np.isfinite(age) and 0 <= age < 150 else None


def parse_view(value: str) -> Optional[str]:
    """A view position as the sources spell it, upper-cased ('PA', 'AP', 'LL', 'LATERAL', ...); blank -> None."""
    text = "_".join(str(value).strip().upper().split())
    return text or None


def parse_views(text: Optional[str], flag: str = "--views") -> Optional[tuple[str, ...]]:
    """'PA,AP' -> ('PA', 'AP'); None / '' / 'all' -> None (keep every view)."""
    if text is None or str(text).strip().lower() in ("", "all"):
        return None
    views = tuple(v for v in (parse_view(t) for t in str(text).split(",")) if v)
    if not views:
        raise ConvertError(f"{flag}: no view names in {text!r} (e.g. PA,AP)")
    return views


def metadata_names(items: Iterable[Item]) -> list[str]:
    """The METADATA_COLUMNS some item has (the patient comes from each item's group)."""
    found = set()
    for it in items:
        if it.group:
            found.add("patient")
        found.update(c for c, v in it.meta.items() if v is not None)
    return [c for c in METADATA_COLUMNS if c in found]


def metadata_columns(items: Sequence[Item], names: Sequence[str]) -> dict[str, list]:
    """Items -> {column: [value per item]} for each of `names` (None = missing)."""
    return {c: [(it.group or None) if c == "patient" else it.meta.get(c) for it in items] for c in names}


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


def carve(splits: dict[str, list[Item]], name: str, fraction: float, seed: int, flag: str) -> None:
    """Move a patient-disjoint `fraction` of train into split `name` (the `flag` that asked for it
    is named in every error)."""
    if name in splits:
        raise ConvertError(f"the labels already have a '{name}' split; drop {flag}")
    if "train" not in splits:
        raise ConvertError(f"{flag}: no 'train' split to carve it from")
    if not 0.0 < fraction < 1.0:
        raise ConvertError(f"{flag} must be in (0, 1), got {fraction}")
    try:
        splits["train"], splits[name] = patient_disjoint_split(splits["train"], fraction, seed)
    except ConvertError as e:
        raise ConvertError(str(e).replace("--val-fraction", flag)) from None


# split names as CSVs spell them -> ours
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
               "validation": "val", "dev": "val", "test": "test", "testing": "test"}


# ----------------------------------------------------------------------------- the pool

# (path, size) -> uint8 [size, size]; the decoders in decode.py also take resize= (RESIZE_MODES)
DecodeFn = Callable[[str, int], np.ndarray]


def decode_chunk(args) -> list:
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


def decode_stream(paths: Sequence[str], decode: DecodeFn, size: int, workers: int,
                  chunk: Optional[int] = None) -> Iterator[tuple[int, Optional[np.ndarray], Optional[str]]]:
    """Yield (position, uint8 [size, size] | None, error | None) in input order.

    Chunks of up to 32 paths per task amortise the pool's per-task cost (~0.1 ms, against 5-100 ms
    of decoding per full-size image), but never fewer than ~8 tasks per worker: with 32-image
    chunks a 150-image split kept one of two workers idle for the last chunk (measured: 0.8x the
    naive reference on small sets); smaller chunks keep every worker busy to the end of a split."""
    if chunk is None:
        chunk = max(1, min(32, len(paths) // (8 * max(1, workers))))
    tasks = ((decode, size, list(zip(range(s, min(s + chunk, len(paths))), paths[s:s + chunk])))
             for s in range(0, len(paths), chunk))
    for res in bounded_imap(decode_chunk, tasks, workers):
        yield from res


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
        self.tmp = incomplete_path(self.out)

    def __enter__(self) -> Path:
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


# ----------------------------------------------------------------------------- pack

@dataclass
class PackOptions:
    formats: tuple[str, ...] = ("raw",)
    size: int = 256  # the paper resizes every image to 256x256
    resize: str = "squash"  # fitting a frame to the square: crop | squash | pad (decode.RESIZE_MODES)
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
        if self.resize not in RESIZE_MODES:
            raise ConvertError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if not 1 <= int(self.jpeg_quality) <= 100:
            raise ConvertError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.shard_size < 1:
            raise ConvertError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.on_error not in ("fail", "skip"):
            raise ConvertError(f"--on-error must be 'fail' or 'skip', got {self.on_error!r}")
