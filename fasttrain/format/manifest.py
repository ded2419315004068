"""What a packed dataset is on disk, apart from any one format's files.

    <out>/manifest.json               written last: a folder with a manifest is complete
    <out>/splits/<split>.ids.txt      one id per line, row i = image i of every format
    <out>/splits/<split>.labels.npy   float32 [N, C], NaN = ignored
    <out>/splits/<split>.files.txt    each id's source file, relative to manifest["source"]
    <out>/splits/<split>.metadata.json  {column: [value per image]} over METADATA_COLUMNS (optional)
    <out>/raw/ ffcv/ dali/            the formats written (format.raw, format.ffcv, format.dali)

The writers (fasttrain.converters) and the readers (format.packed, fasttrain.data) both import
this module; it imports neither.
"""
from __future__ import annotations

import json
from pathlib import Path

from fasttrain.io import write_json_atomic

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMATS = ("raw", "ffcv", "dali")
# Reading order of the formats when `open_packed(format=None)`: raw reads at memcpy speed.
FORMAT_PREFERENCE = ("raw", "ffcv", "dali")
# The metadata columns a packed split can carry (splits/<split>.metadata.json): the patient (every
# converter knows it: it makes splits patient-disjoint), sex, age in years, acquisition view.
METADATA_COLUMNS = ("patient", "sex", "age", "view")


class PackedError(ValueError):
    """A packed dataset that is missing, incomplete, or lacks the requested split / format."""


class WriteError(ValueError):
    """A packed format that cannot be written: its writer library is missing, or the writer failed."""


def split_paths(split: str) -> dict[str, str]:
    """The per-split files every packed dataset has, relative to its root (as the manifest lists them)."""
    return {"ids": f"splits/{split}.ids.txt", "labels": f"splits/{split}.labels.npy",
            "files": f"splits/{split}.files.txt", "metadata": f"splits/{split}.metadata.json"}


def incomplete_path(out) -> Path:
    """Where a conversion into `out` writes until it renames the folder to `out`."""
    out = Path(out)
    return out.parent / f".{out.name}.incomplete"


def write_manifest(root, manifest: dict) -> Path:
    """Write root/manifest.json atomically; call it last (its presence marks the folder complete)."""
    return write_json_atomic(Path(root) / MANIFEST_NAME, manifest, default=None)


def read_manifest(path) -> dict:
    """The manifest of the packed dataset at `path`; a PackedError when there is none, or of another version."""
    root = Path(path)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        hint = ""
        partial = incomplete_path(root)
        if partial.exists():
            hint = f" ({partial} is an interrupted conversion: re-run `fasttrain convert`)"
        raise PackedError(f"{root}: no manifest.json, not a packed dataset (write one with `fasttrain convert`){hint}")
    manifest = json.loads(mpath.read_text())
    if manifest.get("fasttrain_manifest") != MANIFEST_VERSION:
        raise PackedError(f"{mpath}: manifest version {manifest.get('fasttrain_manifest')!r}, "
                          f"this fasttrain reads {MANIFEST_VERSION}")
    return manifest
