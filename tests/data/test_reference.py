"""export_png: every packed image as a PNG named after its id, each written atomically."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fasttrain.data.reference import export_png, png_name


class _Packed:
    def __init__(self, images):
        self.images = images
        self.ids = [f"p{i}/img{i}.png" for i in range(len(images))]

    def image(self, i):
        return self.images[i]


def test_export_png_writes_every_image_and_no_temp_file(tmp_path):
    rng = np.random.default_rng(0)
    packed = _Packed([rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)])
    out = export_png(packed, tmp_path / "png")
    assert sorted(p.name for p in out.iterdir()) == sorted(png_name(s) for s in packed.ids)
    for sid, img in zip(packed.ids, packed.images):
        assert np.array_equal(np.asarray(Image.open(out / png_name(sid))), img)


def test_a_failed_export_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    packed = _Packed([np.zeros((8, 8), np.uint8)])
    export_png(packed, tmp_path)
    before = (tmp_path / png_name(packed.ids[0])).read_bytes()

    def half_written(self, f, **kw):
        f.write(b"\x89PNG half")
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        export_png(packed, tmp_path)
    assert (tmp_path / png_name(packed.ids[0])).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [png_name(packed.ids[0])]
