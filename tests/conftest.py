"""Fixtures every test folder shares, each a plain function or value that tests ask for by name.

- Tiny runs: `tiny_yaml` (a CPU-sized run config as YAML text), `packed_phantoms` (SYNTHETIC
  phantoms packed raw by the real converter), `free_port`.
- Source datasets in the exact published on-disk layouts (see /work/shared/DATASETS.md), for tests
  of the converters and of anything downstream. Each writer returns what it wrote (`Written`: ids,
  expected labels, the full-resolution grey pixels) so tests can compare against a numpy reference.
  - `write_nih`: Data_Entry_2017_v2020.csv (11-field header) or Data_Entry_2017.csv (trailing
    empty column), PNGs under images_001/images/, images_002/images/ or a flat images/ (8-bit grey,
    one RGBA, one 16-bit), train_val_list.txt / test_list.txt (patient-wise).
  - `write_chexpert`: CheXpert-v1.0-small/{train,valid}.csv + patientNNNNN/studyN/viewN_*.jpg.
  - `write_mimic`: MIMIC-CXR as published (.dcm tree + chexpert / metadata / split CSVs), or with
    jpg=True MIMIC-CXR-JPG as published (.jpg tree + gzipped chexpert / negbio / metadata / split CSVs).
  - `write_dicom`: MIMIC-CXR-style files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm (8-bit MONOCHROME2,
    12-bit windowed MONOCHROME2, 16-bit MONOCHROME1 with rescale + window) + a labels CSV;
    `write_dicom_file` writes one such file.
- Xiao et al.'s MAE checkpoints, synthesised: `xiao_layout`, `synth_state`, `save_mae_style`.

The writers live together here because they share `Written`, `gray_pattern`, the DICOM file
writer and CheXpert's columns, and the converter, format, serve and workflow tests all use them.
Fixtures are session-scoped so module-scoped fixtures can use them too.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gzip
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. Set before
# fasttrain is imported: a kernel is built for the interpreter only when TRITON_INTERPRET=1 then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fasttrain.converters.nih import convert_nih
from fasttrain.converters.synthetic import generate_phantoms
from fasttrain.data import open_packed
from fasttrain.models.vit import sincos_pos_embed_2d

# Tests are small: keep the two cores for the tests, not for oversubscribed thread pools.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (compile, multi-process, end to end)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (run by scripts/gpu_check.sh)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh runs these on a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- tiny runs

# CPU-sized: 32-px images, a 32-d x 2-block ViT with 8-px patches, so each test states only what it changes
_RUN = {"log_every": 2, "progress": False, "tensorboard": False}
TINY_BASE = {
    # MAE pre-training (and, with --teacher, distillation)
    "mae": {
        "model": {"name": "mae_vit_tiny_patch16", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                  "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
        "data": {"batch_size": 8, "eval_resize": 32},
        "optim": {"epochs": 2, "blr": 1.0e-2, "warmup_epochs": 1},
        "engine": {"compile": False},
        "run": _RUN,
    },
    # fine-tuning a classifier
    "vit": {
        "model": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                  "num_heads": 2},
        "data": {"batch_size": 8, "eval_resize": 32},
        "optim": {"epochs": 1, "blr": 1.0e-2, "warmup_epochs": 0},
        "engine": {"compile": False},
        "run": _RUN,
    },
}


def tiny_run_yaml(kind: str = "mae", **sections: dict) -> str:
    """TINY_BASE[kind] as YAML text, each keyword a section whose keys replace or add to the base's."""
    cfg = copy.deepcopy(TINY_BASE[kind])
    for name, keys in sections.items():
        cfg.setdefault(name, {}).update(keys)
    return yaml.safe_dump(cfg, sort_keys=False)


def pack_phantoms(root: Path, n: int, *, seed: int = 0, size: int = 32, val_fraction: float = 0.2) -> Path:
    """n SYNTHETIC phantoms in NIH's layout under root/src, packed raw by the real converter into
    root/packed (train / val / test)."""
    generate_phantoms(root / "src", n, seed=seed, size=size, workers=1, progress=False)
    return convert_nih(root / "src", root / "packed", formats=("raw",), size=size, val_fraction=val_fraction,
                       workers=1, progress=False)


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_yaml():
    """`tiny_yaml(kind="mae", **sections) -> str`: a tiny "mae" or "vit" run config as YAML text."""
    return tiny_run_yaml


@pytest.fixture(scope="session")
def packed_phantoms():
    """`packed_phantoms(root, n, *, seed=0, size=32, val_fraction=0.2) -> Path` of the packed set."""
    return pack_phantoms


@pytest.fixture(scope="session")
def free_port():
    """`free_port() -> int`: a TCP port free on 127.0.0.1 right now."""
    return find_free_port


# ----------------------------------------------------------------------------- source datasets

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


