"""Tiny source datasets in the exact published on-disk layouts (see /work/shared/DATASETS.md), for
tests of the converters and of anything downstream. Each writer returns what it wrote (ids,
expected labels, the full-resolution grey pixels) so tests can compare against a numpy reference.

- `write_nih`: Data_Entry_2017_v2020.csv (11-field header) or Data_Entry_2017.csv (trailing
  empty column), PNGs under images_001/images/, images_002/images/ or a flat images/ (8-bit grey,
  one RGBA, one 16-bit), train_val_list.txt / test_list.txt (patient-wise); `write_xiao_splits`
  adds Xiao et al.'s train_official.txt / val_official.txt / test_official.txt.
- `write_chexpert`: CheXpert-v1.0-small/{train,valid}.csv + patientNNNNN/studyN/viewN_*.jpg.
- `write_mimic`: MIMIC-CXR as published (.dcm tree + chexpert / metadata / split CSVs), or with
  jpg=True MIMIC-CXR-JPG as published (.jpg tree + gzipped chexpert / negbio / metadata / split CSVs).
- `write_dicom`: MIMIC-CXR-style files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm (8-bit MONOCHROME2,
  12-bit windowed MONOCHROME2, 16-bit MONOCHROME1 with rescale + window) + a labels CSV.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NIH_LABELS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


@dataclass
class Written:
    root: Path
    ids: dict[str, list[str]] = field(default_factory=dict)  # split -> ids in order
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # split -> [N, C]
    pixels: dict[str, np.ndarray] = field(default_factory=dict)  # id -> full-res reference, float in 0..255
    files: dict[str, Path] = field(default_factory=dict)  # id -> file


def gray_pattern(rng: np.random.Generator, h: int, w: int, index: int) -> np.ndarray:
    """A uint8 [h, w] image with structure (gradient + blobs) and the index in its top-left block,
    so a misplaced image is visible."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 40 + 150 * (xx / w) * (0.5 + 0.5 * yy / h) + rng.normal(0, 20, (h, w))
    img[: h // 4, : w // 4] = (index * 37) % 256
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def block_mean(img: np.ndarray, size: int) -> np.ndarray:
    """Reference area resize when size divides the image: the mean of each block (float)."""
    h, w = img.shape
    return img.astype(np.float64).reshape(size, h // size, size, w // size).mean(axis=(1, 3))


# ----------------------------------------------------------------------------- NIH

NIH_ROWS = [  # (name, findings, patient); patients 1-3 train_val, 4-5 test
    ("00000001_000.png", "Cardiomegaly", 1),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1),
    ("00000002_000.png", "No Finding", 2),
    ("00000003_000.png", "Effusion|Mass|Nodule", 3),
    ("00000003_001.png", "Hernia", 3),
    ("00000004_000.png", "Pneumothorax", 4),
    ("00000004_001.png", "No Finding", 4),
    ("00000005_000.png", "Atelectasis|Infiltration|Pleural_Thickening", 5),
]
NIH_TEST_PATIENTS = {4, 5}
RGBA_NAME = "00000003_000.png"
SIXTEEN_BIT_NAME = "00000004_001.png"


def nih_labels(findings: str) -> np.ndarray:
    y = np.zeros(len(NIH_LABELS), np.float32)
    for f in findings.split("|"):
        if f != "No Finding":
            y[NIH_LABELS.index(f)] = 1
    return y


def write_nih(root, *, csv_version: str = "v2020", layout: str = "nested", side: int = 48,
              rows=NIH_ROWS, seed: int = 0) -> Written:
    """Write a tiny NIH ChestX-ray14 source folder; see the module docstring."""
    import cv2
    from PIL import Image
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = Written(root)
    for k, (name, findings, patient) in enumerate(rows):
        if layout == "flat":
            d = root / "images"
        else:  # the archive: images_001/images/ ... (two folders here)
            d = root / f"images_{1 + k % 2:03d}" / "images"
        d.mkdir(parents=True, exist_ok=True)
        g = gray_pattern(rng, side, side, k)
        path = d / name
        if name == RGBA_NAME:
            rgba = np.dstack([g, g, g, np.full_like(g, 255)])
            Image.fromarray(rgba, "RGBA").save(path)
            out.pixels[name] = g.astype(np.float64)
        elif name == SIXTEEN_BIT_NAME:
            g16 = np.minimum(g.astype(np.int64) * 257 + rng.integers(0, 200, g.shape), 65535).astype(np.uint16)
            assert cv2.imwrite(str(path), g16)
            out.pixels[name] = g16.astype(np.float64) * 255.0 / 65535.0
        else:
            Image.fromarray(g, "L").save(path)
            out.pixels[name] = g.astype(np.float64)
        out.files[name] = path
    fname = "Data_Entry_2017_v2020.csv" if csv_version == "v2020" else "Data_Entry_2017.csv"
    trail = "," if csv_version == "2017" else ""  # the original has a trailing empty column
    with open(root / fname, "w", newline="") as f:
        f.write(NIH_HEADER + trail + "\n")
        for k, (name, findings, patient) in enumerate(rows):
            f.write(f"{name},{findings},{name[9:12].lstrip('0') or 0},{patient},{40 + k},{'MF'[k % 2]},PA,"
                    f"2500,2048,0.143,0.143{trail}\n")
    train = [r for r in rows if r[2] not in NIH_TEST_PATIENTS]
    test = [r for r in rows if r[2] in NIH_TEST_PATIENTS]
    (root / "train_val_list.txt").write_text("".join(r[0] + "\n" for r in train))
    (root / "test_list.txt").write_text("".join(r[0] + "\n" for r in test))
    for split, rs in (("train", train), ("test", test)):
        out.ids[split] = [r[0] for r in rs]
        out.labels[split] = np.stack([nih_labels(r[1]) for r in rs])
    return out


def write_xiao_splits(split_dir, nih: Written) -> dict[str, list[str]]:
    """Xiao et al.'s split files: train_val cut into train (all but the last) and val (the last)."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    tv = nih.ids["train"]
    parts = {"train": tv[:-1], "val": tv[-1:], "test": nih.ids["test"]}
    lab = {i: y for s in ("train", "test") for i, y in zip(nih.ids[s], nih.labels[s])}
    for split, names in parts.items():
        lines = [n + " " + " ".join(str(int(v)) for v in lab[n]) for n in names]
        (split_dir / f"{split}_official.txt").write_text("\n".join(lines) + "\n")
    return parts


# ----------------------------------------------------------------------------- CheXpert

# (patient, study, view, frontal?, {label: cell}) ; unspecified cells are blank
CHEXPERT_TRAIN = [
    (1, 1, 1, True, {"Atelectasis": "-1.0", "Cardiomegaly": "-1.0", "Edema": "1.0", "No Finding": ""}),
    (1, 1, 2, False, {"Atelectasis": "1.0"}),  # lateral: dropped by --views frontal
    (2, 1, 1, True, {"Consolidation": "-1.0", "Pleural Effusion": "-1.0", "Edema": "-1.0"}),
    (2, 2, 1, True, {"No Finding": "1.0", "Atelectasis": "0.0", "Cardiomegaly": "0.0"}),
    (3, 1, 1, True, {"Cardiomegaly": "1.0", "Pleural Effusion": "1.0", "Support Devices": "1.0",
                     "Lung Opacity": "-1.0"}),
]
CHEXPERT_VALID = [
    (64541, 1, 1, True, {"Atelectasis": "1.0", "Cardiomegaly": "0.0", "Consolidation": "0.0",
                         "Edema": "0.0", "Pleural Effusion": "1.0"}),
    (64542, 1, 1, True, {"Atelectasis": "0.0", "Cardiomegaly": "1.0", "Consolidation": "1.0",
                         "Edema": "0.0", "Pleural Effusion": "0.0"}),
    (64542, 1, 2, False, {"Atelectasis": "0.0", "Cardiomegaly": "1.0", "Consolidation": "1.0",
                          "Edema": "0.0", "Pleural Effusion": "0.0"}),
]


def chexpert_path(release: str, split: str, patient: int, study: int, view: int, frontal: bool) -> str:
    return f"{release}/{split}/patient{patient:05d}/study{study}/view{view}_{'frontal' if frontal else 'lateral'}.jpg"


def write_chexpert(root, *, release: str = "CheXpert-v1.0-small", h: int = 40, w: int = 32,
                   train=CHEXPERT_TRAIN, valid=CHEXPERT_VALID, seed: int = 1) -> Written:
    """Write `root/<release>/{train,valid}.csv` and the JPEG tree; ids are the CSV Paths."""
    from PIL import Image
    root = Path(root)
    base = root / release
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = Written(root)
    for split, csv_name, rows in (("train", "train.csv", train), ("valid", "valid.csv", valid)):
        with open(base / csv_name, "w", newline="") as f:
            wr = csv.writer(f, lineterminator="\n")
            wr.writerow(CHEXPERT_COLUMNS)
            for k, (patient, study, view, frontal, cells) in enumerate(rows):
                p = chexpert_path(release, split, patient, study, view, frontal)
                file = root / p
                file.parent.mkdir(parents=True, exist_ok=True)
                g = gray_pattern(rng, h, w, k)
                Image.fromarray(g, "L").save(file, quality=95)
                out.pixels[p] = g.astype(np.float64)
                out.files[p] = file
                wr.writerow([p, "Female" if k % 2 else "Male", 50 + k, "Frontal" if frontal else "Lateral",
                             "AP" if frontal else ""] + [cells.get(c, "") for c in CHEXPERT_COLUMNS[5:]])
    return out


# ----------------------------------------------------------------------------- DICOM

def _dicom(path: Path, pixels: np.ndarray, *, bits_stored: int, photometric: str, slope=None, intercept=None,
           center=None, width=None, voi_function=None) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = path.parent.parent.name
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    alloc = 8 if bits_stored <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = alloc, bits_stored, bits_stored - 1, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    ds.PixelData = pixels.astype(np.uint8 if alloc == 8 else "<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def window_linear(x, c, w):
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)


DICOM_SPECS = [  # dicom_id, subject, study, split, labels
    ("d0000001-8bit-m2", 10000032, 50414267, "train", {"Atelectasis": "1.0", "Edema": "-1.0"}),
    ("d0000002-12bit-window", 10000032, 50414268, "train", {"Cardiomegaly": "-1.0", "Pleural Effusion": "1.0"}),
    ("d0000003-16bit-m1", 10000764, 57375967, "test", {"Consolidation": "1.0", "Atelectasis": "-1.0"}),
    ("d0000004-12bit-plain", 10000898, 50771383, "validate", {}),
]


def write_dicom(root, *, side: int = 32, seed: int = 2, id_column: str = "dicom_id") -> Written:
    """MIMIC-CXR-style tree + `labels.csv` (dicom_id or path column, split, CheXpert labels).

    Reference pixels (0..255 float, before resizing) are computed here from the stored values with
    the DICOM formulas, independently of the converter.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    out = Written(root)
    rows = []
    for k, (did, subject, study, split, cells) in enumerate(DICOM_SPECS):
        path = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{did}.dcm"
        base = gray_pattern(rng, side, side, k).astype(np.float64) / 255.0  # 0..1 "density"
        if k == 0:  # 8-bit MONOCHROME2, no window: min..max of the stored values
            stored = np.rint(base * 255).astype(np.uint8)
            _dicom(path, stored, bits_stored=8, photometric="MONOCHROME2")
            s = stored.astype(np.float64)
            ref = (s - s.min()) / (s.max() - s.min())
        elif k == 1:  # 12-bit MONOCHROME2 with a window
            stored = np.rint(base * 4095).astype(np.uint16)
            _dicom(path, stored, bits_stored=12, photometric="MONOCHROME2", center=2048, width=3000)
            ref = window_linear(stored.astype(np.float64), 2048, 3000)
        elif k == 2:  # 16-bit MONOCHROME1 with rescale slope/intercept and a window: high = dark
            stored = np.rint((1 - base) * 60000 + 1000).astype(np.uint16)
            _dicom(path, stored, bits_stored=16, photometric="MONOCHROME1", slope=0.5, intercept=-1024,
                   center=14000, width=28000)
            hu = stored.astype(np.float64) * 0.5 - 1024
            ref = 1.0 - window_linear(hu, 14000, 28000)
        else:  # 12-bit, no window: its own range
            stored = np.rint(base * 3000 + 500).astype(np.uint16)
            _dicom(path, stored, bits_stored=12, photometric="MONOCHROME2")
            s = stored.astype(np.float64)
            ref = (s - s.min()) / (s.max() - s.min())
        ident = did if id_column == "dicom_id" else str(path.relative_to(root))
        out.pixels[ident] = ref * 255.0
        out.files[ident] = path
        rows.append([ident, subject, study, split] + [cells.get(c, "") for c in CHEXPERT_COLUMNS[5:]])
    with open(root / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow([id_column, "subject_id", "study_id", "split"] + CHEXPERT_COLUMNS[5:])
        wr.writerows(rows)
    return out


# MIMIC-CXR's own CSVs, columns as published
MIMIC_LABEL_COLUMNS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                       "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                       "Pneumonia", "Pneumothorax", "Support Devices"]
MIMIC_METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                          "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                          "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
MIMIC_STUDIES = [  # subject, study, labels
    ("10000032", "50414267", {"Atelectasis": "-1.0", "Edema": "1.0"}),
    ("10000032", "53189527", {"No Finding": "1.0"}),
    ("10000764", "57375967", {"Pleural Effusion": "1.0", "Cardiomegaly": "-1.0"}),
]
MIMIC_IMAGES = [  # dicom_id, subject, study, view, split
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", "train"),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", "train"),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP", "validate"),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000764", "57375967", "PA", "test"),
]


