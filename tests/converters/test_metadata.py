"""Per-image metadata (patient, sex, age, view) through every converter into
`open_packed(...).metadata`, the convert-time view filters, and the synthetic subgroup effect."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from fasttrain.converters.chexpert import convert_chexpert
from fasttrain.converters.cli import main
from fasttrain.converters.common import ConvertError, parse_age, parse_sex, parse_view
from fasttrain.converters.dicom import convert_mimic_jpg
from fasttrain.converters.images import convert_images
from fasttrain.converters.nih import convert_nih
from fasttrain.converters.synthetic import FEMALE_SIGN_CONTRAST, draw_phantom
from fasttrain.data.mixture import open_mixture
from fasttrain.format.packed import open_packed

OPTS = dict(size=16, workers=0, progress=False)


def _as_list(a: np.ndarray) -> list:
    return [None if (isinstance(v, float) and math.isnan(v)) else v for v in a.tolist()]


def test_parsers_cover_the_sources_spellings():
    assert [parse_sex(v) for v in ("M", "f", "Male", "FEMALE", "", "O", "Unknown")] == ["M", "F", "M", "F", None,
                                                                                      None, None]
    assert parse_age("58") == 58.0 and parse_age("058Y") == 58.0 and parse_age("006M") == 0.5
    assert parse_age("") is None and parse_age("n/a") is None and parse_age("-3") is None and parse_age("412") is None
    assert parse_view(" pa ") == "PA" and parse_view("AP supine") == "AP_SUPINE" and parse_view("") is None


def test_nih_metadata_follows_the_split_order(tmp_path, write_nih):
    src = write_nih(tmp_path / "src")
    out = convert_nih(src.root, tmp_path / "packed", **OPTS)
    with open(src.root / "Data_Entry_2017_v2020.csv", newline="") as f:
        rows = {r["Image Index"]: r for r in csv.DictReader(f)}
    for split in ("train", "test"):
        ps = open_packed(out, split)
        meta = ps.metadata
        assert set(meta) == {"patient", "sex", "age", "view"}
        assert meta["patient"].tolist() == [rows[i]["Patient ID"] for i in ps.ids]
        assert meta["sex"].tolist() == [rows[i]["Patient Gender"] for i in ps.ids]
        assert meta["age"].dtype == np.float64
        assert meta["age"].tolist() == [float(rows[i]["Patient Age"]) for i in ps.ids]
        assert meta["view"].tolist() == [rows[i]["View Position"] for i in ps.ids]
    # every fixture row is PA: a filter keeping AP only leaves nothing, which is an error naming the split
    with pytest.raises(ConvertError, match="split 'train' is empty"):
        convert_nih(src.root, tmp_path / "ap", views="AP", **OPTS)
    assert open_packed(convert_nih(src.root, tmp_path / "pa", views="PA", **OPTS), "train").count == \
        open_packed(out, "train").count


def test_chexpert_metadata_and_view_lists(tmp_path, write_chexpert):
    src = write_chexpert(tmp_path / "src")
    out = convert_chexpert(src.root, tmp_path / "all", views="all", **OPTS)
    base = src.root / "CheXpert-v1.0-small"
    rows = {}
    for name in ("train.csv", "valid.csv"):
        with open(base / name, newline="") as f:
            rows.update({r["Path"]: r for r in csv.DictReader(f)})
    for split in ("train", "test"):
        ps = open_packed(out, split)
        m = ps.metadata
        assert m["sex"].tolist() == [{"Male": "M", "Female": "F"}[rows[i]["Sex"]] for i in ps.ids]
        assert m["age"].tolist() == [float(rows[i]["Age"]) for i in ps.ids]
        assert m["view"].tolist() == [rows[i]["AP/PA"] if rows[i]["Frontal/Lateral"] == "Frontal" else "LATERAL"
                                      for i in ps.ids]
        assert m["patient"].tolist() == [i.split("/")[2] for i in ps.ids]
    lat = convert_chexpert(src.root, tmp_path / "lat", views="LATERAL", **OPTS)
    ids = open_packed(lat, "train").ids + open_packed(lat, "test").ids
    assert ids and all(i.endswith("_lateral.jpg") for i in ids)
    assert set(open_packed(lat, "train").metadata["view"]) == {"LATERAL"}
    with pytest.raises(ConvertError, match="no view names"):
        convert_chexpert(src.root, tmp_path / "bad", views=",", **OPTS)


def test_mimic_view_and_demographics_csv(tmp_path, write_mimic, mimic_images):
    src = write_mimic(tmp_path / "src", jpg=True)
    demo = tmp_path / "patients.csv"
    demo.write_text("subject_id,gender,anchor_age,anchor_year\n10000032,F,52,2180\n10000764,M,,2132\n")
    out = convert_mimic_jpg(src.root, tmp_path / "packed", views="all", demographics_csv=demo, **OPTS)
    views = {d: v for d, _, _, v, _ in mimic_images}
    ps = open_packed(out, "train")
    m = ps.metadata
    assert m["view"].tolist() == [views[i] for i in ps.ids]
    assert m["sex"].tolist() == ["F"] * len(ps.ids)
    test = open_packed(out, "test").metadata
    assert test["sex"].tolist() == ["M"] and np.isnan(test["age"]).all()  # blank anchor_age: missing
    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,height\n1,170\n")
    with pytest.raises(ConvertError, match="bad.csv: --demographics-csv needs a sex column"):
        convert_mimic_jpg(src.root, tmp_path / "p2", demographics_csv=bad, **OPTS)
    pa = convert_mimic_jpg(src.root, tmp_path / "pa", views="PA", **OPTS)
    assert set(open_packed(pa, "train").metadata["view"]) == {"PA"}


def test_images_meta_cols(tmp_path, gray_pattern):
    src = tmp_path / "s"
    (src / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [["img/0.png", "Mass", "a", "M", "61", "PA"], ["img/1.png", "No Finding", "b", "F", "", "AP"],
            ["img/2.png", "Mass", "c", "", "33", "LL"]]
    for k in range(3):
        Image.fromarray(gray_pattern(rng, 16, 16, k), "L").save(src / "img" / f"{k}.png")
    with open(src / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "Finding Labels", "patient", "PatientSex", "PatientAge", "ViewPosition"])
        w.writerows(rows)
    out = convert_images(src, src / "labels.csv", tmp_path / "o", path_col="file", multi_col="Finding Labels",
                         patient_col="patient", meta_cols={"sex": "PatientSex", "age": "PatientAge",
                                                           "view": "ViewPosition"}, **OPTS)
    m = open_packed(out, "train").metadata
    assert m["sex"].tolist() == ["M", "F", None]
    assert _as_list(m["age"]) == [61.0, None, 33.0]
    assert m["view"].tolist() == ["PA", "AP", "LL"] and m["patient"].tolist() == ["a", "b", "c"]
    with pytest.raises(ConvertError, match=r"--meta-cols: unknown metadata name\(s\) \['race'\]"):
        convert_images(src, src / "labels.csv", tmp_path / "o2", path_col="file", multi_col="Finding Labels",
                       meta_cols={"race": "PatientSex"}, **OPTS)
    with pytest.raises(ConvertError, match="missing column"):
        convert_images(src, src / "labels.csv", tmp_path / "o3", path_col="file", multi_col="Finding Labels",
                       meta_cols={"sex": "Gender"}, **OPTS)


def test_old_packs_without_metadata_still_open(tmp_path, write_nih):
    src = write_nih(tmp_path / "src")
    out = convert_nih(src.root, tmp_path / "packed", **OPTS)
    mpath = out / "manifest.json"
    m = json.loads(mpath.read_text())
    for s in m["splits"].values():  # a dataset packed before metadata existed
        s.pop("metadata")
        s.pop("metadata_missing")
    mpath.write_text(json.dumps(m))
    assert open_packed(out, "train").metadata == {}
    assert open_mixture([str(out)], "train", None).metadata == {}


def test_mixture_metadata_concatenates_parts_and_fills_missing(tmp_path, write_nih):
    src = write_nih(tmp_path / "src")
    a = convert_nih(src.root, tmp_path / "a", **OPTS)
    b = convert_nih(src.root, tmp_path / "b", **OPTS)
    m = json.loads((b / "manifest.json").read_text())
    for s in m["splits"].values():
        s.pop("metadata")
    (b / "manifest.json").write_text(json.dumps(m))
    mix = open_mixture([str(a), str(b)], "train", None)
    n = open_packed(a, "train").count
    assert len(mix.metadata["sex"]) == 2 * n
    assert mix.metadata["sex"][:n].tolist() == open_packed(a, "train").metadata["sex"].tolist()
    assert mix.metadata["sex"][n:].tolist() == [None] * n and np.isnan(mix.metadata["age"][n:]).all()


def test_synthetic_subgroup_effect_scales_the_signs():
    # contrast 0 draws the anatomy alone (same random stream): the signs are the difference
    idx = next(i for i in range(50) if draw_phantom(5, i, 64).labels.sum() >= 2)
    base = draw_phantom(5, idx, 64, 0.0).image.astype(float)
    full = np.abs(draw_phantom(5, idx, 64, 1.0).image.astype(float) - base).sum()
    faint = np.abs(draw_phantom(5, idx, 64, FEMALE_SIGN_CONTRAST).image.astype(float) - base).sum()
    assert full > 0 and faint / full == pytest.approx(FEMALE_SIGN_CONTRAST, abs=0.1)
    assert np.array_equal(draw_phantom(5, idx, 64).image, draw_phantom(5, idx, 64, 1.0).image)


def test_cli_flags_reach_the_converters(tmp_path, capsys, write_nih, gray_pattern):
    src = write_nih(tmp_path / "src")
    assert main(["nih", "--src", str(src.root), "--out", str(tmp_path / "pa"), "--size", "16", "--workers", "0",
                 "--no-progress", "--views", "PA"]) == 0
    assert set(open_packed(tmp_path / "pa", "train").metadata["view"]) == {"PA"}
    assert json.loads((tmp_path / "pa" / "manifest.json").read_text())["nih"]["views"] == ["PA"]
    img = tmp_path / "img"
    (img / "i").mkdir(parents=True)
    Image.fromarray(gray_pattern(np.random.default_rng(0), 16, 16, 0), "L").save(img / "i" / "0.png")
    (img / "l.csv").write_text("file,Mass,Gender\ni/0.png,1,Female\n")
    assert main(["images", "--src", str(img), "--labels-csv", str(img / "l.csv"), "--out", str(tmp_path / "o"),
                 "--path-col", "file", "--label-cols", "Mass", "--meta-cols", "sex=Gender", "--size", "16",
                 "--workers", "0", "--no-progress"]) == 0
    assert open_packed(tmp_path / "o", "train").metadata["sex"].tolist() == ["F"]
    assert main(["images", "--src", str(img), "--labels-csv", str(img / "l.csv"), "--out", str(tmp_path / "o2"),
                 "--path-col", "file", "--label-cols", "Mass", "--meta-cols", "sex", "--size", "16"]) == 1
    assert "--meta-cols 'sex': expected NAME=COLUMN" in capsys.readouterr().err
