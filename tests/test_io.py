"""fasttrain.io: atomic writes leave the old file or the whole new one, never a part."""
from __future__ import annotations

import json

import pytest

from fasttrain.io import write_atomic, write_atomic_with, write_json_atomic


def test_write_atomic_text_bytes_and_json(tmp_path):
    p = tmp_path / "a.txt"
    assert write_atomic(p, "héllo\n") == p
    assert p.read_text(encoding="utf-8") == "héllo\n"
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    j = write_json_atomic(tmp_path / "r.json", {"x": 1, "path": tmp_path})
    assert json.loads(j.read_text()) == {"x": 1, "path": str(tmp_path)}
    assert j.read_text().endswith("\n")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.txt", "r.json"]  # no temp file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "keep.json"
    write_json_atomic(p, {"old": True})

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic_with(p, boom)
    assert json.loads(p.read_text()) == {"old": True}
    assert [f.name for f in tmp_path.iterdir()] == ["keep.json"]
    with pytest.raises(TypeError):  # tuple keys: json refuses them even with default=str
        write_json_atomic(p, {(1, 2): "tuple keys are not JSON"})
    assert json.loads(p.read_text()) == {"old": True}


def test_json_without_a_default_refuses_values_json_cannot_hold(tmp_path):
    """Manifests are written with default=None: a value their readers cannot parse is an error,
    not a string."""
    p = tmp_path / "manifest.json"
    with pytest.raises(TypeError):
        write_json_atomic(p, {"path": tmp_path}, default=None)
    assert not p.exists() and list(tmp_path.iterdir()) == []
