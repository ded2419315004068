"""NIH ChestX-ray14 -> packed dataset.

Source layout (as published): `Data_Entry_2017_v2020.csv` (or the original `Data_Entry_2017.csv`
with its trailing empty column), images under `images/` or `images_001/images/` ...
`images_012/images/`, and the official patient-wise lists `train_val_list.txt` / `test_list.txt`.
Splits: `train` and `test` from the lists (`val_fraction` carves a patient-disjoint `val` from
train_val), or, with `split_dir`, Xiao et al.'s `train_official.txt` / `val_official.txt` /
`test_official.txt` (`<image> <14 zeros/ones>` per line; labels then come from those files).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .common import (ConvertError, Item, Problems, parse_age, parse_sex, parse_view, parse_views,
                     patient_disjoint_split, read_csv)
from .decode import decode_raster
from .pack import begin, pack

NIH_LABELS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]
NO_FINDING = "No Finding"
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # the 2020 revision first
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
LIST_NAMES = {"train": "train_val_list.txt", "test": "test_list.txt"}
XIAO_NAMES = {"train": "train_official.txt", "val": "val_official.txt", "test": "test_official.txt"}
# metadata columns of Data_Entry_2017*.csv (optional: a trimmed copy without them still converts)
SEX_COLUMN, AGE_COLUMN, VIEW_COLUMN = "Patient Gender", "Patient Age", "View Position"


def row_metadata(r: dict) -> dict:
    """sex / age / view of one Data_Entry row (None where the column is absent or blank)."""
    return {"sex": parse_sex(r.get(SEX_COLUMN, "")), "age": parse_age(r.get(AGE_COLUMN, "")),
            "view": parse_view(r.get(VIEW_COLUMN, ""))}


def find_csv(src: Path) -> Optional[Path]:
    for name in CSV_NAMES:
        if (src / name).is_file():
            return src / name
    return None


def index_images(src: Path, problems: Problems) -> dict[str, Path]:
    """Map image name -> file over `images/` and `images_NNN/images/` (the archive's layout)."""
    dirs = [src / "images"] if (src / "images").is_dir() else []
    dirs += sorted(d / "images" for d in src.glob("images_*") if re.fullmatch(r"images_\d+", d.name)
                   and (d / "images").is_dir())
    if not dirs:
        raise ConvertError(f"{src}: no images/ or images_NNN/images/ folder (the NIH archive layout)")
    found: dict[str, Path] = {}
    for d in dirs:
        for entry in sorted(d.iterdir()):
            if not entry.name.lower().endswith(".png"):
                continue
            if entry.name in found:
                problems.report(entry.name, str(entry), f"{entry}: duplicate image name, also {found[entry.name]}")
                continue
            found[entry.name] = entry
    return found


def parse_findings(text: str, where: str) -> np.ndarray:
    """'Effusion|Mass' -> multi-hot float32 [14]; 'No Finding' -> zeros; unknown names are errors."""
    y = np.zeros(len(NIH_LABELS), np.float32)
    # " ".join(t.split()): hand-edited copies carry doubled spaces or non-breaking spaces
    # ("No\xa0Finding"); whitespace never distinguishes two NIH labels
    names = [" ".join(t.split()) for t in text.split("|") if t.strip()]
    if not names:
        raise ConvertError(f"{where}: empty 'Finding Labels' (use 'No Finding')")
    for name in names:
        if name == NO_FINDING:
            if len(names) > 1:
                raise ConvertError(f"{where}: 'No Finding' together with other labels: {text!r}")
            continue
        if name not in NIH_LABELS:
            raise ConvertError(f"{where}: unknown label {name!r}; known: {NIH_LABELS + [NO_FINDING]}")
        y[NIH_LABELS.index(name)] = 1.0
    return y


def read_list(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise ConvertError(f"{path}: split list not found (NIH publishes train_val_list.txt and test_list.txt)")
    # utf-8-sig: a list saved by a Windows editor starts with a BOM that would glue onto the first name
    text = path.read_text(encoding="utf-8-sig")
    return [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]


def read_xiao(path: Path) -> list[tuple[int, str, np.ndarray]]:
    """Xiao et al.'s split file: `<image name> <14 zeros/ones>` per line."""
    out = []
    for n, ln in read_list(path):
        f = ln.split()
        if len(f) != 1 + len(NIH_LABELS) or any(v not in ("0", "1") for v in f[1:]):
            raise ConvertError(f"{path} line {n}: expected '<image> <14 labels 0/1>', got {ln!r}")
        out.append((n, f[0], np.array([float(v) for v in f[1:]], np.float32)))
    return out


def build_items(src: Path, split_dir: Optional[Path], val_fraction: float, seed: int,
                problems: Problems, views: Optional[str] = None) -> tuple[dict[str, list[Item]], list[Path], dict]:
    csv_path = find_csv(src)
    if csv_path is None and split_dir is None:
        raise ConvertError(f"{src}: neither {CSV_NAMES[0]} nor {CSV_NAMES[1]} found")
    images = index_images(src, problems)
    rows: dict[str, tuple[str, np.ndarray, str]] = {}  # name -> (where, labels, patient)
    metas: dict[str, dict] = {}  # name -> sex / age / view
    bad: set[str] = set()  # rows already reported (skip mode): not reported again from the lists
    sources = []
    if csv_path is not None:
        sources.append(csv_path)
        _, recs = read_csv(csv_path, REQUIRED_COLUMNS)
        for lineno, r in recs:
            where = f"{csv_path.name} row {lineno}"
            name = r["Image Index"]
            if not name:
                problems.report("", str(csv_path), f"{where}: empty 'Image Index'")
                continue
            try:
                y = parse_findings(r["Finding Labels"], f"{where} ({name})")
            except ConvertError as e:
                problems.report(name, str(csv_path), str(e))
                bad.add(name)
                continue
            if name in rows:
                problems.report(name, str(csv_path), f"{where}: duplicate Image Index {name!r} (also {rows[name][0]})")
                continue
            rows[name] = (where, y, r["Patient ID"])
            metas[name] = row_metadata(r)

    def make(name: str, where: str, labels: np.ndarray, patient: str) -> Optional[Item]:
        path = images.get(name)
        if path is None:
            problems.report(name, name, f"{where}: image file {name} not found under {src}/images/ "
                                        f"or {src}/images_NNN/images/")
            return None
        return Item(id=name, path=str(path), labels=labels, where=where, group=patient, meta=metas.get(name, {}))

    splits: dict[str, list[Item]] = {}
    listed: set[str] = set()
    if split_dir is not None:
        split_dir = Path(split_dir)
        for split, fname in XIAO_NAMES.items():
            p = split_dir / fname
            if split == "val" and not p.exists():
                continue
            sources.append(p)
            items = []
            for n, name, y in read_xiao(p):
                where = f"{p.name} line {n}"
                if name in bad:
                    continue
                if rows and name not in rows:
                    problems.report(name, str(p), f"{where}: {name} is not in {csv_path.name}")
                    continue
                patient = rows[name][2] if name in rows else name.split("_")[0]
                it = make(name, where, y, patient)
                if it is not None:
                    items.append(it)
                listed.add(name)
            splits[split] = items
        split_source = "Xiao et al. split files (labels from those files)"
    else:
        for split, fname in LIST_NAMES.items():
            p = src / fname
            sources.append(p)
            items = []
            for n, name in read_list(p):
                where = f"{p.name} line {n}"
                if name in bad:
                    continue
                if name not in rows:
                    problems.report(name, str(p), f"{where}: {name} is not in {csv_path.name}")
                    continue
                listed.add(name)
                it = make(name, f"{rows[name][0]} ({name})", rows[name][1], rows[name][2])
                if it is not None:
                    items.append(it)
            splits[split] = items
        split_source = "official lists train_val_list.txt / test_list.txt"
    for name, (where, _, _) in rows.items():
        if name not in listed:
            lists = list(XIAO_NAMES.values()) if split_dir is not None else list(LIST_NAMES.values())
            problems.report(name, str(images.get(name, name)),
                            f"{where}: {name} is in no split list ({', '.join(lists)})")
    keep_views = parse_views(views)
    if keep_views is not None:
        if not metas:
            raise ConvertError(f"--views {views}: the NIH split files carry no '{VIEW_COLUMN}'; convert with the "
                               f"Data_Entry CSV beside them")
        splits = {k: [it for it in v if it.meta.get("view") in keep_views] for k, v in splits.items()}
    if val_fraction:
        if "val" in splits:
            raise ConvertError(f"{split_dir}: has val_official.txt; --val-fraction would split train again")
        splits["train"], splits["val"] = patient_disjoint_split(splits["train"], val_fraction, seed)
    info = {"split_source": split_source, "val_fraction": val_fraction, "split_seed": seed,
            "views": list(keep_views) if keep_views else "all",
            "labels_csv": csv_path.name if csv_path else None}
    return splits, sources, info


def convert_nih(src, out, formats: Sequence[str] = ("raw",), size: int = 256, val_fraction: float = 0.0,
                split_dir=None, on_error: str = "fail", workers: Optional[int] = None, seed: int = 0,
                jpeg_quality: int = 95, shard_size: int = 4096, progress: bool = True,
                views: Optional[str] = None, resize: str = "squash") -> Path:
    """Pack an NIH ChestX-ray14 source folder into `out`; return `out`. `views` ('PA,AP'): keep only
    images whose View Position is one of them (None: all)."""
    src, opts, problems = begin(src, formats=tuple(formats), size=size, workers=workers, on_error=on_error,
                                jpeg_quality=jpeg_quality, shard_size=shard_size, progress=progress, resize=resize)
    splits, sources, info = build_items(src, Path(split_dir) if split_dir else None, val_fraction, seed, problems,
                                        views=views)
    synthetic = (src / "README.txt").is_file() and "SYNTHETIC" in (src / "README.txt").read_text()[:200]
    return pack(dataset="nih-chestxray14" + ("-synthetic" if synthetic else ""), source=src, out=Path(out),
                splits=splits, label_names=NIH_LABELS, decode=decode_raster, opts=opts, problems=problems,
                source_files=sources, extra={"nih": info}, synthetic=synthetic)


# ----------------------------------------------------------------------------- release checks

def _count_lines(path: Path) -> int:
    """Non-blank lines of a text file (a CSV's header included)."""
    with open(path, errors="replace") as f:
        return sum(1 for line in f if line.strip())


def nih_release_facts(src: Path) -> dict:
    """What an NIH ChestX-ray14 release folder holds, checked before converting it: the labels CSV
    and its rows (= images), the images/ folder, the official lists and their lengths.

    Returns {"csv": Path, "images": rows of the CSV, "train_val": lines of train_val_list.txt,
    "test": lines of test_list.txt}; raises ConvertError naming the missing or wrong file."""
    src = Path(src)
    csv_path = find_csv(src)
    if csv_path is None:
        raise ConvertError(f"{src}: not the NIH ChestX-ray14 release: no {' or '.join(CSV_NAMES)}")
    with open(csv_path, newline="", errors="replace") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in REQUIRED_COLUMNS if c not in [h.strip() for h in header]]
    if missing:
        raise ConvertError(f"{csv_path}: not NIH's Data_Entry CSV: columns {missing} are missing")
    if not (src / "images").is_dir() and not any(src.glob("images_*/images")):
        raise ConvertError(f"{src}: no images/ or images_NNN/images/ folder (the NIH archive layout)")
    lists = {s: src / n for s, n in LIST_NAMES.items()}
    for p in lists.values():
        if not p.is_file():
            raise ConvertError(f"{src}: {p.name} is missing (NIH's official patient-wise split)")
    return {"csv": csv_path, "images": _count_lines(csv_path) - 1, "train_val": _count_lines(lists["train"]),
            "test": _count_lines(lists["test"])}


def xiao_split_counts(split_dir: Path) -> dict[str, int]:
    """Images per split of Xiao et al.'s split files (train/val/test_official.txt) in `split_dir`;
    raises ConvertError naming a missing file."""
    paths = {s: Path(split_dir) / n for s, n in XIAO_NAMES.items()}
    for p in paths.values():
        if not p.is_file():
            raise ConvertError(f"{split_dir}: {p.name} is missing (Xiao et al.'s split files)")
    return {s: _count_lines(p) for s, p in paths.items()}
