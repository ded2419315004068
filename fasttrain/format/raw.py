"""The raw format: one uint8 memmap [N, H, W] per split, written as the pool decodes.

It is always written first (the FFCV and DALI writers read from it), so every image is decoded
and validated exactly once, in our own pool, before any other writer sees it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fasttrain.converters.common import DecodeFn, Item, Problems, decode_stream, progress


def path_of(split: str) -> str:
    return f"raw/{split}.u8"


def write_split(root: Path, split: str, items: list[Item], decode: DecodeFn, size: int, workers: int,
                show_progress: bool, problems: Problems) -> tuple[list[Item], int]:
    """Decode `items` into root/raw/<split>.u8; return (items kept, number skipped)."""
    return write_splits(root, {split: items}, decode, size, workers, show_progress, problems)[split]


def write_splits(root: Path, splits: dict[str, list[Item]], decode: DecodeFn, size: int, workers: int,
                 show_progress: bool, problems: Problems) -> dict[str, tuple[list[Item], int]]:
    """Decode every split into root/raw/<split>.u8 through ONE process pool; return, per split,
    (items kept, number skipped).

    One pool for all splits, not one per split: each pool start costs its fork and the tail of a
    split where workers wait for the last chunk (a 2-split bench pack paid both twice). Skipped
    items leave no hole: images are written densely and each file is truncated to its kept count
    at the end, so row i of a split's memmap is always kept[i].
    """
    (root / "raw").mkdir(exist_ok=True)
    # Headerless C-order bytes: any reader (numpy, FFCV, DALI, a C loader) maps it with one line;
    # the shape lives in the manifest.
    images = {name: np.memmap(root / path_of(name), dtype=np.uint8, mode="w+", shape=(max(len(items), 1), size, size))
              for name, items in splits.items()}
    kept: dict[str, list[Item]] = {name: [] for name in splits}
    order = [(name, it) for name, items in splits.items() for it in items]  # position -> (split, item)
    bar = progress(len(order), "decode " + "+".join(splits), show_progress)
    try:
        for pos, img, err in decode_stream([it.path for _, it in order], decode, size, workers):
            name, it = order[pos]
            if err is not None:
                problems.report(it.id, it.path, f"{it.where}: {it.path}: {err}")
                bar.update(1)
                continue
            images[name][len(kept[name])] = img  # [H, W]
            kept[name].append(it)
            bar.update(1)
    finally:
        bar.close()
    for name in splits:
        images[name].flush()
    images.clear()  # unmap before truncating
    for name, items in splits.items():
        os.truncate(root / path_of(name), len(kept[name]) * size * size)
    return {name: (kept[name], len(items) - len(kept[name])) for name, items in splits.items()}


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
