"""Any folder of images + a labels CSV -> packed dataset (PadChest, VinDr-CXR, RSNA, your archive).

Inputs: image files (PNG 8/16-bit, JPEG, DICOM; `decode.decode_file` picks the decoder by suffix)
under `src`, and one or more labels CSVs in the dataset's own columns:

- `path_col` names each image, relative to `src` (+ `path_suffix`, e.g. VinDr's `image_id` + `.dicom`);
  a name that is not there is looked up by file name anywhere under `src` (PadChest keeps its
  images in numbered sub-folders the CSV does not name), and must then match exactly one file.
- labels are either one column per label (`label_cols`, cells in the declared `positive` /
  `negative` / `uncertain` value sets, case-insensitive; blank cells by `blank`), or one
  multi-valued column (`multi_col`) joined by `sep` (NIH's `Finding|Finding`) or written as a
  Python list (PadChest's `['pleural effusion', 'cardiomegaly']`); `none_values` (e.g.
  `No Finding`, `normal`) mean no label; the label names are `label_cols` when given, else every
  value found, sorted.
- splits come from `split_col` (train / val / test, with the usual spellings), from a `SPLIT=`
  prefix on a CSV (`train=image_labels_train.csv test=image_labels_test.csv`), or every row is
  `train`; `test_fraction` and then `val_fraction` carve patient-disjoint splits out of train
  (patients from `patient_col`, else each image is its own patient).
- `keep` ({column: values}) leaves out the rows whose column holds another value (PadChest's
  lateral views: `Projection` not in PA, AP, AP_horizontal); they are counted, not errors.
- an image named on several rows (VinDr-CXR: one row per radiologist) is an error unless
  `merge_rows` says how to combine them: `any` (positive if any row is) or `majority`.

Everything else (decode, grey, resize, the writers, the manifest, --on-error, atomic output) is
`pack.pack`, the same path as the NIH / CheXpert / DICOM converters. Every check on the CSVs runs
before the first image is decoded.
"""
from __future__ import annotations

import ast
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .common import (SPLIT_NAMES, ConvertError, Item, Problems, carve, parse_age, parse_sex, parse_view,
                     read_csv)
from .decode import decode_file
from .pack import begin, pack

POSITIVE = ("1", "1.0", "true", "yes", "positive")
NEGATIVE = ("0", "0.0", "false", "no", "negative")
UNCERTAIN_AS = {"zeros": 0.0, "ones": 1.0, "ignore": math.nan}
BLANK = ("zeros", "ignore", "error")
MERGE = ("error", "any", "majority")
SHOW = 5  # how many missing paths an error names


