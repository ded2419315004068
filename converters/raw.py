"""The raw format: one uint8 memmap [N, H, W] per split, written as the pool decodes.

It is always written first (the FFCV and DALI writers read from it), so every image is decoded
and validated exactly once, in our own pool, before any other writer sees it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .common import DecodeFn, Item, Problems, decode_stream, progress


def path_of(split: str) -> str:
    return f"raw/{split}.u8"


def write_split(root: Path, split: str, items: list[Item], decode: DecodeFn, size: int, workers: int,
                show_progress: bool, problems: Problems) -> tuple[list[Item], int]:
    """Decode `items` into root/raw/<split>.u8; return (items kept, number skipped).

    Skipped items leave no hole: images are written densely and the file is truncated to the
    kept count at the end, so row i of the memmap is always kept[i].
    """
    (root / "raw").mkdir(exist_ok=True)
    fname = root / path_of(split)
    n = len(items)
    # Headerless C-order bytes: any reader (numpy, FFCV, DALI, a C loader) maps it with one line;
    # the shape lives in the manifest.
    images = np.memmap(fname, dtype=np.uint8, mode="w+", shape=(max(n, 1), size, size))
    kept: list[Item] = []
    bar = progress(n, f"decode {split}", show_progress)
    try:
        for pos, img, err in decode_stream([it.path for it in items], decode, size, workers):
            it = items[pos]
            if err is not None:
                problems.report(it.id, it.path, f"{it.where}: {it.path}: {err}")
                bar.update(1)
                continue
            images[len(kept)] = img  # [H, W]
            kept.append(it)
            bar.update(1)
    finally:
        bar.close()
    images.flush()
    del images
    os.truncate(fname, len(kept) * size * size)
    return kept, n - len(kept)


def details(split_meta: dict, size: int) -> dict:
    return {
        "files": {s: path_of(s) for s in split_meta},
        "dtype": "uint8",
        "layout": "headerless C-order memmap [N, H, W]; N = splits[split].count",
        "shape_hw": [size, size],
    }


def open_images(root: Path, split: str, count: int, size: tuple[int, int]) -> np.memmap:
    """The read-only memmap [N, H, W] of one split."""
    fname = Path(root) / path_of(split)
    expected = count * size[0] * size[1]
    actual = fname.stat().st_size
    if actual != expected:
        raise ValueError(f"{fname}: {actual} bytes, expected {expected} ({count} x {size[0]} x {size[1]})")
    return np.memmap(fname, dtype=np.uint8, mode="r", shape=(count, size[0], size[1]))
