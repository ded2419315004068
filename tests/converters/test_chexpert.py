"""The CheXpert converter on a source in the published layout: label policies exactly, Path
resolution, frontal filter, pixels against the area-resize reference, bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from fasttrain.converters.chexpert import COMPETITION, convert_chexpert, map_labels
from fasttrain.converters.common import ConvertError
from fasttrain.converters.decode import decode_raster
from fasttrain.data import open_packed
from fasttrain.format.packed import read_manifest


N = math.nan


def cx(src, out, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("size", 16)
    return convert_chexpert(src, out, **kw)


# competition label order: Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion
EXPECTED_TRAIN = {  # frontal rows of CHEXPERT_TRAIN, per policy
    "paper": [[1, 0, 0, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]],
    "ones": [[1, 1, 0, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]],
    "zeros": [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]],
    "ignore": [[N, N, 0, 1, 0], [0, 0, N, N, N], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]],
}


@pytest.mark.parametrize("policy", ["paper", "ones", "zeros", "ignore"])
def test_chexpert_policies(tmp_path, policy, write_chexpert, chexpert_path):
    write_chexpert(tmp_path)
    out = cx(tmp_path, tmp_path / "out", uncertain=policy)  # src = the parent of CheXpert-v1.0-small
    ps = open_packed(out, "train")
    assert ps.label_names == COMPETITION
    np.testing.assert_array_equal(ps.labels, np.array(EXPECTED_TRAIN[policy], np.float32))
    assert ps.ids == [chexpert_path("CheXpert-v1.0-small", "train", p, s, v, True)
                      for p, s, v in ((1, 1, 1), (2, 1, 1), (2, 2, 1), (3, 1, 1))]
    test = open_packed(out, "test")  # valid.csv, frontal only
    np.testing.assert_array_equal(test.labels, [[1, 0, 0, 0, 1], [0, 1, 1, 0, 0]])
    m = json.loads((out / "manifest.json").read_text())
    assert m["chexpert"]["uncertain"] == policy and set(m["source_sha256"]) == {"train.csv", "valid.csv"}
    if policy == "ignore":
        assert m["splits"]["train"]["ignored_labels"] == 5


def test_chexpert_all_labels_all_views_and_pixels(tmp_path, write_chexpert, block_mean, chexpert_columns):
    w = write_chexpert(tmp_path, h=48, w=32)
    # src = the release folder itself; all 14 labels; lateral views kept
    out = cx(tmp_path / "CheXpert-v1.0-small", tmp_path / "out", labels="all", views="all", formats=("raw", "dali"))
    ps = open_packed(out, "train")
    assert ps.label_names == chexpert_columns[5:] and len(ps) == 5
    row0 = dict(zip(ps.label_names, ps.labels[0]))
    # paper policy beyond the competition labels: U-Zeros except Atelectasis / Edema
    assert row0["Atelectasis"] == 1 and row0["Cardiomegaly"] == 0 and row0["Edema"] == 1
    assert row0["No Finding"] == 0  # blank -> 0
    assert dict(zip(ps.label_names, ps.labels[4]))["Lung Opacity"] == 0
    assert dict(zip(ps.label_names, ps.labels[4]))["Support Devices"] == 1
    assert ps.ids[1].endswith("view2_lateral.jpg")
    assert read_manifest(out)["resize"] == "crop"  # convert chexpert's default: portrait frames undistorted
    for i, ident in enumerate(ps.ids):  # non-square 48x32 JPEG -> centre 32x32 -> 16x16
        # row i is image i as decode_raster makes it (DCT-scaled to 24x16, centre 16x16) ...
        np.testing.assert_array_equal(ps.image(i), decode_raster(str(w.files[ident]), 16, "crop"))
        # ... close to the 2x2 block means of the full decode's centre square; on these tiny, very noisy
        # images (white noise sigma 20 at 48 px) the half-scale IDCT's low-pass differs more from a box
        # filter than on real sizes, where the bound is 1 grey level (test_decode.py)
        ref = block_mean(np.asarray(Image.open(w.files[ident]).convert("L"), np.float64)[8:40], 16)
        assert np.abs(ps.image(i).astype(float) - ref).mean() <= 3.0
        dali = open_packed(out, "train", "dali").image(i).astype(float)
        assert np.abs(dali - ps.image(i)).mean() < 2.0


def test_chexpert_full_release_prefix(tmp_path, write_chexpert):
    write_chexpert(tmp_path, release="CheXpert-v1.0")
    out = cx(tmp_path, tmp_path / "out")
    assert open_packed(out, "train").ids[0].startswith("CheXpert-v1.0/train/patient00001/")


def test_map_labels_rejects_bad_values():
    row = {c: "" for c in COMPETITION}
    row["Edema"] = "2.0"
    with pytest.raises(ConvertError, match=r"train.csv row 7: column 'Edema' has '2.0'"):
        map_labels(row, COMPETITION, "paper", "train.csv row 7")


@pytest.mark.parametrize("case,match", [
    ("missing_image", r"train.csv row 4: image .*patient00002/study1/view1_frontal.jpg not found"),
    ("bad_value", r"valid.csv row 3: column 'Cardiomegaly' has 'yes'"),
    ("missing_column", r"valid.csv: missing column\(s\) \['Edema'\]"),
    ("no_csv", r"no train.csv / valid.csv"),
])
def test_chexpert_bad_input(tmp_path, case, match, write_chexpert, chexpert_path, chexpert_columns):
    w = write_chexpert(tmp_path)
    base = tmp_path / "CheXpert-v1.0-small"
    if case == "missing_image":
        w.files[chexpert_path("CheXpert-v1.0-small", "train", 2, 1, 1, True)].unlink()
    elif case == "bad_value":
        text = (base / "valid.csv").read_text().splitlines()
        cells = text[2].split(",")
        cells[chexpert_columns.index("Cardiomegaly")] = "yes"
        text[2] = ",".join(cells)
        (base / "valid.csv").write_text("\n".join(text) + "\n")
    elif case == "missing_column":
        (base / "valid.csv").write_text((base / "valid.csv").read_text().replace(",Edema,", ",Oedema,", 1))
    elif case == "no_csv":
        (base / "train.csv").unlink()
        (base / "valid.csv").unlink()
    with pytest.raises(ConvertError, match=match):
        cx(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
