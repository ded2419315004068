"""The FFCV format: one .beton per split, written by FFCV's own DatasetWriter from the raw memmap.

Fields: "image" NDArrayField uint8 [H, W] (FFCV has no grayscale image field, and its JPEG path
decodes to RGB only; the raw bytes read at memory speed, which is the point of FFCV for 256-px
images), "label" NDArrayField float32 [C] (NaN = ignored), "index" IntField (int64, the sample's
position in the split, so loaders can prove label alignment).

FFCV's DatasetWriter spins forever when one of its worker processes dies. Two guards: every image
was already decoded and validated by our pool (the workers only copy bytes out of a memmap), and
a watchdog raises if the workers are gone while the writer still waits.

FFCV changes torch's thread count behind the caller's back: importing `ffcv.pipeline.compiler`
calls `torch.set_num_threads(1)`, and each FFCV epoch iterator sets it to the loader's worker
count. A process that converts or reads FFCV and then trains would silently run its matmuls on one
core. Everything in fasttrain that imports FFCV does it inside `keep_torch_threads()`.
"""
from __future__ import annotations

import _thread
import contextlib
import functools
import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fasttrain.format import raw
from fasttrain.format.manifest import WriteError, split_paths


@contextlib.contextmanager
def keep_torch_threads():
    """Restore torch's intra-op thread count on exit, whatever FFCV set meanwhile."""
    import torch  # heavy: a conversion without FFCV never imports it
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def path_of(split: str) -> str:
    return f"ffcv/{split}.beton"


class _RawSplit:
    """Indexable view of a raw split in the order FFCV's fields are declared."""

    def __init__(self, root: Path, split: str, count: int, size: int):
        self.args = (Path(root), split, count, (size, size))
        self.labels = np.load(Path(root) / split_paths(split)["labels"])  # [N, C] float32
        self._images = None

    def __len__(self) -> int:
        return self.args[2]

    def __getitem__(self, i: int):
        if self._images is None:  # opened lazily, inside each forked worker
            self._images = raw.open_images(*self.args)
        return np.ascontiguousarray(self._images[i]), self.labels[i], int(i)


def require():
    """Import FFCV or raise a WriteError saying how to install it. Called before decoding starts,
    so a missing FFCV fails in seconds, not after an hour of decoding (the import itself takes
    ~5-8 s: torch + numba)."""
    try:
        with keep_torch_threads():
            from ffcv.fields import IntField, NDArrayField
            from ffcv.writer import DatasetWriter
    except ImportError as e:
        raise WriteError(f"--format ffcv needs FFCV: pip install -e .[ffcv] "
                           f"(after apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev): {e}") from e
    return IntField, NDArrayField, DatasetWriter


def write(root: Path, split_meta: dict, size: int, num_labels: int, *, workers: int, show_progress: bool) -> dict:
    """One .beton per split of `split_meta` ({split: {"count": N}}), read from the raw memmaps
    already under `root`; `workers` DatasetWriter processes. Returns the manifest's details."""
    IntField, NDArrayField, DatasetWriter = require()
    (root / "ffcv").mkdir(exist_ok=True)
    for split, meta in split_meta.items():
        ds = _RawSplit(root, split, meta["count"], size)
        fields = {
            "image": NDArrayField(np.dtype("uint8"), (size, size)),
            "label": NDArrayField(np.dtype("float32"), (num_labels,)),
            "index": IntField(),
        }
        fname = root / path_of(split)
        sample_bytes = size * size + 4 * num_labels + 8
        # FFCV reads whole pages; 8 MiB pages (its default) waste space on tiny splits
        page = 1 << 21 if len(ds) * sample_bytes < (64 << 20) else 1 << 23
        while page < 2 * sample_bytes:
            page <<= 1
        writer = DatasetWriter(str(fname), fields, page_size=page,
                               num_workers=max(1, min(workers, len(ds))))
        with _ffcv_progress(show_progress, f"ffcv {split}"):
            _run_with_watchdog(lambda: writer.from_indexed_dataset(ds, chunksize=256), fname)
    return {
        "files": {s: path_of(s) for s in split_meta},
        "image_field": "ndarray",
        "fields": {
            "image": {"type": "NDArrayField", "dtype": "uint8", "shape": [size, size]},
            "label": {"type": "NDArrayField", "dtype": "float32", "shape": [num_labels]},
            "index": {"type": "IntField", "dtype": "int64", "meaning": "position in the split"},
        },
    }


@contextlib.contextmanager
def _ffcv_progress(enabled: bool, desc: str):
    """FFCV's writer draws its own tqdm bar with no way to turn it off or name it; swap the name
    its module looks up, so --no-progress (CI logs) is quiet and the bar says which split it is."""
    import ffcv.writer as fw
    old = fw.tqdm
    fw.tqdm = functools.partial(tqdm, disable=not enabled, desc=desc, unit="img")
    try:
        yield
    finally:
        fw.tqdm = old


def _run_with_watchdog(fn, fname: Path, grace_s: float = 20.0) -> None:
    """Run FFCV's writer in this (main) thread while a watchdog thread checks its workers; if they
    all exited but the writer still waits, interrupt the main thread and raise a named error.

    The writer stays on the main thread because it forks its workers, and numba's TBB layer is
    unsafe to fork from any other thread.
    """
    before = {p.pid for p in mp.active_children()}
    done = threading.Event()
    crashed = threading.Event()

    def watch():
        seen_workers, idle_since = False, None
        while not done.wait(0.2):
            workers = [p for p in mp.active_children() if p.pid not in before]
            if workers:
                seen_workers, idle_since = True, None
            elif seen_workers:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > grace_s:
                    crashed.set()
                    _thread.interrupt_main()
                    return

    th = threading.Thread(target=watch, daemon=True, name="ffcv-watchdog")
    th.start()
    try:
        fn()
    except KeyboardInterrupt:
        if crashed.is_set():
            raise WriteError(f"{fname}: FFCV's DatasetWriter workers exited but the writer kept waiting "
                               f"(a worker crashed); the output was not written") from None
        raise
    except Exception as e:
        raise WriteError(f"{fname}: FFCV writer failed: {e!r}") from e
    finally:
        done.set()
        th.join()