@dataclass
class LabelSpec:
    """How the CSV's cells become a label vector (float32 [C], NaN = ignored)."""
    label_cols: Optional[list[str]] = None  # one 0/1 column per label, or the declared names of multi_col
    multi_col: Optional[str] = None  # one column listing the findings
    sep: str = "|"  # NIH joins findings with '|'
    none_values: tuple[str, ...] = ("No Finding",)  # multi_col values that mean "no label"
    unlisted: str = "error"  # multi_col values outside label_cols: error | ignore
    positive: tuple[str, ...] = POSITIVE
    negative: tuple[str, ...] = NEGATIVE
    uncertain: tuple[str, ...] = ()  # e.g. CheXpert-style "-1", "-1.0"
    uncertain_as: str = "ignore"  # NaN: masked in the loss, the safe default for unknown data
    blank: str = "zeros"  # blank = not mentioned -> negative (CheXpert's convention)
    names: list[str] = field(default_factory=list)  # resolved label names

    def check(self) -> None:
        if self.label_cols is None and self.multi_col is None:
            raise ConvertError("give the labels as --label-cols A,B,C (one column per label) or as --multi-col COL "
                               "(one column listing the findings; --label-cols then declares the names)")
        if self.uncertain_as not in UNCERTAIN_AS:
            raise ConvertError(f"--uncertain-as must be one of {list(UNCERTAIN_AS)}, got {self.uncertain_as!r}")
        if self.blank not in BLANK:
            raise ConvertError(f"--blank must be one of {list(BLANK)}, got {self.blank!r}")
        if self.unlisted not in ("error", "ignore"):
            raise ConvertError(f"--unlisted must be 'error' or 'ignore', got {self.unlisted!r}")
        if self.label_cols is not None:
            dup = sorted({n for n in self.label_cols if self.label_cols.count(n) > 1})
            if dup or not self.label_cols or any(not n for n in self.label_cols):
                raise ConvertError(f"--label-cols must name distinct, non-empty labels; got {self.label_cols}")
        sets = {"positive": self.positive, "negative": self.negative, "uncertain": self.uncertain}
        low = {k: {v.strip().lower() for v in vs} for k, vs in sets.items()}
        for a, b in (("positive", "negative"), ("positive", "uncertain"), ("negative", "uncertain")):
            both = low[a] & low[b]
            if both:
                raise ConvertError(f"value(s) {sorted(both)} are both --{a} and --{b}")
        self._pos, self._neg, self._unc = low["positive"], low["negative"], low["uncertain"]
        self._none = {n.strip().lower() for n in self.none_values}

    def set_names(self, names: list[str]) -> None:
        self.names = list(names)
        self._index = {n.lower(): j for j, n in enumerate(self.names)}  # multi_col value -> label position

    # -- one column per label -------------------------------------------------------------------
    def cell(self, value: str, col: str, where: str) -> float:
        v = value.strip().lower()
        if v == "":
            if self.blank == "error":
                raise ConvertError(f"{where}: column {col!r} is blank (--blank error)")
            return 0.0 if self.blank == "zeros" else math.nan
        if v in self._pos:
            return 1.0
        if v in self._neg:
            return 0.0
        if v in self._unc:
            return UNCERTAIN_AS[self.uncertain_as]
        declared = f"positive {sorted(self._pos)}, negative {sorted(self._neg)}"
        declared += f", uncertain {sorted(self._unc)}" if self._unc else ""
        raise ConvertError(f"{where}: column {col!r} has {value!r}, outside the declared values ({declared}; "
                           f"set them with --positive / --negative / --uncertain)")

    def columns(self, row: dict, where: str) -> np.ndarray:
        return np.array([self.cell(row[c], c, where) for c in self.names], np.float32)  # [C]

    # -- one multi-valued column ----------------------------------------------------------------
    def tokens(self, value: str, where: str) -> list[str]:
        """A multi-valued cell -> its findings (none_values dropped)."""
        v = value.strip()
        if v.startswith("[") and v.endswith("]"):  # PadChest writes a Python list literal
            try:
                parsed = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                raise ConvertError(f"{where}: column {self.multi_col!r} has {value!r}, which looks like a list "
                                   f"but does not parse") from None
            toks = [str(t) for t in parsed]
        else:
            toks = v.split(self.sep) if self.sep else [v]
        none = self._none
        return [t.strip() for t in toks if t.strip() and t.strip().lower() not in none]

    def multi(self, value: str, where: str) -> np.ndarray:
        y = np.zeros(len(self.names), np.float32)  # [C]
        for t in self.tokens(value, where):
            j = self._index.get(t.lower())
            if j is None:
                if self.unlisted == "ignore":
                    continue
                raise ConvertError(f"{where}: column {self.multi_col!r} has {t!r}, which is not a declared label "
                                   f"({self.names}) nor a --none-values entry {list(self.none_values)}; "
                                   f"use --unlisted ignore to drop such values")
            y[j] = 1.0
        return y

    def labels(self, row: dict, where: str) -> np.ndarray:
        return self.multi(row[self.multi_col], where) if self.multi_col else self.columns(row, where)


