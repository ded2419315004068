"""`fasttrain convert {nih,chexpert,dicom,mimic-jpg,images,synthetic} ...`: argument parsing only; the work is
in nih.py / chexpert.py / dicom.py (DICOM and MIMIC-CXR-JPG) / images.py / synthetic.py."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from fasttrain.format.manifest import FORMATS

from .chexpert import convert_chexpert
from .common import ConvertError
from .decode import RESIZE_MODES
from .dicom import convert_dicom, convert_mimic_jpg
from .images import MERGE, NEGATIVE, POSITIVE, convert_images
from .nih import convert_nih
from .synthetic import generate_phantoms


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, help="source dataset folder")
    p.add_argument("--out", required=True, help="packed output folder (must not exist)")
    p.add_argument("--format", nargs="+", default=["raw"], choices=FORMATS, dest="formats",
                   help="packed formats to write, several in one pass (default: raw)")
    p.add_argument("--size", type=int, default=256, help="square output size (default 256, as the paper)")
    p.add_argument("--resize", choices=RESIZE_MODES, default=None,
                   help="fitting a frame to the square: crop = shorter side to --size, centre crop; squash = "
                        "whole frame to --size x --size; pad = longer side to --size on black (default: crop "
                        "for chexpert / mimic-jpg / dicom, squash for nih (square frames) and images)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="carve a patient-disjoint 'val' split of this fraction from train")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="bad items: stop with an error (default) or skip them and list them in the manifest")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the DALI shards")
    p.add_argument("--shard-size", type=int, default=4096, help="samples per DALI shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _policies(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uncertain", choices=("paper", "ones", "zeros", "ignore"), default="paper",
                   help="uncertain (-1) labels: paper = U-Ones for Atelectasis/Edema, U-Zeros otherwise")
    p.add_argument("--labels", choices=("competition", "all"), default="competition",
                   help="competition = the 5 CheXpert competition labels; all = every observation column")


VIEWS_HELP = "'frontal' = PA or AP (the paper), 'all', or view names to keep, e.g. PA or PA,AP or LATERAL"


def _mimic_csvs(p: argparse.ArgumentParser) -> None:
    """MIMIC-CXR's metadata / split CSVs and view filter: the same for the DICOM and the JPG release."""
    p.add_argument("--metadata-csv", default=None, help="MIMIC-CXR metadata CSV (default: beside --labels-csv)")
    p.add_argument("--split-csv", default=None, help="MIMIC-CXR split CSV (default: beside --labels-csv)")
    p.add_argument("--views", default="frontal", help="ViewPosition filter: " + VIEWS_HELP)
    p.add_argument("--demographics-csv", default=None,
                   help="subject_id -> sex / age (MIMIC-IV hosp/patients.csv: gender, anchor_age), packed as metadata")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fasttrain convert", description="pack a chest X-ray dataset into raw / ffcv / dali")
    sub = ap.add_subparsers(dest="source", required=True)
    p = sub.add_parser("nih", help="NIH ChestX-ray14 (Data_Entry CSV, images[_NNN]/, split lists)")
    _common(p)
    p.add_argument("--split-dir", default=None,
                   help="read Xiao et al.'s train_official.txt / val_official.txt / test_official.txt from here")
    p.add_argument("--views", default=None, help="keep only these View Position values, e.g. PA or PA,AP (default: all)")
    p = sub.add_parser("chexpert", help="CheXpert v1.0 (train.csv -> train, valid.csv -> test)")
    _common(p)
    _policies(p)
    p.add_argument("--views", default="frontal", help="Frontal/Lateral + AP/PA filter: " + VIEWS_HELP)
    p = sub.add_parser("dicom", help="DICOM files + a CheXpert-convention labels CSV (MIMIC-CXR style)")
    _common(p)
    _policies(p)
    p.add_argument("--labels-csv", "--csv", required=True, dest="labels_csv",
                   help="labels CSV: a path/file/dicom_id column, CheXpert label columns, optional split; "
                        "or MIMIC-CXR's mimic-cxr-2.0.0-chexpert.csv (joined with the metadata / split CSVs)")
    _mimic_csvs(p)
    p = sub.add_parser("mimic-jpg", help="MIMIC-CXR-JPG as published (files/pNN/.../<dicom_id>.jpg + its CSVs)")
    _common(p)
    _policies(p)
    p.add_argument("--labels-csv", "--csv", default=None, dest="labels_csv",
                   help="per-study labels (default: mimic-cxr-2.0.0-chexpert.csv[.gz] in --src; "
                        "mimic-cxr-2.0.0-negbio.csv.gz for the NegBio labeler)")
    _mimic_csvs(p)
    _images_parser(sub)
    p = sub.add_parser("synthetic", help="write SYNTHETIC phantoms in the NIH or CheXpert source layout")
    p.add_argument("--out", required=True, help="source folder to write (must not exist)")
    p.add_argument("--layout", choices=("nih", "chexpert"), default="nih",
                   help="nih: Data_Entry CSV + images/ + split lists; chexpert: CheXpert-v1.0-small/ with "
                        "train.csv, valid.csv (the test patients) and patientNNNNN/studyN/viewN_*.jpg")
    p.add_argument("--difficulty", choices=("easy", "hard"), default="easy",
                   help="easy: large contrasty signs (a random encoder separates them); hard: small or "
                        "shape-defined signs under strong label-independent nuisance")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of patients in test_list.txt")
    p.add_argument("--workers", type=int, default=1, help="drawing processes (default 1)")
    p.add_argument("--no-progress", action="store_true")
    return ap


