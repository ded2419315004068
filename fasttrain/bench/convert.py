"""`fasttrain bench convert --kind nih-png|chexpert-jpg|mimic-jpg|dicom|dicom-j2k [--n N] [--json]`.

Writes N full-size SYNTHETIC sources of one kind in the real layout (the real datasets' pixel
sizes and bit depths, radiograph-like entropy: a phantom's anatomy upsampled plus quantum-mottle
noise, so a q95 2320x2828 JPEG weighs ~2 MB like CheXpert's), then, interleaved over `--repeats`
rounds on the same files and the same number of processes:

  fasttrain     the real converter (`fasttrain convert <kind>`: CSV joins, pool, raw memmap, manifest)
  reference     the naive way the anchors' loaders read: PIL open, convert('L'), resize (PIL
                bilinear, torchvision's Resize), one process per core; DICOM: pydicom
                pixel_array + modality / VOI LUT + min..max to uint8, then the same PIL resize
  decode-only   the ceiling: the chosen decoder at the chosen scale and nothing else (read the
                file, decode; no grey conversion, resize, transfer or write), same processes
  pipeline-only the converter's pool + raw writer with a decoder that returns zeros: what the
                writer side can take (it must be far above fasttrain's rate: never the bound)

Each reports images/s, MB/s of source read, the ratio to the reference, the share of the
decode-only ceiling, and the peak RSS of the whole process tree (parent + workers, sampled).
Sources sit in the page cache (just written): this measures CPU work, not the disk. The
estimate for a 32-core node scales the per-process rate (images/s / workers) to 32 processes.

Run time: the plan is printed first and a line per round and mode as it goes (stderr). The
rounds share a 120 s budget equally between the modes (writing the sources is outside it): a
mode whose next round would overrun its share stops after one round, with a note in its row.
`--full`: no budget (the runs docs/benchmarks.md quotes name their --n and --repeats).
"""
from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from fasttrain.bench.timing import (add_run_length_args, budget_text, budgeted_windows, fill_presets, print_plan,
                                    print_records, record)
from fasttrain.converters import decode as D
from fasttrain.converters.chexpert import CHEXPERT_ALL, convert_chexpert
from fasttrain.converters.common import Item, Problems, bounded_imap, default_workers
from fasttrain.converters.decode import preload
from fasttrain.converters.dicom import convert_dicom, convert_mimic_jpg
from fasttrain.converters.nih import convert_nih
from fasttrain.converters.pack import write_raw_split
from fasttrain.converters.synthetic import draw_phantom


@dataclass(frozen=True)
class Kind:
    """One source kind: its real pixel size (h, w), bits, how many images the real dataset has."""
    name: str
    h: int
    w: int
    bits: int
    dataset_images: int
    dataset: str
    default_n: int
    noise: float  # grey levels of mottle noise: sets the compressed size near the real files'


KINDS = {
    # NIH: 112,120 PNGs of 1024x1024, 45 GB (~400 KB each)
    "nih-png": Kind("nih-png", 1024, 1024, 8, 112_120, "NIH ChestX-ray14", 192, 2.0),
    # CheXpert full: ~224k JPEGs near 2320x2828, 439 GB (~2 MB each at q95)
    "chexpert-jpg": Kind("chexpert-jpg", 2828, 2320, 8, 223_414, "CheXpert v1.0 (full)", 64, 3.0),
    # MIMIC-CXR-JPG: 377,110 JPEGs near 2500x3000, ~570 GB (~1.5 MB each)
    "mimic-jpg": Kind("mimic-jpg", 3056, 2544, 8, 377_110, "MIMIC-CXR-JPG", 64, 1.5),
    # MIMIC-CXR DICOM: 12 bits stored in 16, uncompressed here (~15 MB a file) ...
    "dicom": Kind("dicom", 3056, 2544, 12, 377_110, "MIMIC-CXR (DICOM)", 32, 1.5),
    # ... and JPEG 2000 lossless, as MIMIC-CXR stores its large files (encoding is slow: ~4 s each)
    "dicom-j2k": Kind("dicom-j2k", 3056, 2544, 12, 377_110, "MIMIC-CXR (DICOM, JPEG 2000)", 8, 1.5),
}
NODE_CORES = 32


# ----------------------------------------------------------------------------- synthetic sources