def parse_csv_args(labels_csv) -> list[tuple[Optional[str], Path]]:
    """`[SPLIT=]PATH` entries -> [(split or None, path)]."""
    if isinstance(labels_csv, (str, os.PathLike)):
        labels_csv = [labels_csv]
    out = []
    for entry in labels_csv:
        s = str(entry)
        head, eq, tail = s.partition("=")
        if eq and head.lower() in SPLIT_NAMES and "/" not in head:
            out.append((SPLIT_NAMES[head.lower()], Path(tail)))
        else:
            out.append((None, Path(s)))
    if not out:
        raise ConvertError("--labels-csv: no CSV given")
    return out


class _Finder:
    """CSV path -> file: `src/<path>`, else the one file of that name anywhere under `src` (an
    index built on first need, one walk of the tree). Plain os.path strings: at 112k rows pathlib's
    object overhead was half of the whole check."""

    def __init__(self, src: Path):
        self.src = str(src)
        self._by_name: Optional[dict[str, list[str]]] = None

    def find(self, rel: str) -> tuple[Optional[str], str]:
        p = os.path.join(self.src, rel)
        if os.path.isfile(p):
            return p, ""
        if self._by_name is None:
            self._by_name = {}
            for dirpath, _, files in os.walk(self.src):
                for f in files:
                    self._by_name.setdefault(f, []).append(os.path.join(dirpath, f))
        name = os.path.basename(rel)
        found = self._by_name.get(name, [])
        if len(found) == 1:
            return found[0], ""
        if found:
            return None, f"{len(found)} files named {name!r} under {self.src} (name the sub-folder in the CSV)"
        return None, "not found"


@dataclass
class _Row:
    ident: str
    path: str
    split: str
    group: str
    where: str
    labels: list  # one float32 [C] per CSV row naming this image
    meta: dict  # sex / age / view from --meta-cols (the first row naming the image)


META_PARSERS = {"sex": parse_sex, "age": parse_age, "view": parse_view}


def check_meta_cols(meta_cols: Optional[dict[str, str]]) -> dict[str, str]:
    """--meta-cols {metadata name: CSV column}: names must be sex, age or view."""
    meta_cols = dict(meta_cols or {})
    bad = [k for k in meta_cols if k not in META_PARSERS]
    if bad:
        raise ConvertError(f"--meta-cols: unknown metadata name(s) {bad}; known: {list(META_PARSERS)} "
                           f"(the patient comes from --patient-col)")
    return meta_cols