def _csv_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _keep(entries: list[str]) -> dict[str, list[str]]:
    out = {}
    for e in entries:
        col, eq, vals = e.partition("=")
        if not eq or not col.strip() or not _csv_list(vals):
            raise ConvertError(f"--keep {e!r}: expected COL=VALUE[,VALUE...]")
        out[col.strip()] = _csv_list(vals)
    return out


def _meta_cols(text) -> dict[str, str]:
    """'sex=Sex,age=Age' -> {"sex": "Sex", "age": "Age"}."""
    out = {}
    for e in _csv_list(text or ""):
        name, eq, col = e.partition("=")
        if not eq or not name.strip() or not col.strip():
            raise ConvertError(f"--meta-cols {e!r}: expected NAME=COLUMN (NAME one of sex, age, view)")
        out[name.strip()] = col.strip()
    return out


def _images_parser(sub) -> None:
    """`fasttrain convert images`: any image folder + labels CSV (converters/images.py)."""
    p = sub.add_parser("images", help="any folder of PNG / JPEG / DICOM files + a labels CSV "
                                      "(PadChest, VinDr-CXR, ...)")
    _common(p)
    p.add_argument("--labels-csv", "--csv", required=True, nargs="+", dest="labels_csv", metavar="[SPLIT=]CSV",
                   help="labels CSV(s); prefix with train= / val= / test= to put a whole CSV in one split")
    p.add_argument("--path-col", required=True, help="column naming each image, relative to --src")
    p.add_argument("--path-suffix", default="", help="appended to --path-col values (VinDr-CXR: .dicom)")
    p.add_argument("--label-cols", type=_csv_list, default=None, metavar="A,B,C",
                   help="one column per label (values in --positive / --negative / --uncertain); with "
                        "--multi-col: the label names to keep, in this order")
    p.add_argument("--multi-col", default=None, help="one column listing the findings (NIH's Finding Labels)")
    p.add_argument("--sep", default="|", help="separator of --multi-col values (default '|'); PadChest's "
                                              "Python-list cells are read as lists")
    p.add_argument("--none-values", type=_csv_list, default=["No Finding"], metavar="V,W",
                   help="--multi-col values meaning no finding (default 'No Finding')")
    p.add_argument("--unlisted", choices=("error", "ignore"), default="error",
                   help="--multi-col values not in --label-cols: error (default) or ignore")
    p.add_argument("--positive", type=_csv_list, default=list(POSITIVE), metavar="V,W",
                   help=f"cell values meaning positive (case-insensitive; default {','.join(POSITIVE)})")
    p.add_argument("--negative", type=_csv_list, default=list(NEGATIVE), metavar="V,W",
                   help=f"cell values meaning negative (default {','.join(NEGATIVE)})")
    p.add_argument("--uncertain", type=_csv_list, default=[], metavar="V,W",
                   help="cell values meaning uncertain (e.g. -1,-1.0); mapped by --uncertain-as")
    p.add_argument("--uncertain-as", choices=("ignore", "zeros", "ones"), default="ignore",
                   help="uncertain values become NaN (ignored in the loss; default), 0 or 1")
    p.add_argument("--blank", choices=("zeros", "ignore", "error"), default="zeros",
                   help="blank label cells: 0 (default, 'not mentioned'), NaN, or an error")
    p.add_argument("--split-col", default=None, help="column holding train / val / test")
    p.add_argument("--patient-col", default=None, help="column holding the patient id (patient-disjoint splits)")
    p.add_argument("--meta-cols", default=None, metavar="sex=COL,age=COL,view=COL",
                   help="CSV columns packed as per-image metadata (evaluate --by): sex (M/F/Male/Female), "
                        "age (years), view (PA, AP, LATERAL, ...)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="carve a patient-disjoint 'test' split of this fraction from train (before --val-fraction)")
    p.add_argument("--merge-rows", choices=MERGE, default="error",
                   help="an image on several rows (one per reader): error (default), any, majority")
    p.add_argument("--keep", action="append", default=[], metavar="COL=V,W",
                   help="only rows whose COL is one of these values (repeatable), e.g. Projection=PA,AP")
    p.add_argument("--dataset", default="images", help="dataset name written in the manifest")


def _terminate(signum, frame):
    # SIGTERM (a job scheduler's kill) unwinds like Ctrl-C, so the partial output is removed
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    progress = not args.no_progress
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args, progress)
    except KeyboardInterrupt:
        print("fasttrain convert: interrupted; the partial output was removed, nothing was written", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _run(args, progress: bool) -> int:
    try:
        if args.source == "synthetic":
            from .synthetic_hard import drawer  # scipy: imported for synthetic sources only
            out = generate_phantoms(args.out, args.n, seed=args.seed, size=args.size, layout=args.layout,
                                    test_fraction=args.test_fraction, workers=args.workers, progress=progress,
                                    draw=drawer(args.difficulty))
            name = "NIH" if args.layout == "nih" else "CheXpert"
            print(f"SYNTHETIC {name}-layout source written: {out}\n"
                  f"next: fasttrain convert {args.layout} --src {out} --out PACKED --format raw ffcv")
            return 0
        common = dict(formats=args.formats, size=args.size, val_fraction=args.val_fraction, on_error=args.on_error,
                      workers=args.workers, seed=args.seed, jpeg_quality=args.jpeg_quality,
                      shard_size=args.shard_size, progress=progress,
                      **({"resize": args.resize} if args.resize else {}))  # else the converter's default
        if args.source == "nih":
            out = convert_nih(args.src, args.out, split_dir=args.split_dir, views=args.views, **common)
        elif args.source == "chexpert":
            out = convert_chexpert(args.src, args.out, uncertain=args.uncertain, labels=args.labels,
                                   views=args.views, **common)
        elif args.source == "mimic-jpg":
            out = convert_mimic_jpg(args.src, args.out, labels_csv=args.labels_csv, uncertain=args.uncertain,
                                    labels=args.labels, views=args.views, metadata_csv=args.metadata_csv,
                                    split_csv=args.split_csv, demographics_csv=args.demographics_csv, **common)
        elif args.source == "images":
            out = convert_images(args.src, args.labels_csv, args.out, path_col=args.path_col,
                                 label_cols=args.label_cols, multi_col=args.multi_col, sep=args.sep,
                                 none_values=args.none_values, unlisted=args.unlisted, positive=args.positive,
                                 negative=args.negative, uncertain=args.uncertain, uncertain_as=args.uncertain_as,
                                 blank=args.blank, split_col=args.split_col, patient_col=args.patient_col,
                                 path_suffix=args.path_suffix, merge_rows=args.merge_rows, keep=_keep(args.keep),
                                 meta_cols=_meta_cols(args.meta_cols),
                                 test_fraction=args.test_fraction, dataset=args.dataset, **common)
        else:
            out = convert_dicom(args.src, args.labels_csv, args.out, uncertain=args.uncertain, labels=args.labels,
                                views=args.views, metadata_csv=args.metadata_csv, split_csv=args.split_csv,
                                demographics_csv=args.demographics_csv, **common)
    except ConvertError as e:
        print(f"fasttrain convert: error: {e}", file=sys.stderr)
        return 1
    _summary(out)
    return 0


def _summary(out) -> None:
    m = json.loads((out / "manifest.json").read_text())
    conv = m["conversion"]
    tag = " (SYNTHETIC)" if m.get("synthetic") else ""
    print(f"packed {m['dataset']}{tag} -> {out}")
    for s, meta in m["splits"].items():
        print(f"  {s:<6} {meta['count']:>8} images")
    print(f"  formats {', '.join(m['formats'])}; {m['image_size'][0]} px; skipped {len(m['skipped'])}; "
          f"{conv['images']} images in {conv['seconds']:.1f} s ({conv['images_per_s']:.0f} img/s, "
          f"{conv['workers']} workers; + {conv.get('writer_import_seconds', 0):.1f} s importing writers)")
