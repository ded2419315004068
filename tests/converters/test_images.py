"""`fasttrain convert images`: any folder of images + a labels CSV, on fixtures in the published
PadChest layout (16-bit PNGs in numbered folders the CSV does not name, a Python-list `Labels`
column) and VinDr-CXR layout (DICOM `<image_id>.dicom`, one 0/1 column per label, three readers'
rows per training image, a separate test CSV); NIH-style `|`-joined findings with a split column;
and every bad-input error, raised before decoding."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fasttrain.converters.common import ConvertError
from fasttrain.converters.decode import decode_file
from fasttrain.converters.images import convert_images
from fasttrain.format.packed import open_packed, read_manifest

SIDE, SIZE = 32, 16
PADCHEST_COLUMNS = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                    "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Labels"]
# (image id, folder, patient, labels cell as PadChest writes it)
PADCHEST_ROWS = [
    ("216840111366964012283393834152009033102258826_4s6vlf.png", "0", "p1", "['normal']"),
    ("216840111366964012819207061112010307142602253_04-014-084.png", "0", "p1", "['pleural effusion', ' cardiomegaly']"),
    ("216840111366964012959786098432011033083840143_00-176-115.png", "1", "p2", "['cardiomegaly']"),
    ("216840111366964012339356563862009072111404053_00-043-192.png", "1", "p3", "['pneumonia', 'pleural effusion']"),
    ("216840111366964012558082906712009300162151055_00-078-079.png", "2", "p4", "['normal']"),
    ("216840111366964012989926673512011083134050913_00-168-009.png", "2", "p5", "['cardiomegaly', 'pneumonia']"),
]
VINDR_LABELS = ["Aortic enlargement", "Cardiomegaly", "Pleural effusion", "Nodule/Mass", "No finding"]


def write_padchest(gray_pattern, root: Path) -> dict:
    """16-bit PNGs under <ImageDir>/<ImageID> + the labels CSV (PadChest's published columns)."""
    import cv2
    rng = np.random.default_rng(0)
    ref = {}
    for k, (iid, d, pat, _) in enumerate(PADCHEST_ROWS):
        g = gray_pattern(rng, SIDE, SIDE, k)
        g16 = (g.astype(np.uint16) * 257)  # full 16-bit range: decodes back to g exactly
        (root / d).mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / d / iid), g16)
        ref[iid] = g.astype(np.float64)
    with open(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PADCHEST_COLUMNS)
        for iid, d, pat, labels in PADCHEST_ROWS:
            w.writerow([iid, d, "20090101", "s" + iid[:6], pat, "1950", "M", "PA", "PA", "Manual review", labels])
    return ref


def write_vindr(gray_pattern, write_dicom_file, root: Path) -> dict:
    """train/<image_id>.dicom (3 readers' rows each) and test/<image_id>.dicom (one consensus row)."""
    rng = np.random.default_rng(1)
    ref = {}
    truth = {}
    rows_train, rows_test = [], []
    for k in range(6):
        split = "train" if k < 4 else "test"
        iid = f"{k:03d}ab{k * 7919:08x}"
        g = gray_pattern(rng, SIDE, SIDE, k)
        write_dicom_file(root / split / f"{iid}.dicom", g, bits_stored=8, photometric="MONOCHROME2")
        ref[iid] = g
        y = np.zeros(len(VINDR_LABELS), np.float32)
        y[k % 4] = 1
        if split == "train":
            votes = [y.copy(), y.copy(), np.zeros_like(y)]  # 2 of 3 readers agree
            votes[2][4] = 1  # the third reader says "No finding"
            for r, v in enumerate(votes):
                rows_train.append([iid, f"R{r + 1}"] + [str(int(x)) for x in v])
            truth[iid] = (y, np.maximum(y, votes[2]))  # (majority, any)
        else:
            rows_test.append([iid] + [str(int(x)) for x in y])
            truth[iid] = (y, y)
    ann = root / "annotations"
    ann.mkdir(parents=True)
    for name, header, rows in (("image_labels_train.csv", ["image_id", "rad_ID"], rows_train),
                               ("image_labels_test.csv", ["image_id"], rows_test)):
        with open(ann / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header + VINDR_LABELS)
            w.writerows(rows)
    return {"ref": ref, "truth": truth}


