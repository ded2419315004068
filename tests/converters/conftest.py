"""What only the converter tests use: the area-resize reference and Xiao et al.'s NIH split files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def block_means(img: np.ndarray, size: int) -> np.ndarray:
    """Reference area resize when size divides the image: the mean of each block (float)."""
    h, w = img.shape
    return img.astype(np.float64).reshape(size, h // size, size, w // size).mean(axis=(1, 3))


def xiao_split_files(split_dir, nih) -> dict[str, list[str]]:
    """Xiao et al.'s split files for a `write_nih` source: train_val cut into train (all but the
    last) and val (the last)."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    tv = nih.ids["train"]
    parts = {"train": tv[:-1], "val": tv[-1:], "test": nih.ids["test"]}
    lab = {i: y for s in ("train", "test") for i, y in zip(nih.ids[s], nih.labels[s])}
    for split, names in parts.items():
        lines = [n + " " + " ".join(str(int(v)) for v in lab[n]) for n in names]
        (split_dir / f"{split}_official.txt").write_text("\n".join(lines) + "\n")
    return parts


@pytest.fixture(scope="session")
def block_mean():
    """`block_mean(img, size) -> float [size, size]`: the mean of each block."""
    return block_means


@pytest.fixture(scope="session")
def write_xiao_splits():
    """`write_xiao_splits(split_dir, nih) -> {split: names}`: {train,val,test}_official.txt."""
    return xiao_split_files
