"""The raw format: one uint8 memmap [N, H, W] per split, written as the pool decodes.

It is always written first (the FFCV and DALI writers read from it), so every image is decoded
and validated exactly once, in the converters' pool, before any other writer sees it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

# (position, uint8 [size, size] | None, error | None): one decoded image, or why it was not
Decoded = tuple[int, Optional[np.ndarray], Optional[str]]


def path_of(split: str) -> str:
    return f"raw/{split}.u8"


def write_splits(root: Path, counts: dict[str, int], size: int, decoded: Iterable[Decoded],
                 on_error: Callable[[int, str], None]) -> dict[str, list[int]]:
    """Stream decoded images into root/raw/<split>.u8, one file per split; return, per split, the
    positions (in the split) of the images written, in file order.

    `decoded` covers the splits end to end in the order of `counts`: positions 0 .. counts[first]-1
    are the first split's images, the next counts[second] the second's, and so on. An image that
    comes with an error is passed to `on_error(position, error)` (which may raise) and leaves no
    hole: images are written densely and each file is truncated to its written count at the end,
    so row i of a split's memmap is the i-th image written.
    """
    (root / "raw").mkdir(exist_ok=True)
    # Headerless C-order bytes: any reader (numpy, FFCV, DALI, a C loader) maps it with one line;
    # the shape lives in the manifest.
    images = {name: np.memmap(root / path_of(name), dtype=np.uint8, mode="w+", shape=(max(n, 1), size, size))
              for name, n in counts.items()}
    names = list(counts)
    starts = np.cumsum([0] + [counts[n] for n in names])  # [S + 1] first position of each split
    kept: dict[str, list[int]] = {name: [] for name in names}
    for pos, img, err in decoded:
        if err is not None:
            on_error(pos, err)
            continue
        k = int(np.searchsorted(starts, pos, side="right")) - 1
        name = names[k]
        images[name][len(kept[name])] = img  # [H, W]
        kept[name].append(pos - int(starts[k]))
    for name in names:
        images[name].flush()
    images.clear()  # unmap before truncating
    for name in names:
        os.truncate(root / path_of(name), len(kept[name]) * size * size)
    return kept


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
