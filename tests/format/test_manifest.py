"""The manifest: written last and atomically, read back with its version checked, and the split
files it lists where split_paths says; a folder without one names the interrupted conversion."""
from __future__ import annotations

import json

import pytest

from fasttrain.converters.nih import convert_nih
from fasttrain.converters.synthetic import generate_phantoms
from fasttrain.format.manifest import (MANIFEST_VERSION, PackedError, incomplete_path, read_manifest, split_paths,
                                       write_manifest)


def test_write_then_read_round_trips_and_leaves_no_temp_file(tmp_path):
    m = {"fasttrain_manifest": MANIFEST_VERSION, "dataset": "x", "note": None}
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_other_versions_and_missing_manifests_are_named(tmp_path):
    write_manifest(tmp_path, {"fasttrain_manifest": MANIFEST_VERSION + 1})
    with pytest.raises(PackedError, match="manifest version 2, this fasttrain reads 1"):
        read_manifest(tmp_path)
    out = tmp_path / "packed"
    out.mkdir()
    with pytest.raises(PackedError, match="no manifest.json, not a packed dataset") as e:
        read_manifest(out)
    assert "interrupted" not in str(e.value)
    incomplete_path(out).mkdir()
    assert incomplete_path(out) == tmp_path / ".packed.incomplete"
    with pytest.raises(PackedError, match=r"\.packed\.incomplete is an interrupted conversion"):
        read_manifest(out)


def test_a_conversion_writes_the_files_its_manifest_lists_and_no_temp_files(tmp_path):
    generate_phantoms(tmp_path / "src", 12, seed=1, size=16, workers=1, progress=False)
    out = convert_nih(tmp_path / "src", tmp_path / "packed", formats=("raw",), size=16, workers=1, progress=False)
    m = read_manifest(out)
    for split, meta in m["splits"].items():
        for key, rel in split_paths(split).items():
            assert meta[key] == rel and (out / rel).is_file(), (split, key)
    assert json.loads((out / split_paths("train")["metadata"]).read_text())["patient"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