def test_padchest_layout_16bit_png_list_labels_patient_disjoint(tmp_path, gray_pattern, block_mean):
    src = tmp_path / "padchest"
    ref = write_padchest(gray_pattern, src)
    csv_path = src / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    names = ["cardiomegaly", "pleural effusion", "pneumonia"]
    out = convert_images(src, csv_path, tmp_path / "packed", path_col="ImageID", multi_col="Labels",
                         label_cols=names, none_values=["normal"], patient_col="PatientID", test_fraction=0.3,
                         size=SIZE, workers=1, progress=False, dataset="padchest")
    m = read_manifest(out)
    assert m["label_names"] == names and m["dataset"] == "padchest"
    assert m["images"]["multi_col"] == "Labels" and m["skipped"] == []
    patients = {iid: pat for iid, _, pat, _ in PADCHEST_ROWS}
    seen = set()
    for split in ("train", "test"):
        ps = open_packed(out, split, "raw")
        for i, iid in enumerate(ps.ids):
            seen.add(iid)
            # 16-bit full-range PNG -> the 8-bit image it was made from, area-resized
            np.testing.assert_allclose(ps.image(i), block_mean(ref[iid], SIZE), atol=1.0)
            row = next(r for r in PADCHEST_ROWS if r[0] == iid)
            want = [float(n in row[3]) for n in names]
            assert ps.labels[i].tolist() == want, iid
        if split == "test":
            test_patients = {patients[i] for i in ps.ids}
    train_patients = {patients[i] for i in open_packed(out, "train", "raw").ids}
    assert seen == set(ref) and not (train_patients & test_patients)  # patient-disjoint


def test_padchest_names_discovered_and_unlisted_values(tmp_path, gray_pattern):
    src = tmp_path / "padchest"
    write_padchest(gray_pattern, src)
    csv_path = src / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    out = convert_images(src, csv_path, tmp_path / "a", path_col="ImageID", multi_col="Labels",
                         none_values=["normal"], size=SIZE, workers=1, progress=False)
    assert read_manifest(out)["label_names"] == ["cardiomegaly", "pleural effusion", "pneumonia"]
    with pytest.raises(ConvertError, match=r"row 5: column 'Labels' has 'pneumonia', which is not a declared label"):
        convert_images(src, csv_path, tmp_path / "b", path_col="ImageID", multi_col="Labels",
                       label_cols=["cardiomegaly", "pleural effusion"], none_values=["normal"], size=SIZE,
                       workers=1, progress=False)
    out = convert_images(src, csv_path, tmp_path / "c", path_col="ImageID", multi_col="Labels",
                         label_cols=["cardiomegaly"], none_values=["normal"], unlisted="ignore", size=SIZE,
                         workers=1, progress=False)
    assert open_packed(out, "train", "raw").labels[:, 0].tolist() == [0, 1, 1, 0, 0, 1]
    out = convert_images(src, csv_path, tmp_path / "d", path_col="ImageID", multi_col="Labels",
                         none_values=["normal"], keep={"PatientID": ["P1", "p3"]}, size=SIZE, workers=1, progress=False)
    assert open_packed(out, "train", "raw").count == 3 and read_manifest(out)["images"]["rows_left_out"] == 3


