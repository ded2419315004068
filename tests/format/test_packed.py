"""open_packed: the read-back API and its errors on packed folders that are wrong or incomplete."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fasttrain.converters.nih import convert_nih
from fasttrain.data import open_packed
from fasttrain.format.packed import PackedError


@pytest.fixture(scope="module")
def packed(tmp_path_factory, write_nih):
    tmp = tmp_path_factory.mktemp("packed")
    write_nih(tmp / "src")
    return convert_nih(tmp / "src", tmp / "out", formats=("raw", "dali"), size=16, workers=0, progress=False)


def test_api(packed):
    ps = open_packed(packed)  # defaults: train, raw first
    assert ps.format == "raw" and ps.split == "train" and len(ps) == 5
    assert ps.images.shape == (5, 16, 16) and ps.images.dtype == np.uint8
    assert not ps.images.flags.writeable and not ps.labels.flags.writeable
    assert ps.labels.dtype == np.float32 and ps.labels.shape == (5, 14)
    assert ps.image(-1).shape == (16, 16) and np.array_equal(ps.image(-1), ps.image(4))
    assert ps.manifest["image_size"] == [16, 16] and ps.image_size == (16, 16)
    with pytest.raises(IndexError, match="out of range"):
        ps.image(5)
    d = open_packed(packed, "test", "dali")
    assert d.shards and d.index_files and d.beton is None and d.images is None


def test_errors(packed, tmp_path):
    with pytest.raises(PackedError, match="no manifest.json"):
        open_packed(tmp_path)
    with pytest.raises(PackedError, match=r"no split 'val'; it has \['train', 'test'\]"):
        open_packed(packed, "val")
    with pytest.raises(PackedError, match="format 'ffcv' was not written"):
        open_packed(packed, "train", "ffcv")
    with pytest.raises(PackedError, match=r"unknown format 'jpeg'; the packed formats are \['raw', 'ffcv', 'dali'\]"):
        open_packed(packed, "train", "jpeg")  # not "convert again with --format jpeg"
    # a copy with a truncated raw file, and one with a future manifest version
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    with open(bad / "raw" / "train.u8", "r+b") as f:
        f.truncate(100)
    with pytest.raises(PackedError, match=r"train.u8: 100 bytes, expected 1280"):
        open_packed(bad, "train")
    m = json.loads((bad / "manifest.json").read_text())
    m["fasttrain_manifest"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackedError, match="manifest version 99"):
        open_packed(bad)
