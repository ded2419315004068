"""Training checkpoints: atomic writes and everything exact resume needs.

A checkpoint is one torch file: {"model": state dict (what create_model builds; ETMAE keys
prefixed "student." / "proj." and no teacher, which is frozen and reloaded from its own file),
"optimizer", "scaler", "step" (optimiser steps), "epoch", "epoch_step" (batches of `epoch`
already consumed), "rng" (python, numpy, torch CPU and CUDA), "config" (resolved dict),
"kind" ("pretrain" | "finetune"), "layout" (world_size, per-rank batch_size, accum_steps,
global_batch, and the global sample position: epoch_samples of `epoch`'s order and samples of the
run consumed; a resume on another world size keeps the global batch from it), plus "metrics" for
best.pt, and "checksum": a SHA-256 over every tensor's name, dtype, shape and bytes, verified on
load}.

Step checkpoints: with run.keep_checkpoints = K > 0, each save also leaves
`checkpoints/step_NNNNNNNN.pt` (a hard link to the same bytes as last.pt, so no second write) and
only the newest K are kept: a last.pt found corrupt can fall back to the previous good one.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fasttrain.io import write_atomic_with


STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointCorrupt(ValueError):
    """A checkpoint file that cannot be read or whose tensors do not match their recorded checksum."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (disk full, quota, I/O error): the previous one is intact."""


def tensor_checksum(obj) -> str:
    """SHA-256 over every tensor in `obj` (nested dicts/lists), walked in a fixed order, with its
    path, dtype and shape: a flipped bit, a truncated tensor or a swapped entry changes it.
    hashlib's SHA-256 runs at ~1-2 GB/s (SHA-NI), a fraction of the time torch.save takes."""
    h = hashlib.sha256()

    def walk(x, path: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer, no copy
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if path == "" and k == "checksum":
                    continue
                walk(x[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
    walk(obj, "")
    return h.hexdigest()


def with_checksum(obj: dict) -> dict:
    return {**obj, "checksum": {"algo": "sha256-tensors", "value": tensor_checksum(obj)}}


def verify_checksum(ckpt: dict, path: str | Path) -> None:
    """Raise CheckpointCorrupt naming `path` when the recorded checksum does not match (files
    written before checksums existed have none and pass)."""
    rec = ckpt.get("checksum")
    if rec is None:
        return
    if not isinstance(rec, dict) or rec.get("algo") != "sha256-tensors":
        raise CheckpointCorrupt(f"{path}: unknown checksum record {rec!r}")
    got = tensor_checksum(ckpt)
    if got != rec.get("value"):
        raise CheckpointCorrupt(f"{path}: tensor checksum mismatch (recorded {str(rec.get('value'))[:12]}..., "
                                f"computed {got[:12]}...): the file is corrupt")


def capture_rng() -> dict:
    # numpy's state as tensors and ints, so the file loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: str | Path, *, also: Optional[str | Path] = None, checksum: bool = True) -> Path:
    """torch.save through fasttrain.io.write_atomic_with (temp file in the same folder, fsync,
    rename over `path`, fsync of the folder) so that the rename survives a machine crash: a
    reader (or a resume after SIGKILL, or a second signal during the save) sees the old complete
    file or the new complete file, never half. `also`: a second name for the same bytes (a hard
    link to the fsynced temp file, made before the rename; a copy where the filesystem has no hard
    links). A failed write (ENOSPC, quota, I/O error) removes the temp file, leaves `path` as it
    was and raises CheckpointWriteError naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if checksum:
        obj = with_checksum(obj)

    def write(f) -> None:
        torch.save(obj, f)
        if also is not None:
            f.flush()
            os.fsync(f.fileno())
            _link_or_copy(f.name, Path(also))  # f.name: the temp file, complete and on disk

    try:
        write_atomic_with(path, write)  # fsyncs the file, renames, fsyncs the folder
    except Exception as raised:  # write_atomic_with removed the temp file
        e = _os_error_in_chain(raised)
        if e is None:
            raise
        why = "no space left on the device" if e.errno == errno.ENOSPC else (
            "disk quota exceeded" if e.errno == errno.EDQUOT else f"{type(e).__name__}: {e}")
        old = " the previous one is intact" if path.is_file() else " there is no previous one"
        raise CheckpointWriteError(f"could not write checkpoint {path} ({why});{old}. "
                                   "Free space (or lower run.keep_checkpoints) and resume with --resume auto") from e
    return path


def _os_error_in_chain(exc: BaseException) -> Optional[OSError]:
    """The OSError behind `exc`: on a real full disk torch.save raises OSError(ENOSPC), and its
    zip writer's cleanup then raises a RuntimeError ("unexpected pos ...") that hides it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _link_or_copy(src: str | Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
        try:  # a filesystem without hard links: a copy (fsynced) instead
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial copy behind
            raise
    os.replace(tmp, dst)


def step_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def step_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the kept step checkpoints in `folder`, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / n) for n in os.listdir(folder) if (m := STEP_FILE.match(n))]
    return sorted(found, reverse=True)


def prune_step_checkpoints(folder: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step checkpoints; returns what was removed."""
    removed = []
    for _, p in step_checkpoints(folder)[max(0, keep):]:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def load_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """Read one of our checkpoints and verify its tensor checksum; the error names the file and
    what is wrong (CheckpointCorrupt for an unreadable or corrupt file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Our files hold only tensors and plain values: the safe loader reads them.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, ...
        raise CheckpointCorrupt(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a fasttrain training checkpoint (no 'model' entry)")
    if verify:
        verify_checksum(ckpt, path)
    return ckpt


def find_resumable(last: str | Path) -> tuple[Optional[Path], Optional[dict], list[str]]:
    """The newest checkpoint in last.pt's folder that loads and verifies: last.pt, else the kept
    step checkpoints newest first. Returns (path, checkpoint, problems met on the way)."""
    last = Path(last)
    problems: list[str] = []
    candidates = ([last] if last.is_file() else []) + [p for _, p in step_checkpoints(last.parent)]
    for p in candidates:
        try:
            return p, load_checkpoint(p), problems
        except (CheckpointCorrupt, ValueError) as e:
            problems.append(str(e))
    return None, None, problems