def radiograph(index: int, h: int, w: int, noise: float, bits: int = 8) -> np.ndarray:
    """A SYNTHETIC radiograph-like image [h, w]: phantom anatomy (drawn at 256 px) upsampled,
    plus per-pixel mottle and a coarser grain, so the compressed size is near real files'."""
    import cv2
    base = cv2.resize(draw_phantom(1234, index, 256).image.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(index)
    fine = rng.standard_normal((h, w), dtype=np.float32) * noise  # [h, w]
    coarse = cv2.resize(rng.standard_normal((h // 4, w // 4), dtype=np.float32), (w, h)) * (2 * noise)  # [h, w]
    img = base + fine + cv2.GaussianBlur(coarse, (0, 0), 1.5)
    if bits == 8:
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)
    full = 2 ** bits - 1
    return np.clip(np.rint(img * (full / 255.0)), 0, full).astype(np.uint16)


def j2k_codestream(stored: np.ndarray, bits: int, levels: Optional[int] = None) -> bytes:
    """A lossless JPEG 2000 codestream of `stored` at `bits` bits per sample, as MIMIC-CXR's files
    hold 12-bit samples (imagecodecs' openjpeg; Pillow's encoder can only write 8 or 16 bits)."""
    import imagecodecs
    return imagecodecs.jpeg2k_encode(stored, codecformat="J2K", bitspersample=bits, reversible=True,
                                     resolutions=None if levels is None else levels + 1)


def _write_dicom(path: Path, stored: np.ndarray, bits: int, j2k: bool) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    full = 2 ** bits
    ds.WindowCenter, ds.WindowWidth = full // 2, int(full * 0.9)  # MIMIC's DICOMs carry a window
    ds.PixelData = stored.astype("<u2").tobytes()
    if j2k:
        from pydicom.encaps import encapsulate
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([j2k_codestream(stored, bits)])
        ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_one(args) -> int:
    kind_name, index, path = args
    k = KINDS[kind_name]
    img = radiograph(index, k.h, k.w, k.noise, k.bits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind_name == "nih-png":
        Image.fromarray(img).save(path, "PNG")
    elif kind_name.endswith("-jpg"):
        Image.fromarray(img).save(path, "JPEG", quality=95)
    else:
        _write_dicom(path, img, k.bits, j2k=kind_name == "dicom-j2k")
    return path.stat().st_size


MIMIC_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def write_sources(kind: str, n: int, root: Path, workers: int) -> list[Path]:
    """N SYNTHETIC files of `kind` in the real dataset's layout under `root` (+ its CSVs / lists);
    returns the image paths in order. A README.txt says SYNTHETIC."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.txt").write_text(f"SYNTHETIC {kind} sources written by `fasttrain bench convert`; not radiographs\n")
    paths, rows = [], []
    for i in range(n):
        subject, study = f"1{i // 2:07d}", f"5{i:07d}"
        if kind == "nih-png":
            name = f"{i + 1:08d}_000.png"
            paths.append(root / f"images_{1 + i % 12:03d}" / "images" / name)
            rows.append(name)
        elif kind == "chexpert-jpg":
            rel = f"CheXpert-v1.0/train/patient{i + 1:05d}/study1/view1_frontal.jpg"
            paths.append(root / rel)
            rows.append(rel)
        else:
            did = f"{i:08x}-bench"
            ext = ".jpg" if kind == "mimic-jpg" else ".dcm"
            paths.append(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{did}{ext}")
            rows.append((did, subject, study))
    for _ in bounded_imap(_write_one, [(kind, i, str(p)) for i, p in enumerate(paths)], workers):
        pass
    n_test = max(1, n // 5)  # converters refuse an empty split
    if kind == "nih-png":
        with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
            wr = csv.writer(f, lineterminator="\n")
            wr.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                         "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
            for i, name in enumerate(rows):
                wr.writerow([name, "No Finding" if i % 3 else "Effusion", 0, i + 1, 50, "M", "PA", 1024, 1024, 0.14, 0.14])
        (root / "train_val_list.txt").write_text("".join(r + "\n" for r in rows[:-n_test]))
        (root / "test_list.txt").write_text("".join(r + "\n" for r in rows[-n_test:]))
    elif kind == "chexpert-jpg":
        for fname, part in (("train.csv", rows[:-n_test]), ("valid.csv", rows[-n_test:])):
            with open(root / "CheXpert-v1.0" / fname, "w", newline="") as f:
                wr = csv.writer(f, lineterminator="\n")
                wr.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + CHEXPERT_ALL)
                for i, rel in enumerate(part):
                    wr.writerow([rel, "Male", 60, "Frontal", "PA"] + ["1.0" if (i + j) % 4 == 0 else "" for j in
                                                                       range(len(CHEXPERT_ALL))])
    else:
        with open(root / "mimic-cxr-2.0.0-chexpert.csv", "w", newline="") as f:
            wr = csv.writer(f, lineterminator="\n")
            wr.writerow(["subject_id", "study_id"] + MIMIC_LABELS)
            for i, (_, subject, study) in enumerate(rows):
                wr.writerow([subject, study] + ["1.0" if (i + j) % 3 == 0 else "" for j in range(len(MIMIC_LABELS))])
        with open(root / "mimic-cxr-2.0.0-metadata.csv", "w", newline="") as f:
            wr = csv.writer(f, lineterminator="\n")
            wr.writerow(["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"])
            wr.writerows([did, subject, study, "PA", KINDS[kind].h, KINDS[kind].w] for did, subject, study in rows)
        with open(root / "mimic-cxr-2.0.0-split.csv", "w", newline="") as f:
            wr = csv.writer(f, lineterminator="\n")
            wr.writerow(["dicom_id", "study_id", "subject_id", "split"])
            wr.writerows([did, study, subject, "test" if i >= n - n_test else "train"]
                         for i, (did, subject, study) in enumerate(rows))
    return paths


# ----------------------------------------------------------------------------- the modes

def _converter(kind: str) -> Callable:
    if kind == "nih-png":
        return convert_nih
    if kind == "chexpert-jpg":
        return convert_chexpert
    if kind == "mimic-jpg":
        return convert_mimic_jpg
    return convert_dicom


def default_resize(kind: str) -> str:
    """How `kind`'s converter fits a frame to the square by default (its --resize default): the
    baseline fits the same way, so both produce the same picture."""
    return inspect.signature(_converter(kind)).parameters["resize"].default


def convert_fasttrain(kind: str, src: Path, out: Path, size: int, workers: int) -> int:
    """The real converter on `src`; returns the number of images packed."""
    common = dict(size=size, workers=workers, progress=False)
    if kind == "dicom":
        _converter(kind)(src, src / "mimic-cxr-2.0.0-chexpert.csv", out, **common)
    else:
        _converter(kind)(src, out, **common)
    return json.loads((out / "manifest.json").read_text())["conversion"]["images"]


def reference_decode(path: str, size: int, resize: str = "squash") -> np.ndarray:
    """The naive baseline: what a PIL-based loader does with one file (`resize` squash: the whole
    frame to size x size; crop: its centre square, as Resize + CenterCrop)."""
    if path.endswith(".dcm"):
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
        ds = pydicom.dcmread(path)
        x = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
        x = (x - x.min()) / max(x.max() - x.min(), 1e-12) * 255.0
        im = Image.fromarray(x.astype(np.uint8))
    else:
        im = Image.open(path).convert("L")
    if resize == "crop":
        m = min(im.size)
        left, top = (im.width - m) // 2, (im.height - m) // 2
        im = im.crop((left, top, left + m, top + m))
    elif resize != "squash":
        raise ValueError(f"the reference baseline fits by squash or crop, not {resize!r}")
    return np.asarray(im.resize((size, size), Image.BILINEAR))  # torchvision Resize on a PIL image


def decode_only(path: str, size: int) -> int:
    """The ceiling: read + the chosen decoder at the chosen scale, nothing after. Returns pixels."""
    if path.endswith(D.DICOM_SUFFIXES):  # what decode_dicom decodes with (it reads the file itself)
        return int(D.dicom_stored(path, size)[1].size)
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(D.JPEG_SIGNATURE):
        import simplejpeg
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        n = D.jpeg_scale(h, w, size)
        img = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=-(-h * n // 8), min_width=-(-w * n // 8))
    elif data.startswith(D.PNG_SIGNATURE):
        import imagecodecs
        img = imagecodecs.png_decode(data)
    else:
        raise ValueError(f"{path}: not a PNG, JPEG or .dcm file")
    return int(img.size)


def _run_chunk(args) -> int:
    _, size, paths, _ = args
    for p in paths:
        decode_only(p, size)
    return len(paths)


def _run_chunk_ref(args) -> list:
    _, size, paths, resize = args
    return [reference_decode(p, size, resize) for p in paths]


def pool_run(mode: str, paths: list[Path], size: int, workers: int, chunk: int = 4, resize: str = "squash") -> int:
    """`mode` over `paths` in the converters' own bounded process pool (same processes as fasttrain)."""
    tasks = [(mode, size, [str(p) for p in paths[s:s + chunk]], resize) for s in range(0, len(paths), chunk)]
    if mode == "reference":
        images = np.empty((len(paths), size, size), np.uint8)  # the baseline's results land in one array too
        i = 0
        for res in bounded_imap(_run_chunk_ref, tasks, workers):
            for img in res:
                images[i] = img
                i += 1
        return i
    return sum(bounded_imap(_run_chunk, tasks, workers))


def _zeros(path: str, size: int) -> np.ndarray:
    return np.zeros((size, size), np.uint8)


def pipeline_only(paths: list[Path], out: Path, size: int, workers: int) -> int:
    """The converter's pool + raw memmap writer with a decoder that does nothing: the writer's rate."""
    items = [Item(id=str(i), path=str(p), labels=np.zeros(1, np.float32), where=f"item {i}") for i, p in enumerate(paths)]
    out.mkdir(parents=True)
    kept, _ = write_raw_split(out, "x", items, _zeros, size, workers, False, Problems("fail"))
    return len(kept)


# Runs in its own process: a sampling thread in this one would be running (maybe inside psutil or
# malloc, holding a C lock) at the moment the pools fork, and a child can deadlock on such a lock;
# bounded_imap forks on the premise that the parent has no other threads.
_SAMPLER = r"""
import select, sys, psutil
me, self_pid, peak = psutil.Process(int(sys.argv[1])), psutil.Process().pid, 0
while True:
    total = 0
    try:
        procs = [me] + [c for c in me.children(recursive=True) if c.pid != self_pid]
    except psutil.Error:
        break
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    peak = max(peak, total)
    if select.select([sys.stdin], [], [], 0.05)[0]:
        break
print(peak, flush=True)
"""


class PeakRSS:
    """Peak resident memory of this process and all its children, sampled every 50 ms by a
    separate sampler process (the workers' shared pages count once per process, so this errs high)."""

    def __init__(self):
        self.peak = 0

    def __enter__(self):
        self._proc = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid())], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        out, _ = self._proc.communicate(input="stop\n", timeout=60)  # closing stdin ends its loop
        self.peak = int(out.strip() or 0)


# ----------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasttrain bench convert", description=__doc__.split("\n")[0])
    p.add_argument("--kind", required=True, choices=list(KINDS))
    p.add_argument("--n", type=int, default=None, help="images (default: per kind, 8-192)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="processes for every mode (default: all cores)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the median is reported")
    p.add_argument("--dir", default=None, help="keep the sources here and reuse them next time (default: a temp dir, removed)")
    add_run_length_args(p, budget=QUICK_BUDGET, shared_by="the modes", full="no budget: every mode runs every round")
    p.add_argument("--json", action="store_true", help="one JSON object per mode")
    return p


QUICK_BUDGET = 120.0


def run(kind: str, n: int, size: int = 256, workers: Optional[int] = None, repeats: int = 2,
        src_dir: Optional[Path] = None, log: Callable[[str], None] = lambda s: None,
        budget: float = 0.0) -> list[dict]:
    """Write the sources (or reuse them), time every mode `repeats` times interleaved under
    `budget` seconds (0: none; see the module docstring); return one dict per mode (medians)
    without provenance."""
    k = KINDS[kind]
    workers = default_workers(workers)
    tmp = Path(tempfile.mkdtemp(prefix="fasttrain-bench-convert-"))
    root = Path(src_dir) if src_dir else tmp / "src"
    try:
        stamp = root / f".bench-{kind}-{n}"
        if stamp.exists():
            log(f"reusing the {n} {kind} sources in {root}")
            paths = [Path(p) for p in stamp.read_text().splitlines()]
        else:
            if root.exists() and any(root.iterdir()):
                shutil.rmtree(root)
            t0 = time.perf_counter()
            paths = write_sources(kind, n, root, workers)
            stamp.write_text("".join(f"{p}\n" for p in paths))
            log(f"wrote {n} SYNTHETIC {kind} sources ({k.w}x{k.h}, {k.bits}-bit) in {time.perf_counter() - t0:.0f} s")
        mb = sum(p.stat().st_size for p in paths) / 1e6
        preload()  # every mode's workers fork with the decoders already imported (as `pack` does)
        modes: dict[str, Callable[[int], int]] = {
            "reference": lambda r: pool_run("reference", paths, size, workers, resize=default_resize(kind)),
            "fasttrain": lambda r: convert_fasttrain(kind, root, tmp / f"out{r}", size, workers),
            "decode-only": lambda r: pool_run("decode-only", paths, size, workers),
            "pipeline-only": lambda r: pipeline_only(paths, tmp / f"pipe{r}", size, workers),
        }
        times: dict[str, list[float]] = {m: [] for m in modes}
        peaks: dict[str, int] = {m: 0 for m in modes}

        def timed_round(m: str) -> Callable[[], int]:
            def one() -> int:
                r = len(times[m])
                with PeakRSS() as rss:
                    t0 = time.perf_counter()
                    done = modes[m](r)
                    dt = time.perf_counter() - t0
                if done != n:
                    raise RuntimeError(f"bench convert {kind}: mode {m} processed {done} of {n} images")
                times[m].append(dt)
                peaks[m] = max(peaks[m], rss.peak)
                log(f"round {r + 1}/{repeats} {m:<13} {n / dt:8.1f} img/s  peak RSS {rss.peak / 2**20:6.0f} MiB")
                shutil.rmtree(tmp / f"out{r}", ignore_errors=True)
                shutil.rmtree(tmp / f"pipe{r}", ignore_errors=True)
                return n
            return one

        # the round lines above carry the peak RSS: the generic window lines are not printed
        _, stopped = budgeted_windows({m: timed_round(m) for m in modes}, repeats, warmup=0, budget=budget,
                                      log=io.StringIO())
        for m, why in stopped.items():
            log(f"{m}: {why}")
        rate = {m: n / float(np.median(ts)) for m, ts in times.items()}
        out = []
        for m in modes:
            per_core = rate[m] / workers
            out.append({
                "mode": m, "kind": kind, "images": n, "workers": workers, "size": size, "source_hw": [k.h, k.w],
                "bits": k.bits, "source_mb_per_image": round(mb / n, 3), "synthetic": True,
                "images_per_s": round(rate[m], 2), "mb_per_s": round(rate[m] * mb / n, 1),
                "images_per_s_runs": [round(n / t, 2) for t in times[m]], "note": stopped.get(m),
                "rounds_planned": repeats, "budget_s": budget or None,
                "ratio_vs_reference": round(rate[m] / rate["reference"], 3),
                "pct_of_decode_only": round(100 * rate[m] / rate["decode-only"], 1),
                "peak_rss_mib": round(peaks[m] / 2**20),
                "dataset": k.dataset, "dataset_images": k.dataset_images,
                f"hours_on_{NODE_CORES}_cores": round(k.dataset_images / (per_core * NODE_CORES) / 3600, 2),
            })
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    n = args.n or KINDS[args.kind].default_n
    if n < 2:
        print("fasttrain bench convert: --n must be >= 2 (a train and a test image)", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    fill_presets(args, {"budget": QUICK_BUDGET}, {"budget": 0.0})
    budget = args.budget
    k = KINDS[args.kind]
    print_plan(f"{n} SYNTHETIC {args.kind} sources ({k.w}x{k.h}, {k.bits}-bit) written first (or reused from "
               f"--dir), then 4 modes (reference, fasttrain, decode-only, pipeline-only) x {args.repeats} "
               f"interleaved rounds of all {n} images to {args.size} px on {default_workers(args.workers)} "
               f"processes; {budget_text(budget, 4)}")
    res = run(args.kind, n, args.size, args.workers, args.repeats, Path(args.dir) if args.dir else None,
              log=lambda s: print(f"bench convert: {s}", file=sys.stderr), budget=budget)
    # provenance imports torch: only after every forked pool is done (libgomp is not fork-safe)
    records = [record("convert", r.pop("mode"), device="cpu", **r) for r in res]
    print_records(records, args.json, ["mode", "kind", "images_per_s", "mb_per_s", "ratio_vs_reference",
                                       "pct_of_decode_only", "peak_rss_mib", f"hours_on_{NODE_CORES}_cores",
                                       "note"])
    if not args.json:
        print(f"SYNTHETIC sources: {n} x {KINDS[args.kind].w}x{KINDS[args.kind].h} {KINDS[args.kind].bits}-bit, "
              f"{res[0]['source_mb_per_image']} MB each; {res[0]['workers']} processes; medians of "
              f"{args.repeats} interleaved rounds; hours = {KINDS[args.kind].dataset_images:,} images of "
              f"{KINDS[args.kind].dataset} at the per-process rate x {NODE_CORES}")
    return 0
