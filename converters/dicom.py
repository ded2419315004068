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

from .chexpert import CHEXPERT_ALL, COMPETITION, map_labels, uncertain_value
from .common import ConvertError, Item, Problems, begin, pack, patient_disjoint_split, read_csv, to_uint8_resized

FILE_COLUMNS = ("path", "Path", "file", "filename", "dicom_id")
SPLIT_VALUES = {"train": "train", "validate": "val", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class DicomPluginError(RuntimeError):
    """Compressed pixel data and no installed pydicom plugin that decodes it."""


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI window to [0, 1], per DICOM PS3.3 C.11.2.1.2 (the output range is ours: 0..1)."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"Window Width {width} must be > 0")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError(f"Window Width {width} must be >= 1 for LINEAR")
    if width == 1:
        return (x > center - 0.5).astype(np.float32)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(v) -> float:
    try:
        return float(v[0])
    except TypeError:
        return float(v)


def pixels_to_unit(ds) -> np.ndarray:
    """A dataset's pixels as float32 [H, W] in [0, 1], bright = dense (bone)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"multi-frame image ({ds.NumberOfFrames} frames); expected one radiograph")
    arr = ds.pixel_array
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:  # colour: ITU-R 601 luma, then treat as grey
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if arr.ndim != 2:
        raise ValueError(f"pixel array of shape {arr.shape}; expected [rows, columns]")
    x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)  # rescale slope / intercept
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2])
        # the LUT is indexed by integer values (the modality output, rounded)
        x = np.asarray(apply_voi_lut(np.rint(x).astype(np.int32), ds, index=0, prefer_lut=True),
                       dtype=np.float32) / float(2 ** bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        x = _window(x, _first(ds.WindowCenter), _first(ds.WindowWidth), str(getattr(ds, "VOILUTFunction", "LINEAR")))
    else:  # no VOI: the image's own range
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        x = 1.0 - x  # MONOCHROME1: high values are dark
    elif str(ds.PhotometricInterpretation).strip() != "MONOCHROME2":
        raise ValueError(f"PhotometricInterpretation {ds.PhotometricInterpretation!r}; expected MONOCHROME1/2")
    return x


# The one-line fix per compressed syntax (pydicom's own list names every backend, including a Pillow
# that is installed but built without the codec, which reads as if nothing were missing).
_J2K = "pip install pylibjpeg pylibjpeg-openjpeg"
_LJ = "pip install pylibjpeg pylibjpeg-libjpeg"
PIP_HINTS = {
    "1.2.840.10008.1.2.4.90": _J2K, "1.2.840.10008.1.2.4.91": _J2K,  # JPEG 2000 (MIMIC-CXR's large files)
    "1.2.840.10008.1.2.4.201": _J2K, "1.2.840.10008.1.2.4.202": _J2K, "1.2.840.10008.1.2.4.203": _J2K,  # HTJ2K
    "1.2.840.10008.1.2.4.50": _LJ, "1.2.840.10008.1.2.4.51": _LJ, "1.2.840.10008.1.2.4.57": _LJ,
    "1.2.840.10008.1.2.4.70": _LJ, "1.2.840.10008.1.2.4.80": _LJ, "1.2.840.10008.1.2.4.81": _LJ,
}


def _pixel_error(path: str, ds, err: Exception) -> Exception:
    """pydicom's message on a missing plugin does not name the file; ours does, and says what to install."""
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsuid is not None and tsuid.is_compressed:
        hint = ""
        try:
            from pydicom.pixels import get_decoder
            dec = get_decoder(tsuid)
            if not dec.is_available:
                pip = PIP_HINTS.get(str(tsuid))
                hint = (f"; install a decoder plugin, e.g. `{pip}`" if pip else "") + \
                    " (pydicom's options: " + "; ".join(dec.missing_dependencies) + ")"
        except Exception:  # an unknown syntax: pydicom has no decoder at all
            hint = "; pydicom has no decoder for it"
        if not hint:  # a decoder is installed but failed on this file: keep its own words
            hint = f" ({err})"
        return DicomPluginError(f"{path}: pixel data compressed as {tsuid.name} ({tsuid}) cannot be decoded{hint}")
    return err


def _dcmread(path: str):
    """pydicom.dcmread, also for files without the 128-byte preamble + 'DICM' (older archives, and
    what pydicom's own `save_as` writes unless told `enforce_file_format=True`): those are read
    with force=True and must then hold Rows + PixelData, and a missing Transfer Syntax is taken
    from the encoding pydicom found while parsing."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as e:
        first = e
    except Exception as e:
        raise ValueError(f"not a readable DICOM file: {e}") from e
    try:
        ds = pydicom.dcmread(path, force=True)
        ok = "PixelData" in ds and "Rows" in ds
    except Exception:
        ok = False
    if not ok:
        # (pydicom's own words end with "Use force=True", which we just did)
        raise ValueError("not a readable DICOM file: no 'DICM' header, and no Rows / PixelData when read "
                         "as a bare data set") from first
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
        implicit, little = ds.original_encoding
        if not hasattr(ds, "file_meta"):
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def read_dicom_unit(path: str) -> np.ndarray:
    ds = _dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("no PixelData element")
    try:
        return pixels_to_unit(ds)
    except Exception as e:
        raise _pixel_error(path, ds, e) from e


def decode_dicom(path: str, size: int) -> np.ndarray:
    """DICOM file -> uint8 [size, size] (VOI-mapped, MONOCHROME1 inverted, area-resized)."""
    return to_uint8_resized(read_dicom_unit(path), size, full_scale=1.0)


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
    split = SPLIT_VALUES.get(value.strip().lower())
    if split is None:
        problems.report(ident, path, f"{where}: split {value!r}; expected one of {sorted(SPLIT_VALUES)}")
    return split


def build_items(src: Path, labels_csv: Path, labels: str, uncertain: str, problems: Problems,
                views: str = "frontal", metadata_csv: Optional[Path] = None, split_csv: Optional[Path] = None):
    """-> (splits, label names, id column, source files). A CSV with a file / dicom_id column is
    read row by row; MIMIC-CXR's per-study `mimic-cxr-2.0.0-chexpert.csv` (subject_id, study_id,
    labels) is joined with its metadata (dicom_id -> study, ViewPosition) and split CSVs."""
    header, rows = read_csv(labels_csv, [])
    uncertain_value("Edema", uncertain)
    if views not in ("frontal", "all"):
        raise ConvertError(f"--views must be 'frontal' or 'all', got {views!r}")
    names = _label_names(labels_csv, header, labels)
    file_col = next((c for c in FILE_COLUMNS if c in header), None)
    if file_col is None and {"subject_id", "study_id"} <= set(header):
        return _build_mimic(src, labels_csv, rows, names, uncertain, problems, views, metadata_csv, split_csv)
    if file_col is None:
        raise ConvertError(f"{labels_csv}: no column naming the image; expected one of {list(FILE_COLUMNS)} "
                           f"(or MIMIC-CXR's subject_id + study_id with its metadata CSV)")
    by_stem: dict[str, list[Path]] = {}
    if file_col == "dicom_id":
        for dirpath, _, files in os.walk(src):
            for f in files:
                if f.lower().endswith(".dcm"):
                    by_stem.setdefault(f[:-4], []).append(Path(dirpath) / f)
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
                                              f"{'no' if not found else len(found)} .dcm file(s) under {src}")
                continue
            path = found[0]
        else:
            path = src / ident
            if not path.is_file():
                problems.report(ident, str(path), f"{where}: DICOM file {path} not found")
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
        splits.setdefault(split, []).append(Item(id=ident, path=str(path), labels=y, where=f"{where} ({ident})",
                                                 group=group))
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


def _build_mimic(src, labels_csv, rows, names, uncertain, problems, views, metadata_csv, split_csv):
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
        path = files_root / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{did}.dcm"
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
            problems.report(did, str(path), f"{where}: DICOM file {path} not found")
            continue
        splits.setdefault(split, []).append(Item(id=did, path=str(path), labels=lab[1],
                                                 where=f"{where} ({did}; labels {lab[0]})", group=subject))
    order = [s for s in ("train", "val", "test") if s in splits]
    return {s: splits[s] for s in order}, names, "dicom_id (MIMIC-CXR metadata join)", sources


def convert_dicom(src, labels_csv, out, formats: Sequence[str] = ("raw",), size: int = 256,
                  uncertain: str = "paper", labels: str = "competition", val_fraction: float = 0.0,
                  on_error: str = "fail", workers: Optional[int] = None, seed: int = 0, jpeg_quality: int = 95,
                  shard_size: int = 4096, progress: bool = True, views: str = "frontal",
                  metadata_csv=None, split_csv=None) -> Path:
    """Pack a folder of DICOMs labelled by `labels_csv` into `out`; return `out`."""
    labels_csv = Path(labels_csv)
    src, opts, problems = begin(src, formats=tuple(formats), size=size, workers=workers, on_error=on_error,
                                jpeg_quality=jpeg_quality, shard_size=shard_size, progress=progress)
    splits, names, file_col, sources = build_items(src, labels_csv, labels, uncertain, problems, views=views,
                                                   metadata_csv=metadata_csv, split_csv=split_csv)
    if not splits:
        raise ConvertError(f"{labels_csv}: no usable rows")
    if val_fraction:
        if "val" in splits:
            raise ConvertError(f"{labels_csv}: has a 'val'/'validate' split already; drop --val-fraction")
        splits["train"], splits["val"] = patient_disjoint_split(splits["train"], val_fraction, seed)
    extra = {"dicom": {"labels_csv": str(labels_csv.absolute()), "id_column": file_col, "uncertain": uncertain,
                       "labels": labels, "views": views, "val_fraction": val_fraction, "split_seed": seed},
             "preprocessing": {"dicom": "Modality LUT, then VOI LUT Sequence, else first window (VOI LUT "
                                        "Function), else min..max; MONOCHROME1 inverted; 0..1 -> 0..255"}}
    return pack(dataset="dicom", source=src, out=Path(out), splits=splits, label_names=names,
                decode=decode_dicom, opts=opts, problems=problems, source_files=sources, extra=extra)