def gray_image(rng: np.random.Generator, h: int, w: int, index: int) -> np.ndarray:
    """A uint8 [h, w] image with structure (gradient + blobs) and the index in its top-left block,
    so a misplaced image is visible."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 40 + 150 * (xx / w) * (0.5 + 0.5 * yy / h) + rng.normal(0, 20, (h, w))
    img[: h // 4, : w // 4] = (index * 37) % 256
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# NIH

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


def nih_source(root, *, csv_version: str = "v2020", layout: str = "nested", side: int = 48,
               rows=NIH_ROWS, seed: int = 0) -> Written:
    """Write a tiny NIH ChestX-ray14 source folder; see the module docstring."""
    import cv2
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
        g = gray_image(rng, side, side, k)
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


# CheXpert

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


def chexpert_csv_path(release: str, split: str, patient: int, study: int, view: int, frontal: bool) -> str:
    return f"{release}/{split}/patient{patient:05d}/study{study}/view{view}_{'frontal' if frontal else 'lateral'}.jpg"


def chexpert_source(root, *, release: str = "CheXpert-v1.0-small", h: int = 40, w: int = 32,
                    train=CHEXPERT_TRAIN, valid=CHEXPERT_VALID, seed: int = 1) -> Written:
    """Write `root/<release>/{train,valid}.csv` and the JPEG tree; ids are the CSV Paths."""
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
                p = chexpert_csv_path(release, split, patient, study, view, frontal)
                file = root / p
                file.parent.mkdir(parents=True, exist_ok=True)
                g = gray_image(rng, h, w, k)
                Image.fromarray(g, "L").save(file, quality=95)
                out.pixels[p] = g.astype(np.float64)
                out.files[p] = file
                wr.writerow([p, "Female" if k % 2 else "Male", 50 + k, "Frontal" if frontal else "Lateral",
                             "AP" if frontal else ""] + [cells.get(c, "") for c in CHEXPERT_COLUMNS[5:]])
    return out


# DICOM

def dicom_file(path: Path, pixels: np.ndarray, *, bits_stored: int, photometric: str, slope=None, intercept=None,
               center=None, width=None, voi_function=None) -> None:
    """One Digital X-Ray DICOM file holding `pixels` as stored values (8 or 16 bits allocated)."""
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


def dicom_source(root, *, side: int = 32, seed: int = 2, id_column: str = "dicom_id") -> Written:
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
        base = gray_image(rng, side, side, k).astype(np.float64) / 255.0  # 0..1 "density"
        if k == 0:  # 8-bit MONOCHROME2, no window: min..max of the stored values
            stored = np.rint(base * 255).astype(np.uint8)
            dicom_file(path, stored, bits_stored=8, photometric="MONOCHROME2")
            s = stored.astype(np.float64)
            ref = (s - s.min()) / (s.max() - s.min())
        elif k == 1:  # 12-bit MONOCHROME2 with a window
            stored = np.rint(base * 4095).astype(np.uint16)
            dicom_file(path, stored, bits_stored=12, photometric="MONOCHROME2", center=2048, width=3000)
            ref = window_linear(stored.astype(np.float64), 2048, 3000)
        elif k == 2:  # 16-bit MONOCHROME1 with rescale slope/intercept and a window: high = dark
            stored = np.rint((1 - base) * 60000 + 1000).astype(np.uint16)
            dicom_file(path, stored, bits_stored=16, photometric="MONOCHROME1", slope=0.5, intercept=-1024,
                       center=14000, width=28000)
            hu = stored.astype(np.float64) * 0.5 - 1024
            ref = 1.0 - window_linear(hu, 14000, 28000)
        else:  # 12-bit, no window: its own range
            stored = np.rint(base * 3000 + 500).astype(np.uint16)
            dicom_file(path, stored, bits_stored=12, photometric="MONOCHROME2")
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


# MIMIC-CXR: its own CSVs, columns as published

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


def mimic_splits(out) -> tuple:
    """(train, val, test) of a pack of the MIMIC fixture, checked to hold exactly the frontal (PA / AP)
    images of each official split (validate -> val), in the metadata's order."""
    frontal = {s: [d for d, _, _, v, sp in MIMIC_IMAGES if v in ("PA", "AP") and sp == s]
               for s in ("train", "validate", "test")}
    train, val, test = open_packed(out, "train"), open_packed(out, "val"), open_packed(out, "test")
    assert train.ids == frontal["train"] and val.ids == frontal["validate"] and test.ids == frontal["test"]
    return train, val, test


