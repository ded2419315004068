"""CheXpert (v1.0, small or full release) -> packed dataset.

Source layout: `CheXpert-v1.0-small/{train,valid}.csv` and
`CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg`; `Path` in the
CSVs starts with `CheXpert-v1.0-small/` (or `CheXpert-v1.0/`). `src` may be that folder or its
parent. Splits: `train` (train.csv) and `test` (valid.csv, which the paper evaluates on);
`val_fraction` carves a patient-disjoint `val` from train.

Label values: 1.0 positive, 0.0 negative, -1.0 uncertain, blank = not mentioned (-> 0, as the
paper's code). Uncertainty policies (Irvin et al. 2019 names):
  ones   U-Ones: uncertain -> 1        zeros  U-Zeros: uncertain -> 0
  ignore uncertain -> NaN (masked in the loss)
  paper  U-Ones for Atelectasis and Edema, U-Zeros for every other label (the paper's code;
         for the competition labels that is U-Zeros for Cardiomegaly, Consolidation, Pleural Effusion)
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .common import (ConvertError, Item, Problems, parse_age, parse_sex, parse_view, parse_views,
                     patient_disjoint_split, read_csv)
from .decode import decode_raster
from .pack import begin, pack

CHEXPERT_ALL = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
PAPER_U_ONES = ("Atelectasis", "Edema")
POLICIES = ("paper", "ones", "zeros", "ignore")
CSV_FILES = {"train": "train.csv", "test": "valid.csv"}
RELEASE_PREFIXES = ("CheXpert-v1.0-small", "CheXpert-v1.0")


def uncertain_value(label: str, policy: str) -> float:
    """What an uncertain (-1.0) `label` becomes under `policy`."""
    if policy == "ones":
        return 1.0
    if policy == "zeros":
        return 0.0
    if policy == "ignore":
        return math.nan
    if policy == "paper":
        return 1.0 if label in PAPER_U_ONES else 0.0
    raise ConvertError(f"--uncertain must be one of {list(POLICIES)}, got {policy!r}")


def map_labels(row: dict, names: Sequence[str], policy: str, where: str) -> np.ndarray:
    """CheXpert cells -> float32 [C]: '1.0' -> 1, '0.0' / blank -> 0, '-1.0' -> the policy."""
    y = np.zeros(len(names), np.float32)
    for j, name in enumerate(names):
        cell = row[name].strip()
        if cell == "":
            continue  # not mentioned: negative (the paper's code fills blanks with 0)
        try:
            v = float(cell)
        except ValueError:
            raise ConvertError(f"{where}: column {name!r} has {cell!r}; expected 1.0, 0.0, -1.0 or blank") from None
        if v == 1.0:
            y[j] = 1.0
        elif v == 0.0:
            y[j] = 0.0
        elif v == -1.0:
            y[j] = uncertain_value(name, policy)
        else:
            raise ConvertError(f"{where}: column {name!r} has {cell!r}; expected 1.0, 0.0, -1.0 or blank")
    return y


def find_root(src: Path) -> Path:
    """The folder holding train.csv / valid.csv: `src` itself or its CheXpert-v1.0[-small] child."""
    if (src / "train.csv").is_file() or (src / "valid.csv").is_file():
        return src
    for name in RELEASE_PREFIXES:
        if (src / name / "train.csv").is_file() or (src / name / "valid.csv").is_file():
            return src / name
    raise ConvertError(f"{src}: no train.csv / valid.csv here or in {src}/CheXpert-v1.0-small/ "
                       f"or {src}/CheXpert-v1.0/")


def resolve_path(root: Path, path: str) -> Path:
    """CSV `Path` -> file: the first component names the release folder, which is `root` itself
    (whatever the user renamed it to); other paths are taken relative to `root`."""
    head, _, rest = path.replace("\\", "/").partition("/")
    if head in RELEASE_PREFIXES and rest:
        return root / rest
    return root / path


def row_metadata(r: dict, frontal_lateral: str) -> dict:
    """sex / age / view of one CSV row; the view is AP / PA (the 'AP/PA' column) for a frontal,
    LATERAL for a lateral, FRONTAL for a frontal without AP/PA."""
    if frontal_lateral == "Lateral":
        view = "LATERAL"
    else:
        view = parse_view(r.get("AP/PA", "")) or "FRONTAL"
    return {"sex": parse_sex(r.get("Sex", "")), "age": parse_age(r.get("Age", "")), "view": view}


def view_filter(views: str) -> Optional[tuple[str, ...]]:
    """--views: 'frontal' (the paper's default), 'all', or a list of view names ('PA,AP', 'LATERAL')."""
    if views == "frontal":
        return None
    try:
        return parse_views(views)
    except ConvertError as e:
        raise ConvertError(f"{e}; or 'frontal' / 'all'") from None


def patient_of(path: str) -> str:
    for part in path.split("/"):
        if part.startswith("patient"):
            return part
    return path


def build_items(src: Path, labels: str, uncertain: str, views: str, problems: Problems):
    root = find_root(src)
    if labels not in ("competition", "all"):
        raise ConvertError(f"--labels must be 'competition' or 'all', got {labels!r}")
    keep_views = view_filter(views)
    uncertain_value("Edema", uncertain)  # validates the policy name
    names = COMPETITION if labels == "competition" else CHEXPERT_ALL
    splits, sources = {}, []
    for split, fname in CSV_FILES.items():
        p = root / fname
        if not p.is_file():
            raise ConvertError(f"{p}: not found (CheXpert publishes train.csv and valid.csv)")
        sources.append(p)
        _, rows = read_csv(p, ["Path", "Frontal/Lateral", *names])
        items = []
        for lineno, r in rows:
            where = f"{fname} row {lineno}"
            view = r["Frontal/Lateral"]
            if view not in ("Frontal", "Lateral"):
                problems.report(r["Path"], str(p), f"{where}: Frontal/Lateral is {view!r}, expected Frontal or Lateral")
                continue
            if views == "frontal" and view != "Frontal":
                continue
            meta = row_metadata(r, view)
            if keep_views is not None and meta["view"] not in keep_views:
                continue
            try:
                y = map_labels(r, names, uncertain, where)
            except ConvertError as e:
                problems.report(r["Path"], str(p), str(e))
                continue
            if not r["Path"]:
                problems.report("", str(p), f"{where}: empty Path")
                continue
            f = resolve_path(root, r["Path"])
            if not f.is_file():
                problems.report(r["Path"], str(f), f"{where}: image {f} not found")
                continue
            items.append(Item(id=r["Path"], path=str(f), labels=y, where=f"{where} ({r['Path']})",
                              group=patient_of(r["Path"]), meta=meta))
        splits[split] = items
    return root, splits, sources, names


def convert_chexpert(src, out, formats: Sequence[str] = ("raw",), size: int = 256, uncertain: str = "paper",
                     labels: str = "competition", views: str = "frontal", val_fraction: float = 0.0,
                     on_error: str = "fail", workers: Optional[int] = None, seed: int = 0, jpeg_quality: int = 95,
                     shard_size: int = 4096, progress: bool = True, resize: str = "crop") -> Path:
    """Pack a CheXpert release folder into `out`; return `out`. resize: crop (default) keeps the
    portrait frames undistorted (decode.RESIZE_MODES)."""
    src, opts, problems = begin(src, formats=tuple(formats), size=size, workers=workers, on_error=on_error,
                                jpeg_quality=jpeg_quality, shard_size=shard_size, progress=progress, resize=resize)
    root, splits, sources, names = build_items(src, labels, uncertain, views, problems)
    if val_fraction:
        splits["train"], splits["val"] = patient_disjoint_split(splits["train"], val_fraction, seed)
    extra = {"chexpert": {"uncertain": uncertain, "labels": labels, "views": views, "root": str(root),
                          "val_fraction": val_fraction, "split_seed": seed,
                          "splits": {"train": "train.csv", "test": "valid.csv (the paper evaluates on it)"},
                          "blank": 0.0}}
    # `fasttrain convert synthetic --layout chexpert` leaves a README.txt saying SYNTHETIC in the release folder
    readme = root / "README.txt"
    synthetic = readme.is_file() and "SYNTHETIC" in readme.read_text()[:200]
    return pack(dataset="chexpert" + ("-synthetic" if synthetic else ""), source=src, out=Path(out), splits=splits,
                label_names=list(names), decode=decode_raster, opts=opts, problems=problems, source_files=sources,
                extra=extra, synthetic=synthetic)


# ----------------------------------------------------------------------------- release checks

def chexpert_release_root(src: Path) -> Optional[Path]:
    """The folder holding both train.csv and valid.csv (`src` or its CheXpert-v1.0[-small] child),
    or None when `src` is no CheXpert release."""
    src = Path(src)
    for root in (src, *(src / n for n in RELEASE_PREFIXES)):
        if (root / "train.csv").is_file() and (root / "valid.csv").is_file():
            return root
    return None


def _frontal_rows(csv_path: Path) -> tuple[int, int]:
    """(rows, frontal rows) of a CheXpert CSV; ConvertError when its columns are not CheXpert's."""
    with open(csv_path, newline="", errors="replace") as f:
        rows = csv.DictReader(f)
        missing = [c for c in ["Path", "Frontal/Lateral", *COMPETITION] if c not in (rows.fieldnames or [])]
        if missing:
            raise ConvertError(f"{csv_path}: not CheXpert v1.0's {csv_path.name}: columns {missing} are missing")
        n = frontal = 0
        for r in rows:
            n += 1
            frontal += (r.get("Frontal/Lateral") or "").strip().lower() == "frontal"
        return n, frontal


def chexpert_release_facts(src: Path) -> dict:
    """What a CheXpert v1.0 release folder holds, checked before converting it.

    Returns {"root": the folder of the CSVs, "train_rows": rows of train.csv, "train_frontal":
    its frontal rows, "valid_frontal": valid.csv's frontal rows}; raises ConvertError naming the
    missing or wrong file."""
    root = chexpert_release_root(src)
    if root is None:
        raise ConvertError(f"{src}: not the CheXpert v1.0 release: no train.csv and valid.csv here or in "
                           f"CheXpert-v1.0-small/ or CheXpert-v1.0/")
    train_rows, train_frontal = _frontal_rows(root / "train.csv")
    _, valid_frontal = _frontal_rows(root / "valid.csv")
    return {"root": root, "train_rows": train_rows, "train_frontal": train_frontal, "valid_frontal": valid_frontal}