def open_mimic_splits(out) -> tuple:
    """(train, val, test) of a pack of the MIMIC fixture, checked to hold exactly the frontal (PA / AP)
    images of each official split (validate -> val), in the metadata's order."""
    from fasttrain.data import open_packed
    frontal = {s: [d for d, _, _, v, sp in MIMIC_IMAGES if v in ("PA", "AP") and sp == s]
               for s in ("train", "validate", "test")}
    train, val, test = open_packed(out, "train"), open_packed(out, "val"), open_packed(out, "test")
    assert train.ids == frontal["train"] and val.ids == frontal["validate"] and test.ids == frontal["test"]
    return train, val, test


def write_mimic(root, *, side: int = 32, seed: int = 3, jpg: bool = False) -> Written:
    """MIMIC-CXR as published: files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm and the chexpert,
    metadata and split CSVs (8-bit MONOCHROME2 DICOMs; their pixels are tested elsewhere).

    jpg=True: MIMIC-CXR-JPG as published instead: the same tree with <dicom_id>.jpg (8-bit grey,
    quality 95) and the CSVs gzipped (`mimic-cxr-2.0.0-{chexpert,negbio,metadata,split}.csv.gz`);
    the negbio CSV has the chexpert columns with other values (Edema positive everywhere), so a
    test can tell which labeler was read. Reference pixels are then the stored grey (0..255)."""
    import gzip
    from PIL import Image
    root = Path(root)
    rng = np.random.default_rng(seed)
    out = Written(root)
    for k, (did, subject, study, view, split) in enumerate(MIMIC_IMAGES):
        path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{did}.{'jpg' if jpg else 'dcm'}"
        g = gray_pattern(rng, side, side, k)
        s = g.astype(np.float64)
        if jpg:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(g, "L").save(path, quality=95)
            out.pixels[did] = s
        else:
            _dicom(path, g, bits_stored=8, photometric="MONOCHROME2")
            out.pixels[did] = (s - s.min()) / (s.max() - s.min()) * 255.0
        out.files[did] = path

    def table(name: str, header: list, rows) -> None:
        opener = (lambda p: gzip.open(p.with_name(p.name + ".gz"), "wt", newline="")) if jpg else \
            (lambda p: open(p, "w", newline=""))
        with opener(root / name) as f:
            wr = csv.writer(f, lineterminator="\n")
            wr.writerow(header)
            wr.writerows(rows)

    table("mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id"] + MIMIC_LABEL_COLUMNS,
          [[subject, study] + [cells.get(c, "") for c in MIMIC_LABEL_COLUMNS] for subject, study, cells in MIMIC_STUDIES])
    if jpg:
        table("mimic-cxr-2.0.0-negbio.csv", ["subject_id", "study_id"] + MIMIC_LABEL_COLUMNS,
              [[subject, study] + [{**cells, "Edema": "1.0"}.get(c, "") for c in MIMIC_LABEL_COLUMNS]
               for subject, study, cells in MIMIC_STUDIES])
    table("mimic-cxr-2.0.0-metadata.csv", MIMIC_METADATA_COLUMNS,
          [[did, subject, study, "CHEST (PA AND LAT)", view, side, side, 21800506, 213014.531,
            "CHEST (PA AND LAT)", "postero-anterior" if view == "PA" else "lateral", "Erect"]
           for did, subject, study, view, _ in MIMIC_IMAGES])
    table("mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
          [[did, study, subject, split] for did, subject, study, _, split in MIMIC_IMAGES])
    return out