def mimic_source(root, *, side: int = 32, seed: int = 3, jpg: bool = False) -> Written:
    """MIMIC-CXR as published: files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm and the chexpert,
    metadata and split CSVs (8-bit MONOCHROME2 DICOMs; their pixels are tested elsewhere).

    jpg=True: MIMIC-CXR-JPG as published instead: the same tree with <dicom_id>.jpg (8-bit grey,
    quality 95) and the CSVs gzipped (`mimic-cxr-2.0.0-{chexpert,negbio,metadata,split}.csv.gz`);
    the negbio CSV has the chexpert columns with other values (Edema positive everywhere), so a
    test can tell which labeler was read. Reference pixels are then the stored grey (0..255)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    out = Written(root)
    for k, (did, subject, study, view, split) in enumerate(MIMIC_IMAGES):
        path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{did}.{'jpg' if jpg else 'dcm'}"
        g = gray_image(rng, side, side, k)
        s = g.astype(np.float64)
        if jpg:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(g, "L").save(path, quality=95)
            out.pixels[did] = s
        else:
            dicom_file(path, g, bits_stored=8, photometric="MONOCHROME2")
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


@pytest.fixture(scope="session")
def gray_pattern():
    """`gray_pattern(rng, h, w, index) -> uint8 [h, w]`: structure plus the index in the top-left block."""
    return gray_image


@pytest.fixture(scope="session")
def write_nih():
    """`write_nih(root, *, csv_version="v2020", layout="nested", side=48, rows=..., seed=0) -> Written`."""
    return nih_source


@pytest.fixture(scope="session")
def nih_header() -> str:
    """The 11-field header of Data_Entry_2017_v2020.csv."""
    return NIH_HEADER


@pytest.fixture(scope="session")
def nih_odd_pngs() -> tuple[str, str]:
    """(RGBA file, 16-bit file): the two NIH PNGs `write_nih` writes in other than 8-bit grey."""
    return RGBA_NAME, SIXTEEN_BIT_NAME


@pytest.fixture(scope="session")
def write_chexpert():
    """`write_chexpert(root, *, release="CheXpert-v1.0-small", h=40, w=32, train=..., valid=..., seed=1) -> Written`."""
    return chexpert_source


@pytest.fixture(scope="session")
def chexpert_columns() -> list[str]:
    """CheXpert's CSV header: Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 labels."""
    return CHEXPERT_COLUMNS


@pytest.fixture(scope="session")
def chexpert_path():
    """`chexpert_path(release, split, patient, study, view, frontal) -> str`: a CSV Path cell."""
    return chexpert_csv_path


@pytest.fixture(scope="session")
def write_dicom_file():
    """`write_dicom_file(path, pixels, *, bits_stored, photometric, slope=None, intercept=None,
    center=None, width=None, voi_function=None)`."""
    return dicom_file


@pytest.fixture(scope="session")
def write_dicom():
    """`write_dicom(root, *, side=32, seed=2, id_column="dicom_id") -> Written`."""
    return dicom_source


@pytest.fixture(scope="session")
def write_mimic():
    """`write_mimic(root, *, side=32, seed=3, jpg=False) -> Written`."""
    return mimic_source


@pytest.fixture(scope="session")
def mimic_images() -> list[tuple]:
    """The images `write_mimic` writes: (dicom_id, subject, study, view, split)."""
    return MIMIC_IMAGES


@pytest.fixture(scope="session")
def open_mimic_splits():
    """`open_mimic_splits(packed) -> (train, val, test)`, checked to be the frontal images of each split."""
    return mimic_splits


# ----------------------------------------------------------------------------- Xiao et al.'s checkpoints

def xiao_keys(D, depth, Dd, ddepth, L=196, p=16, c=3):
    """Key -> shape of Xiao et al.'s / MAE's pre-training checkpoints, written from the format."""
    s = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + L, D), "patch_embed.proj.weight": (D, c, p, p),
         "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,),
         "mask_token": (1, 1, Dd), "decoder_pos_embed": (1, 1 + L, Dd), "decoder_embed.weight": (Dd, D),
         "decoder_embed.bias": (Dd,), "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
         "decoder_pred.weight": (p * p * c, Dd), "decoder_pred.bias": (p * p * c,)}
    for prefix, d, n in (("blocks", D, depth), ("decoder_blocks", Dd, ddepth)):
        for i in range(n):
            b = f"{prefix}.{i}."
            s.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                      b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                      b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (4 * d, d),
                      b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    return s


def random_state(layout, seed, grid=14):
    """Random weights in `layout`, with MAE's fixed sin-cos position tables."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(*shape, generator=g) * 0.02 for k, shape in layout.items()}
    sd["pos_embed"] = sincos_pos_embed_2d(layout["pos_embed"][-1], grid)  # fixed sin-cos, as MAE saves it
    sd["decoder_pos_embed"] = sincos_pos_embed_2d(layout["decoder_pos_embed"][-1], grid)
    return sd


def mae_checkpoint(path, sd, model_name, prefix=""):
    """What MAE's misc.save_model writes: weights plus optimizer, epoch, scaler and the argparse args."""
    torch.save({"model": {prefix + k: v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]},
                "epoch": 99, "scaler": {"scale": 65536.0, "growth_tracker": 3},
                "args": argparse.Namespace(model=model_name, mask_ratio=0.75, norm_pix_loss=True)}, path)
    return path


@pytest.fixture(scope="session")
def xiao_layout():
    """`xiao_layout(D, depth, Dd, ddepth, L=196, p=16, c=3) -> {key: shape}` of an MAE checkpoint."""
    return xiao_keys


@pytest.fixture(scope="session")
def synth_state():
    """`synth_state(layout, seed, grid=14) -> state dict`: random weights, sin-cos position tables."""
    return random_state


@pytest.fixture(scope="session")
def save_mae_style():
    """`save_mae_style(path, sd, model_name, prefix="") -> path`: saved as MAE's misc.save_model does."""
    return mae_checkpoint