@pytest.mark.parametrize("merge", ["majority", "any"])
def test_vindr_layout_dicom_reader_rows_and_split_csvs(tmp_path, merge, gray_pattern, write_dicom_file, block_mean):
    src = tmp_path / "vindr"
    fx = write_vindr(gray_pattern, write_dicom_file, src)
    out = convert_images(src, [f"train={src}/annotations/image_labels_train.csv",
                               f"test={src}/annotations/image_labels_test.csv"], tmp_path / "packed",
                         path_col="image_id", path_suffix=".dicom", label_cols=VINDR_LABELS, merge_rows=merge,
                         val_fraction=0.25, size=SIZE, workers=1, progress=False, dataset="vindr-cxr")
    m = read_manifest(out)
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 3, "val": 1, "test": 2}
    for split in ("train", "val", "test"):
        ps = open_packed(out, split, "raw")
        for i, iid in enumerate(ps.ids):
            majority, any_ = fx["truth"][iid]
            assert ps.labels[i].tolist() == (majority if merge == "majority" else any_).tolist()
            # DICOM, 8-bit, no window: its own min..max, then the shared resize
            folder = "test" if split == "test" else "train"
            assert np.array_equal(ps.image(i), decode_file(str(src / folder / f"{iid}.dicom"), SIZE))
            g = fx["ref"][iid].astype(np.float64)
            want = block_mean((g - g.min()) / (g.max() - g.min()) * 255, SIZE)
            np.testing.assert_allclose(ps.image(i), want, atol=1.0)
    with pytest.raises(ConvertError, match=r"image_labels_train.csv row 3: '000ab00000000' again \(first at "
                                           r"image_labels_train.csv row 2\).*--merge-rows"):
        convert_images(src, [f"train={src}/annotations/image_labels_train.csv"], tmp_path / "dup",
                       path_col="image_id", path_suffix=".dicom", label_cols=VINDR_LABELS, size=SIZE, workers=1,
                       progress=False)


