"""DICOM (MIMIC-CXR style) -> packed dataset.

Inputs: a folder of DICOM files (MIMIC-CXR: `files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm`) and a
labels CSV in CheXpert convention: one column naming the image (`path` / `Path` / `file` relative to
the folder, or `dicom_id`), CheXpert observation columns (1.0, 0.0, -1.0, blank; same policies as
the CheXpert converter), an optional `split` column (`train`, `validate` / `val`, `test`; without
it every row goes to `train`) and optional `subject_id` (patient, for `val_fraction`). Or MIMIC-CXR's
own CSVs as published: `mimic-cxr-2.0.0-chexpert.csv` (labels per subject_id, study_id) joined with
`mimic-cxr-2.0.0-metadata.csv` (dicom_id -> study, ViewPosition; frontal = PA/AP by default) and
`mimic-cxr-2.0.0-split.csv` (found beside the labels CSV, or passed explicitly).

Pixels: Modality LUT (Rescale Slope / Intercept, or the Modality LUT Sequence), then the VOI LUT
Sequence, else the first Window Center / Width (LINEAR, LINEAR_EXACT or SIGMOID per VOI LUT
Function), else the image's own min..max; MONOCHROME1 is inverted so bone is bright; any bit
depth 8-16. Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg, openjpeg,
gdcm, pillow); when none is installed the error names the file, the syntax and what to install.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .chexpert import CHEXPERT_ALL, COMPETITION, map_labels, uncertain_value, view_filter
from .common import (SPLIT_NAMES, ConvertError, Item, Problems, carve, parse_age, parse_sex, parse_view, read_csv)
from .decode import decode_dicom, decode_raster
from .pack import begin, pack

FILE_COLUMNS = ("path", "Path", "file", "filename", "dicom_id")
_KIND = {".dcm": "DICOM", ".jpg": "JPEG"}  # what the error messages call a missing file
# --demographics-csv: MIMIC-IV's hosp/patients.csv (subject_id, gender, anchor_age) or any CSV with
# subject_id and sex / age columns spelled as below
DEMOGRAPHIC_SEX = ("gender", "sex", "Sex", "PatientSex")
DEMOGRAPHIC_AGE = ("anchor_age", "age", "Age", "PatientAge")
# a labels CSV row's own view / sex / age, when it has such columns
ROW_VIEW = ("ViewPosition", "view", "View Position")


def read_demographics(path: Path) -> dict[str, dict]:
    """subject_id -> {"sex": 'M' / 'F' / None, "age": years / None} from a demographics CSV."""
    header, rows = read_csv(path, ["subject_id"])
    sex_col = next((c for c in DEMOGRAPHIC_SEX if c in header), None)
    age_col = next((c for c in DEMOGRAPHIC_AGE if c in header), None)
    if sex_col is None and age_col is None:
        raise ConvertError(f"{path}: --demographics-csv needs a sex column (one of {list(DEMOGRAPHIC_SEX)}) or an "
                           f"age column (one of {list(DEMOGRAPHIC_AGE)}); found {header}")
    return {r["subject_id"]: {"sex": parse_sex(r[sex_col]) if sex_col else None,
                              "age": parse_age(r[age_col]) if age_col else None} for _, r in rows}


def row_metadata(r: dict, subject: str, demographics: dict[str, dict]) -> dict:
    """view (from the row's ViewPosition) and sex / age (from the demographics CSV, by subject)."""
    view = parse_view(next((r[c] for c in ROW_VIEW if c in r), ""))
    return {"view": view, **demographics.get(subject, {})}


def _label_names(labels_csv: Path, header: list[str], labels: str) -> list[str]:
    if labels == "competition":
        names = list(COMPETITION)
        missing = [n for n in names if n not in header]
        if len(missing) == len(names) and not any(n in header for n in CHEXPERT_ALL):
            raise ConvertError(f"{labels_csv}: none of the CheXpert label columns {CHEXPERT_ALL}; is this the labels "
                               f"CSV? (found {header[:8]}{' ...' if len(header) > 8 else ''})")
        if missing:
            raise ConvertError(f"{labels_csv}: missing label column(s) {missing} (use --labels all for the "
                               f"CheXpert columns it has)")
        return names
    if labels == "all":
        names = [n for n in CHEXPERT_ALL if n in header]
        if not names:
            raise ConvertError(f"{labels_csv}: none of the CheXpert label columns {CHEXPERT_ALL}")
        return names
    raise ConvertError(f"--labels must be 'competition' or 'all', got {labels!r}")


def _split_of(value: str, where: str, ident: str, path: str, problems: Problems) -> Optional[str]:
    split = SPLIT_NAMES.get(value.strip().lower())
    if split is None:
        problems.report(ident, path, f"{where}: split {value!r}; expected one of {sorted(SPLIT_NAMES)}")
    return split


def build_items(src: Path, labels_csv: Path, labels: str, uncertain: str, problems: Problems,
                views: str = "frontal", metadata_csv: Optional[Path] = None, split_csv: Optional[Path] = None,
                suffix: str = ".dcm", demographics_csv: Optional[Path] = None):
    """-> (splits, label names, id column, source files). A CSV with a file / dicom_id column is
    read row by row; MIMIC-CXR's per-study `mimic-cxr-2.0.0-chexpert.csv` (subject_id, study_id,
    labels) is joined with its metadata (dicom_id -> study, ViewPosition) and split CSVs."""
    header, rows = read_csv(labels_csv, [])
    uncertain_value("Edema", uncertain)
    keep_views = view_filter(views)
    demographics = read_demographics(Path(demographics_csv)) if demographics_csv else {}
    names = _label_names(labels_csv, header, labels)
    file_col = next((c for c in FILE_COLUMNS if c in header), None)
    if file_col is None and {"subject_id", "study_id"} <= set(header):
        return _build_mimic(src, labels_csv, rows, names, uncertain, problems, views, metadata_csv, split_csv,
                            suffix, keep_views, demographics)
    if file_col is None:
        raise ConvertError(f"{labels_csv}: no column naming the image; expected one of {list(FILE_COLUMNS)} "
                           f"(or MIMIC-CXR's subject_id + study_id with its metadata CSV)")
    by_stem: dict[str, list[Path]] = {}
    if file_col == "dicom_id":
        for dirpath, _, files in os.walk(src):
            for f in files:
                if f.lower().endswith(suffix):
                    by_stem.setdefault(f[:-len(suffix)], []).append(Path(dirpath) / f)
    has_split = "split" in header
    splits: dict[str, list[Item]] = {}
    for lineno, r in rows:
        where = f"{labels_csv.name} row {lineno}"
        ident = r[file_col]
        if not ident:
            problems.report("", str(labels_csv), f"{where}: empty {file_col!r}")
            continue
        if file_col == "dicom_id":
            found = by_stem.get(ident, [])
            if len(found) != 1:
                problems.report(ident, ident, f"{where}: dicom_id {ident!r} matches "
                                              f"{'no' if not found else len(found)} {suffix} file(s) under {src}")
                continue
            path = found[0]
        else:
            path = src / ident
            if not path.is_file():
                problems.report(ident, str(path), f"{where}: {_KIND[suffix]} file {path} not found")
                continue
        split = "train"
        if has_split:
            split = _split_of(r["split"], where, ident, str(path), problems)
            if split is None:
                continue
        try:
            y = map_labels(r, names, uncertain, where)
        except ConvertError as e:
            problems.report(ident, str(path), str(e))
            continue
        group = r.get("subject_id") or ident
        meta = row_metadata(r, r.get("subject_id", ""), demographics)
        if keep_views is not None and meta["view"] not in keep_views:
            continue
        splits.setdefault(split, []).append(Item(id=ident, path=str(path), labels=y, where=f"{where} ({ident})",
                                                 group=group, meta=meta))
    order = [s for s in ("train", "val", "test") if s in splits]
    return {s: splits[s] for s in order}, names, file_col, [labels_csv]


MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"
FRONTAL_VIEWS = ("PA", "AP")


def _beside(labels_csv: Path, name: str) -> Path:
    """`name` next to the labels CSV, or its `.gz` as PhysioNet publishes it."""
    p = labels_csv.parent / name
    gz = p.with_name(name + ".gz")
    return gz if not p.is_file() and gz.is_file() else p


def _build_mimic(src, labels_csv, rows, names, uncertain, problems, views, metadata_csv, split_csv, suffix,
                 keep_views, demographics):
    metadata_csv = Path(metadata_csv) if metadata_csv else _beside(labels_csv, MIMIC_METADATA)
    if not metadata_csv.is_file():
        raise ConvertError(f"{labels_csv}: per-study labels (subject_id, study_id) need MIMIC-CXR's metadata CSV "
                           f"(dicom_id -> study); not found at {metadata_csv} (pass --metadata-csv)")
    split_csv = Path(split_csv) if split_csv else _beside(labels_csv, MIMIC_SPLIT)
    sources = [labels_csv, metadata_csv]
    study_labels: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
    for lineno, r in rows:
        where = f"{labels_csv.name} row {lineno}"
        key = (r["subject_id"], r["study_id"])
        if key in study_labels:
            problems.report(f"s{key[1]}", str(labels_csv), f"{where}: duplicate study {key} (also {study_labels[key][0]})")
            continue
        try:
            study_labels[key] = (where, map_labels(r, names, uncertain, where))
        except ConvertError as e:
            problems.report(f"s{key[1]}", str(labels_csv), str(e))
            study_labels[key] = (where, None)  # reported; its images are skipped without a second report
    split_of: dict[str, tuple[str, str]] = {}
    if split_csv.is_file():
        sources.append(split_csv)
        _, srows = read_csv(split_csv, ["dicom_id", "split"])
        split_of = {r["dicom_id"]: (f"{split_csv.name} row {n}", r["split"]) for n, r in srows}
    _, mrows = read_csv(metadata_csv, ["dicom_id", "subject_id", "study_id", "ViewPosition"])
    files_root = src / "files" if (src / "files").is_dir() else src
    splits: dict[str, list[Item]] = {}
    for lineno, r in mrows:
        where = f"{metadata_csv.name} row {lineno}"
        did, subject, study = r["dicom_id"], r["subject_id"], r["study_id"]
        if views == "frontal" and r["ViewPosition"] not in FRONTAL_VIEWS:
            continue
        meta = row_metadata(r, subject, demographics)
        if keep_views is not None and meta["view"] not in keep_views:
            continue
        path = files_root / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{did}{suffix}"
        lab = study_labels.get((subject, study))
        if lab is None:
            problems.report(did, str(path), f"{where}: study s{study} of subject {subject} has no row in {labels_csv.name}")
            continue
        if lab[1] is None:
            continue
        split = "train"
        if split_of:
            if did not in split_of:
                problems.report(did, str(path), f"{where}: dicom_id {did} is not in {split_csv.name}")
                continue
            split = _split_of(split_of[did][1], split_of[did][0], did, str(path), problems)
            if split is None:
                continue
        if not path.is_file():
            problems.report(did, str(path), f"{where}: {_KIND[suffix]} file {path} not found")
            continue
        splits.setdefault(split, []).append(Item(id=did, path=str(path), labels=lab[1],
                                                 where=f"{where} ({did}; labels {lab[0]})", group=subject,
                                                 meta=meta))
    order = [s for s in ("train", "val", "test") if s in splits]
    return {s: splits[s] for s in order}, names, "dicom_id (MIMIC-CXR metadata join)", sources


def _carve_val(splits: dict, labels_csv: Path, val_fraction: float, seed: int) -> None:
    """No rows is an error; --val-fraction carves a patient-disjoint val split from train (MIMIC's
    own split file may already have one: then the flag is an error, not silently ignored)."""
    if not splits:
        raise ConvertError(f"{labels_csv}: no usable rows")
    if val_fraction:
        carve(splits, "val", val_fraction, seed, "--val-fraction")


def convert_dicom(src, labels_csv, out, formats: Sequence[str] = ("raw",), size: int = 256,
                  uncertain: str = "paper", labels: str = "competition", val_fraction: float = 0.0,
                  on_error: str = "fail", workers: Optional[int] = None, seed: int = 0, jpeg_quality: int = 95,
                  shard_size: int = 4096, progress: bool = True, views: str = "frontal",
                   metadata_csv=None, split_csv=None, demographics_csv=None, resize: str = "crop") -> Path:
    """Pack a folder of DICOMs labelled by `labels_csv` into `out`; return `out`. resize: crop
    (default) keeps portrait frames undistorted (decode.RESIZE_MODES)."""
    labels_csv = Path(labels_csv)
    src, opts, problems = begin(src, formats=tuple(formats), size=size, workers=workers, on_error=on_error,
                                jpeg_quality=jpeg_quality, shard_size=shard_size, progress=progress, resize=resize)
    splits, names, file_col, sources = build_items(src, labels_csv, labels, uncertain, problems, views=views,
                                                   metadata_csv=metadata_csv, split_csv=split_csv,
                                                   demographics_csv=demographics_csv)
    _carve_val(splits, labels_csv, val_fraction, seed)
    extra = {"dicom": {"labels_csv": str(labels_csv.absolute()), "id_column": file_col, "uncertain": uncertain,
                       "labels": labels, "views": views, "val_fraction": val_fraction, "split_seed": seed},
             "preprocessing": {"dicom": "Modality LUT, then VOI LUT Sequence, else first window (VOI LUT "
                                        "Function), else min..max; MONOCHROME1 inverted; 0..1 -> 0..255"}}
    return pack(dataset="dicom", source=src, out=Path(out), splits=splits, label_names=names,
                decode=decode_dicom, opts=opts, problems=problems, source_files=sources, extra=extra)


MIMIC_CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"


def convert_mimic_jpg(src, out, labels_csv=None, formats: Sequence[str] = ("raw",), size: int = 256,
                      uncertain: str = "paper", labels: str = "competition", val_fraction: float = 0.0,
                      on_error: str = "fail", workers: Optional[int] = None, seed: int = 0, jpeg_quality: int = 95,
                      shard_size: int = 4096, progress: bool = True, views: str = "frontal",
                      metadata_csv=None, split_csv=None, demographics_csv=None, resize: str = "crop") -> Path:
    """Pack MIMIC-CXR-JPG as published into `out`; return `out`.

    `src` is the release folder: `files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg` and the CSVs
    (`mimic-cxr-2.0.0-{chexpert,negbio,metadata,split}.csv[.gz]`). The same joins, views and splits
    as MIMIC-CXR DICOM (`convert_dicom` with the published CSVs): labels per study from
    `labels_csv` (default: the chexpert labeler's CSV in `src`; pass the negbio one to use that
    labeler), dicom_id -> study and ViewPosition from the metadata CSV, train / validate / test
    from the split CSV. Pixels: 8-bit grey JPEG, decoded at the smallest DCT scale >= `size`,
    fitted to the square by `resize` (crop by default: no distortion of the portrait frames)."""
    src_path = Path(src)
    labels_csv = Path(labels_csv) if labels_csv else _beside(src_path / MIMIC_CHEXPERT, MIMIC_CHEXPERT)
    if not labels_csv.is_file():
        raise ConvertError(f"{src_path}: no {MIMIC_CHEXPERT}[.gz] (MIMIC-CXR-JPG ships it at the top of the release); "
                           f"pass --labels-csv")
    src, opts, problems = begin(src, formats=tuple(formats), size=size, workers=workers, on_error=on_error,
                                jpeg_quality=jpeg_quality, shard_size=shard_size, progress=progress, resize=resize)
    header, _ = read_csv(labels_csv, [])
    if not {"subject_id", "study_id"} <= set(header):
        raise ConvertError(f"{labels_csv}: MIMIC-CXR-JPG labels are per study: expected subject_id and study_id "
                           f"columns (found {header[:6]})")
    splits, names, file_col, sources = build_items(src, labels_csv, labels, uncertain, problems, views=views,
                                                   metadata_csv=metadata_csv, split_csv=split_csv, suffix=".jpg",
                                                   demographics_csv=demographics_csv)
    _carve_val(splits, labels_csv, val_fraction, seed)
    extra = {"mimic_jpg": {"labels_csv": str(labels_csv.absolute()), "id_column": file_col, "uncertain": uncertain,
                           "labels": labels, "views": views, "val_fraction": val_fraction, "split_seed": seed}}
    return pack(dataset="mimic-cxr-jpg", source=src, out=Path(out), splits=splits, label_names=names,
                decode=decode_raster, opts=opts, problems=problems, source_files=sources, extra=extra)