def build_items(src: Path, csvs: list[tuple[Optional[str], Path]], path_col: str, spec: LabelSpec,
                problems: Problems, *, split_col: Optional[str] = None, patient_col: Optional[str] = None,
                path_suffix: str = "", merge_rows: str = "error", keep: Optional[dict[str, Sequence[str]]] = None,
                meta_cols: Optional[dict[str, str]] = None):
    """Read and check every CSV -> ({split: [Item]}, label names, rows left out by `keep`).
    Raises before any decoding."""
    spec.check()
    meta_cols = check_meta_cols(meta_cols)
    keep = {c: {v.strip().lower() for v in vs} for c, vs in (keep or {}).items()}
    if merge_rows not in MERGE:
        raise ConvertError(f"--merge-rows must be one of {list(MERGE)}, got {merge_rows!r}")
    if split_col and any(s for s, _ in csvs):
        raise ConvertError("--split-col and SPLIT=CSV prefixes both set the split; use one of them")
    tables = []
    left_out = 0  # rows --keep leaves out (other views, excluded studies): not errors
    for split, p in csvs:
        required = [path_col] + ([spec.multi_col] if spec.multi_col else list(spec.label_cols)) + \
            [c for c in (split_col, patient_col) if c] + list(keep) + list(meta_cols.values())
        header, rows = read_csv(p, required)  # a missing column lists the ones the CSV has
        kept = [(n, r) for n, r in rows if all(r[c].strip().lower() in vs for c, vs in keep.items())]
        left_out += len(rows) - len(kept)
        tables.append((split, p, kept))
    if spec.multi_col and spec.label_cols is None:  # names: every finding the CSVs list
        found = set()
        for _, p, rows in tables:
            for lineno, r in rows:
                found.update(spec.tokens(r[spec.multi_col], f"{p.name} row {lineno}"))
        spec.set_names(sorted(found))
        if not spec.names:
            raise ConvertError(f"column {spec.multi_col!r} lists no finding in any row (all blank or "
                               f"{list(spec.none_values)}): nothing to learn")
    else:
        spec.set_names(spec.label_cols)
    finder = _Finder(src)
    by_id: dict[str, _Row] = {}
    missing: dict[str, tuple[str, str]] = {}  # CSV path -> (where, why), once per image
    for csv_split, p, rows in tables:
        for lineno, r in rows:
            where = f"{p.name} row {lineno}"
            rel = r[path_col]
            if not rel:
                problems.report("", str(p), f"{where}: empty {path_col!r}")
                continue
            try:
                y = spec.labels(r, where)
            except ConvertError as e:
                problems.report(rel, str(p), str(e))
                continue
            split = csv_split or "train"
            if split_col:
                split = SPLIT_NAMES.get(r[split_col].strip().lower())
                if split is None:
                    problems.report(rel, str(p), f"{where}: column {split_col!r} has {r[split_col]!r}; expected "
                                                 f"one of {sorted(SPLIT_NAMES)}")
                    continue
            group = (r[patient_col] if patient_col else "") or rel
            if rel in missing:
                continue
            prev = by_id.get(rel)
            if prev is not None:
                if merge_rows == "error":
                    problems.report(rel, str(prev.path), f"{where}: {rel!r} again (first at {prev.where}); "
                                                         f"use --merge-rows any|majority for one row per reader")
                    continue
                if prev.split != split or prev.group != group:
                    problems.report(rel, str(prev.path),
                                    f"{where}: {rel!r} is in split {split!r} / patient {group!r} here but "
                                    f"{prev.split!r} / {prev.group!r} at {prev.where}")
                    continue
                prev.labels.append(y)
                continue
            path, why = finder.find(rel + path_suffix)
            if path is None:
                missing[rel] = (where, why)
                continue
            meta = {k: META_PARSERS[k](r[col]) for k, col in meta_cols.items()}
            by_id[rel] = _Row(rel, path, split, group, where, [y], meta)
    if missing:
        first = "; ".join(f"{w}: {rel + path_suffix} {why}" for rel, (w, why) in list(missing.items())[:SHOW])
        msg = (f"{len(missing)} image(s) named in column {path_col!r} do not exist under {src}"
               f" (first {min(SHOW, len(missing))}: {first})")
        if problems.on_error == "fail":
            raise ConvertError(f"{msg} (use --on-error skip to skip them)")
        for rel, (w, why) in missing.items():
            problems.report(rel, str(src / (rel + path_suffix)), f"{w}: {rel + path_suffix} {why}")
    splits: dict[str, list[Item]] = {}
    for row in by_id.values():
        item = Item(id=row.ident, path=str(row.path), labels=_merge(row.labels, merge_rows),
                    where=f"{row.where} ({row.ident})", group=row.group, meta=row.meta)
        splits.setdefault(row.split, []).append(item)
    order = [s for s in ("train", "val", "test") if s in splits]
    return {s: splits[s] for s in order}, list(spec.names), left_out


def _merge(labels: list, how: str) -> np.ndarray:
    """Several readers' rows of one image -> one vector; NaN (uncertain / blank ignored) counts as
    no vote, and a label no reader decided stays NaN."""
    if len(labels) == 1:
        return labels[0]
    y = np.stack(labels)  # [R, C]
    known = ~np.isnan(y)
    votes = np.where(known, y, 0.0)
    n = known.sum(axis=0)  # [C]
    if how == "any":
        out = (votes.max(axis=0) > 0).astype(np.float32)
    else:  # majority of the readers that decided; a tie is negative
        out = (votes.sum(axis=0) > n / 2).astype(np.float32)
    return np.where(n > 0, out, np.nan).astype(np.float32)


