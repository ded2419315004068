"""Atomic file writes, shared by every stage that leaves a file behind.

A reader (a resumed run, a job polling `summary.json`, a user opening a table) sees either the
old file or the whole new one, never a half-written file: write a sibling temp file, flush it to
disk, rename it over the target (rename is atomic on one POSIX file system). The temp name carries
the process id, so two processes writing the same path never share a temp file; the fsyncs of the
file and then of its folder make the rename durable across a machine crash, not only a killed process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, IO


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically; return the path."""
    mode = "wb" if isinstance(data, (bytes, bytearray, memoryview)) else "w"
    return write_atomic_with(path, lambda f: f.write(data), mode=mode)


def write_atomic_with(path: str | Path, write: Callable[[IO], Any], mode: str = "wb") -> Path:
    """Call `write(f)` on a temp file opened with `mode` beside `path`, then rename it to `path`.

    For writers that stream into a file object (torch.save, np.save, a CSV writer). The temp file
    is removed when `write` raises, and the target is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a file system that cannot is left as is."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = str) -> Path:
    """`obj` as JSON with a final newline, written atomically. Values JSON cannot hold go through
    `default` (str: a run's records keep paths and dtypes readable); default=None makes them a
    TypeError (a manifest must hold only what its readers parse)."""
    return write_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")