def _nih_like(gray_pattern, src: Path, rows: list[list[str]],
              header=("file", "Finding Labels", "split", "patient")) -> Path:
    from PIL import Image
    rng = np.random.default_rng(2)
    (src / "img").mkdir(parents=True)
    for k in range(4):
        Image.fromarray(gray_pattern(rng, SIDE, SIDE, k), "L").save(src / "img" / f"{k}.png")
    with open(src / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return src / "labels.csv"


def test_multi_col_with_sep_and_split_col(tmp_path, gray_pattern):
    src = tmp_path / "s"
    p = _nih_like(gray_pattern, src, [["img/0.png", "Mass|Effusion", "train", "a"],
                                      ["img/1.png", "No Finding", "Training", "b"],
                                      ["img/2.png", "Effusion", "validation", "c"], ["img/3.png", "Mass", "TEST", "d"]])
    out = convert_images(src, p, tmp_path / "o", path_col="file", multi_col="Finding Labels", split_col="split",
                         size=SIZE, workers=1, progress=False)
    m = read_manifest(out)
    assert m["label_names"] == ["Effusion", "Mass"]
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert open_packed(out, "train", "raw").labels.tolist() == [[1, 1], [0, 0]]


def test_boolean_and_uncertain_columns(tmp_path, gray_pattern):
    src = tmp_path / "s"
    p = _nih_like(gray_pattern, src, [["img/0.png", "TRUE", "-1", ""], ["img/1.png", "false", "1.0", "0"],
                                      ["img/2.png", "True", "", "1"], ["img/3.png", "no", "0", "-1"]],
                  header=("path", "Effusion", "Edema", "Mass"))
    out = convert_images(src, p, tmp_path / "o", path_col="path", label_cols=["Effusion", "Edema", "Mass"],
                         uncertain=["-1"], uncertain_as="ignore", blank="zeros", size=SIZE, workers=1, progress=False)
    y = open_packed(out, "train", "raw").labels
    np.testing.assert_array_equal(y, np.array([[1, np.nan, 0], [0, 1, 0], [1, 0, 1], [0, 0, np.nan]], np.float32))


def test_bad_input_errors_before_any_decoding(tmp_path, monkeypatch, gray_pattern):
    import fasttrain.converters.images as images_mod
    src = tmp_path / "s"
    p = _nih_like(gray_pattern, src, [["img/0.png", "1", "0", "a"], ["img/1.png", "maybe", "0", "b"],
                                      ["img/9.png", "0", "1", "c"], ["img/8.png", "0", "1", "d"],
                                      ["img/3.png", "0", "1", "e"]],
                  header=("file", "Mass", "Edema", "patient"))

    def no_decode(*a, **k):
        raise AssertionError("decoded before the CSV checks finished")
    monkeypatch.setattr(images_mod, "decode_file", no_decode)
    kw = dict(size=SIZE, workers=1, progress=False)
    with pytest.raises(ConvertError, match=r"labels.csv: missing column\(s\) \['Effusion'\]; found \['file', 'Mass', "
                                           r"'Edema', 'patient'\]"):
        convert_images(src, p, tmp_path / "o", path_col="file", label_cols=["Mass", "Effusion"], **kw)
    with pytest.raises(ConvertError, match=r"missing column\(s\) \['Image'\]"):
        convert_images(src, p, tmp_path / "o", path_col="Image", label_cols=["Mass"], **kw)
    with pytest.raises(ConvertError, match=r"labels.csv row 3: column 'Mass' has 'maybe', outside the declared values"):
        convert_images(src, p, tmp_path / "o", path_col="file", label_cols=["Mass", "Edema"], **kw)
    p.write_text(p.read_text().replace("maybe", "1"))
    with pytest.raises(ConvertError, match=r"2 image\(s\) named in column 'file' do not exist under .*"
                                           r"labels.csv row 4: img/9.png not found; labels.csv row 5: img/8.png"):
        convert_images(src, p, tmp_path / "o", path_col="file", label_cols=["Mass", "Edema"], **kw)
    with pytest.raises(ConvertError, match="--label-cols A,B,C"):
        convert_images(src, p, tmp_path / "o", path_col="file", **kw)
    with pytest.raises(ConvertError, match=r"both --positive and --negative"):
        convert_images(src, p, tmp_path / "o", path_col="file", label_cols=["Mass"], negative=["0", "1"], **kw)
    with pytest.raises(ConvertError, match=r"--test-fraction must be in \(0, 1\)"):
        convert_images(src, p, tmp_path / "o", path_col="file", label_cols=["Mass"], test_fraction=1.5,
                       on_error="skip", **kw)
    assert not (tmp_path / "o").exists()


def test_skip_lists_missing_files_in_manifest_and_cli(tmp_path, gray_pattern):
    from fasttrain.converters.cli import main
    src = tmp_path / "s"
    p = _nih_like(gray_pattern, src, [["img/0.png", "1", "a"], ["img/1.png", "0", "b"], ["img/7.png", "1", "c"]],
                  header=("file", "Mass", "patient"))
    rc = main(["images", "--src", str(src), "--labels-csv", str(p), "--out", str(tmp_path / "o"), "--path-col", "file",
               "--label-cols", "Mass", "--size", str(SIZE), "--workers", "1", "--on-error", "skip", "--no-progress"])
    assert rc == 0
    m = read_manifest(tmp_path / "o")
    assert m["splits"]["train"]["count"] == 2
    assert [s["id"] for s in m["skipped"]] == ["img/7.png"] and "row 4" in m["skipped"][0]["reason"]
    rc = main(["images", "--src", str(src), "--labels-csv", str(p), "--out", str(tmp_path / "o2"), "--path-col", "nope",
               "--label-cols", "Mass", "--no-progress"])
    assert rc == 1


def test_same_pixels_and_labels_as_the_nih_converter(tmp_path, write_nih):
    """One shared path: NIH's published layout packed by `convert images` (name lookup into
    images_NNN/images/, the multi-valued Finding Labels) equals `convert nih`, byte for byte."""
    from fasttrain.converters.nih import NIH_LABELS, convert_nih
    src = tmp_path / "nih"
    write_nih(src)  # 8-bit grey, one RGBA, one 16-bit PNG, nested folders
    a = convert_nih(src, tmp_path / "a", size=SIZE, workers=1, progress=False)
    b = convert_images(src, [f"train={src}/Data_Entry_2017_v2020.csv"], tmp_path / "b", path_col="Image Index",
                       multi_col="Finding Labels", label_cols=NIH_LABELS, patient_col="Patient ID", size=SIZE,
                       workers=1, progress=False)
    na = open_packed(a, "train", "raw")
    nb = open_packed(b, "train", "raw")
    ta = open_packed(a, "test", "raw")
    ids = na.ids + ta.ids
    pos = {i: k for k, i in enumerate(nb.ids)}
    assert sorted(ids) == sorted(nb.ids)
    for split in (na, ta):
        for k, i in enumerate(split.ids):
            assert np.array_equal(split.image(k), nb.image(pos[i])), i
            assert np.array_equal(split.labels[k], nb.labels[pos[i]]), i