def convert_images(src, labels_csv, out, *, path_col: str, label_cols: Optional[Sequence[str]] = None,
                   multi_col: Optional[str] = None, sep: str = "|", none_values: Sequence[str] = ("No Finding",),
                   unlisted: str = "error", positive: Sequence[str] = POSITIVE, negative: Sequence[str] = NEGATIVE,
                   uncertain: Sequence[str] = (), uncertain_as: str = "ignore", blank: str = "zeros",
                   split_col: Optional[str] = None, patient_col: Optional[str] = None, path_suffix: str = "",
                   merge_rows: str = "error", keep: Optional[dict[str, Sequence[str]]] = None,
                   meta_cols: Optional[dict[str, str]] = None, test_fraction: float = 0.0, val_fraction: float = 0.0,
                   dataset: str = "images", formats: Sequence[str] = ("raw",), size: int = 256,
                   on_error: str = "fail", workers: Optional[int] = None, seed: int = 0, jpeg_quality: int = 95,
                   shard_size: int = 4096, progress: bool = True, resize: str = "squash") -> Path:
    """Pack the images named by `labels_csv` (one path or several `[SPLIT=]PATH`) into `out`."""
    src, opts, problems = begin(src, formats=tuple(formats), size=size, workers=workers, on_error=on_error,
                                jpeg_quality=jpeg_quality, shard_size=shard_size, progress=progress, resize=resize)
    csvs = parse_csv_args(labels_csv)
    spec = LabelSpec(label_cols=list(label_cols) if label_cols else None, multi_col=multi_col, sep=sep,
                     none_values=tuple(none_values), unlisted=unlisted, positive=tuple(positive),
                     negative=tuple(negative), uncertain=tuple(uncertain), uncertain_as=uncertain_as, blank=blank)
    splits, names, left_out = build_items(src, csvs, path_col, spec, problems, split_col=split_col,
                                          patient_col=patient_col, path_suffix=path_suffix, merge_rows=merge_rows,
                                          keep=keep, meta_cols=meta_cols)
    if not splits:
        raise ConvertError(f"{', '.join(str(p) for _, p in csvs)}: no usable rows")
    if test_fraction:
        carve(splits, "test", test_fraction, seed, "--test-fraction")
    if val_fraction:
        carve(splits, "val", val_fraction, seed + 1, "--val-fraction")
    splits = {s: splits[s] for s in ("train", "val", "test") if s in splits}
    extra = {"images": {
        "labels_csv": [f"{s}={p.absolute()}" if s else str(p.absolute()) for s, p in csvs],
        "path_col": path_col, "path_suffix": path_suffix, "label_cols": spec.label_cols, "multi_col": multi_col,
        "sep": sep if multi_col else None, "none_values": list(none_values) if multi_col else None,
        "unlisted": unlisted if multi_col else None,
        "positive": list(positive), "negative": list(negative), "uncertain": list(uncertain),
        "uncertain_as": uncertain_as, "blank": blank, "split_col": split_col, "patient_col": patient_col,
        "merge_rows": merge_rows, "meta_cols": meta_cols or {}, "keep": {c: list(v) for c, v in (keep or {}).items()}, "rows_left_out": left_out,
        "test_fraction": test_fraction, "val_fraction": val_fraction,
        "split_seed": seed},
        "preprocessing": {"decoder": "decode_file: PNG/JPEG via decode_raster, DICOM (.dcm/.dicom/no suffix) "
                                     "via decode_dicom"}}
    return pack(dataset=dataset, source=src, out=Path(out), splits=splits, label_names=names, decode=decode_file,
                opts=opts, problems=problems, source_files=[p for _, p in csvs], extra=extra)
