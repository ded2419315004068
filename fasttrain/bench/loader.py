"""`fasttrain bench loader`: every loader available here over the same packed split, one run.

Two figures per loader, each the median of interleaved timing windows after a warm-up window,
each a steady-state rate: a window opens a fresh epoch, leaves its first batches untimed (the epoch
start-up and the prefetch queue filling: `epoch_startup_s`, reported as its own figure) and times
the batches after them, one by one, until `--seconds` of them (or `--batches` if given) are timed,
crossing into the next epoch (again untimed at its start) when a small split runs out:
  images_per_s       the whole pipeline: augmented float batches ready on the target device
                     (on a CPU-only machine the batched augmentation runs on the CPU, so it is
                     counted here);
  feed_images_per_s  the host side alone: uint8 batches ready for the device (pinned on CUDA),
                     i.e. what the loader's CPU budget could feed a GPU doing the augmentation.
                     For the reference both figures are its whole per-sample CPU pipeline.
  epoch_startup_s    median seconds from opening an epoch to its first batch (thread, worker or
                     pipeline start-up), paid once per epoch: ~300 batches on NIH at 256.
`--transform`: pretrain (crop 0.2-1 bilinear + flip: MAE), finetune (Xiao et al.'s timm recipe:
crop 0.08-1 bicubic + flip + RandAugment rand-m6-mstd0.5-inc1; the reference runs timm's own
create_transform), eval (resize + center crop).
Ratios are against the reference loader measured in the same run. Ceilings for context: JPEG
decode-only rate (simplejpeg on the DALI shards' JPEGs, one core, times the cores the JPEG loaders
use) and a memcpy of the raw bytes (numpy copy of whole batches).

The reference reads `--reference-images DIR` if given, else the source files when the manifest's
source folder exists, else a PNG export of the packed split in a temp folder; the record says which.

Run time: the defaults (batch 128, 1 warm-up + 3 windows of 1 s, a 150 s budget for the timing
loop) end within about 3 minutes on 2 cores; the plan is printed first and a line per window as it
goes (stderr). Each timing (a loader's whole pipeline, or its feed) gets an equal share of the
budget; one whose next window would overrun its share stops there (after one timed window at
least), and its row says after how many windows (`note`). `--full` is the long run (batch 256,
5 windows of 3 s, no budget); explicit flags override either.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fasttrain.bench.timing import (add_run_length_args, budget_text, budgeted_windows, fill_presets, median,
                                    print_plan, print_records, record)
from fasttrain.config import DataConfig
from fasttrain.data.dali_loader import DALILoader
from fasttrain.data.loaders import LoaderError, build_loader
from fasttrain.data.mixture import MixtureError, open_mixture, parse_parts, part_manifests, shared_formats
from fasttrain.data.reference import export_png
from fasttrain.format.packed import PackedError, open_packed
from fasttrain.provenance import provenance

# fewer timed batches than this per epoch and the loaders' read-ahead (made while the untimed first
# batches were taken) inflates the window's rate: the row says so
MIN_TIMED_PER_EPOCH = 3
COLUMNS = ["loader", "images_per_s", "ratio_vs_reference", "feed_images_per_s", "feed_ratio_vs_reference",
           "epoch_startup_s", "device", "note"]
# (batch size, windows, seconds per window, budget s) of the default run and of --full; budget 0: none
QUICK = dict(batch_size=128, windows=3, seconds=1.0, budget=150.0)
FULL = dict(batch_size=256, windows=5, seconds=3.0, budget=0.0)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# DataConfig overrides per transform; finetune is Xiao et al.'s create_transform (configs/finetune_*.yaml)
TRANSFORMS = {"pretrain": {}, "eval": {},
              "finetune": dict(crop_scale=[0.08, 1.0], interpolation="bicubic", randaug="rand-m6-mstd0.5-inc1")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasttrain bench loader", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, action="append",
                   help="packed dataset folder (written by `fasttrain convert`); repeat it (--data A --data B) "
                        "or give A,B to time a mixture (each part PATH or PATH:SPLIT)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (--full: 256)")
    p.add_argument("--seconds", type=float, default=None,
                   help="timed seconds per window, steady state (default 1; --full: 3)")
    p.add_argument("--batches", type=int, default=None,
                   help="timed batches per window instead of --seconds (fixed count)")
    p.add_argument("--skip", type=int, default=None,
                   help="untimed batches at each epoch's start (default: prefetch depth + 1)")
    p.add_argument("--windows", type=int, default=None,
                   help="timed windows per loader, after 1 warm-up window (default 3; --full: 5)")
    add_run_length_args(p, budget=QUICK["budget"], shared_by="the timings",
                        full="the long run docs/benchmarks.md quotes: batch 256, 5 windows of 3 s, no budget")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="output dtype (the autocast dtype)")
    p.add_argument("--workers", type=int, default=None, help="host workers/threads per loader (default: all cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the batched augmentation (default: torch's, = cores)")
    p.add_argument("--loaders", default=None, help="comma-separated subset of reference,raw,ffcv,dali-cpu,dali-gpu")
    p.add_argument("--reference-images", default=None, help="PNG folder for the reference loader")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default="pretrain",
                   help="pretrain (MAE crop + flip), finetune (Xiao et al.: bicubic crop + flip + RandAugment), eval")
    p.add_argument("--eval", action="store_true", help="same as --transform eval")
    p.add_argument("--json", action="store_true", help="one JSON object per loader")
    return p


class _Cycle:
    """`window()`: one steady-state timing window (see the module docstring).

    Each window opens a fresh epoch iterator and closes it at its end, because the loaders prefetch
    in background threads: an iterator kept open across windows would fill its queue while the
    other loaders are timed and then report those batches as free. Each epoch starts at step 0 (a
    mid-epoch start would make DALI decode the skipped batches). Its first `skip` batches are not
    timed: the first one measures the epoch start-up, the others let the prefetch queue (filled
    while the first batch was made) drain, so the timed batches come at the production rate."""

    def __init__(self, loader, feed: bool, skip: int, sync=None):
        self.loader, self.feed, self.epoch, self.skip, self.sync = loader, feed, 0, max(1, skip), sync
        self.startups: list[float] = []

    def _next(self, it):
        x, _ = next(it)
        if self.sync:
            self.sync()
        return x.shape[0]

    def window(self, seconds: float, batches: int | None) -> tuple[int, float]:
        """(images, seconds) over the timed batches of one window."""
        images, timed, n, it = 0, 0.0, 0, None
        try:
            while (n < batches) if batches else (timed < seconds or n < 2):
                if it is None:
                    self.loader.set_epoch(self.epoch)
                    self.epoch += 1
                    t0 = time.perf_counter()
                    it = iter(self.loader.feed() if self.feed else self.loader)
                    try:
                        self._next(it)
                        self.startups.append(time.perf_counter() - t0)
                        for _ in range(self.skip - 1):
                            self._next(it)
                    except StopIteration:  # an epoch no longer than the skipped batches
                        raise RuntimeError(f"the split has only {len(self.loader)} batches: fewer than the "
                                           f"{self.skip} untimed batches at each epoch's start (--skip)") from None
                t0 = time.perf_counter()
                try:
                    b = self._next(it)
                except StopIteration:
                    it = None
                    continue
                timed += time.perf_counter() - t0
                images += b
                n += 1
        finally:
            if it is not None and hasattr(it, "close"):
                it.close()
        return images, timed


def _ratio(x: float | None, ref: float) -> float | None:
    return None if x is None or not math.isfinite(ref) else x / ref


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # nan: a timing stopped before its first window


def _print_plan(args, names: list[str], loaders: dict, packed, skip: int) -> None:
    """What the run will time and for how long at most (stderr, before any timing)."""
    per_epoch = len(next(iter(loaders.values())))
    size = "x".join(str(v) for v in packed.image_size)
    window = f"{args.batches} batches" if args.batches else f"{args.seconds:g} s timed"
    budget = budget_text(args.budget, len(names))
    print_plan(f"{len(loaders)} loaders ({', '.join(loaders)}), {len(names)} timings (whole pipeline, and feed "
               f"for the packed loaders) x (1 warm-up + {args.windows} windows) x {window}; batch {args.batch_size}; "
               f"{len(packed):,} images {size} ({per_epoch} batches/epoch, {skip} untimed at each epoch's start); "
               f"{budget}")


def _decode_ceiling(packed_root: Path, split: str, seconds: float = 1.5) -> float | None:
    """simplejpeg decode-only images/s on one core over the split's JPEGs (None without DALI shards)."""
    try:
        import simplejpeg

        ps = open_packed(packed_root, split, "dali")
    except Exception:  # noqa: BLE001 - no DALI shards or no simplejpeg: no ceiling to report
        return None
    jpegs = [ps.dali_component(i, "jpg") for i in range(min(len(ps), 512))]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for j in jpegs:
            simplejpeg.decode_jpeg(j, colorspace="GRAY")
        n += len(jpegs)
    return n / (time.perf_counter() - t0)


def _memcpy_ceiling(packed_root: Path, split: str, batch: int, seconds: float = 1.0) -> float | None:
    """images/s of copying whole contiguous batches of raw bytes (page cache -> RAM)."""
    try:
        images = open_packed(packed_root, split, "raw").images
    except Exception:  # noqa: BLE001 - raw not written
        return None
    b = min(batch, len(images))
    dst = np.empty((b,) + images.shape[1:], np.uint8)
    n, t0, start = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        if start + b > len(images):
            start = 0
        np.copyto(dst, images[start:start + b])
        start += b
        n += b
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fill_presets(args, QUICK, FULL)


    # one packed dataset, or several (--data A --data B, or --data A,B) timed as one mixture
    try:
        specs = [spec for d in args.data for spec in parse_parts(d)]
        data_path = [f"{s.path}:{s.split}" if s.split else s.path for s in specs]
        data_path = data_path[0] if len(data_path) == 1 else data_path
        packed = open_mixture(data_path, args.split, None, train_split=args.split, need_labels=False)
    except (PackedError, MixtureError) as e:
        print(f"fasttrain bench loader: {e}", file=sys.stderr)
        return 2
    manifest = packed.manifest
    root = Path(specs[0].path)  # the ceilings below read the first part
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = args.workers or os.cpu_count() or 1
    dtype = DTYPES[args.dtype]
    transform = "eval" if args.eval else args.transform
    train = transform != "eval"
    formats = shared_formats(part_manifests(data_path))  # the formats every part has
    wanted = ["reference"] + [f for f in ("raw", "ffcv") if f in formats]
    if "dali" in formats:
        wanted += ["dali-cpu"] + (["dali-gpu"] if cuda else [])
    if args.loaders:
        wanted = [w for w in args.loaders.split(",") if w]

    tmp = None
    ref_images = args.reference_images
    if "reference" in wanted and ref_images is None and not Path(manifest.get("source") or "/nonexistent").is_dir():
        tmp = tempfile.TemporaryDirectory(prefix="fasttrain-bench-png-")
        print(f"exporting {len(packed)} packed images as PNG for the reference loader -> {tmp.name}", file=sys.stderr)
        ref_images = str(export_png(packed, tmp.name))

    loaders, notes = {}, {}
    for name in wanted:
        kind = name.split("-")[0]
        cfg = DataConfig(path=data_path, loader=kind, train_split=args.split, batch_size=args.batch_size,
                         num_workers=workers, reference_images=ref_images if kind == "reference" else None,
                         **TRANSFORMS[transform])
        try:
            if kind == "dali":
                ld = build_loader(cfg, args.split, train, img_size=args.img_size, in_chans=args.in_chans,
                                  device=device if name == "dali-gpu" else "cpu", dtype=dtype, need_labels=False)
                assert isinstance(ld, DALILoader)
            else:
                ld = build_loader(cfg, args.split, train, img_size=args.img_size, in_chans=args.in_chans,
                                  device=device, dtype=dtype, need_labels=False)
        except (LoaderError, ValueError) as e:
            notes[name] = f"skipped: {e}"
            print(f"fasttrain bench loader: {name} skipped: {e}", file=sys.stderr)
            continue
        if len(ld) == 0:
            print(f"fasttrain bench loader: split '{args.split}' has fewer than {args.batch_size} images",
                  file=sys.stderr)
            return 2
        loaders[name] = ld
    if "reference" not in loaders:
        print("fasttrain bench loader: the reference loader is the baseline and could not be built", file=sys.stderr)
        return 2

    sync = torch.cuda.synchronize if cuda else None
    skip = args.skip if args.skip is not None else max(1, int(DataConfig().prefetch)) + 1
    cycles = {name: _Cycle(ld, False, skip, sync) for name, ld in loaders.items()}
    cycles.update({f"{name}/feed": _Cycle(ld, True, skip, sync) for name, ld in loaders.items() if name != "reference"})
    _print_plan(args, list(cycles), loaders, packed, skip)
    try:
        rates, stopped = budgeted_windows(
            {name: (lambda c=cyc: c.window(args.seconds, args.batches)) for name, cyc in cycles.items()},
            args.windows, warmup=1, budget=args.budget, unit="img/s")
    except RuntimeError as e:
        print(f"fasttrain bench loader: {e}", file=sys.stderr)
        return 2

    decode = _decode_ceiling(root, args.split)
    memcpy = _memcpy_ceiling(root, args.split, args.batch_size)
    ref = median(rates["reference"])
    records = []
    for name, ld in loaders.items():
        ips = median(rates[name])
        fps = ips if name == "reference" else median(rates[f"{name}/feed"])
        notes_of = [f"{k}: {stopped[k]}" for k in (name, f"{name}/feed") if k in stopped]
        timed = len(ld) - skip  # timed batches per epoch: each window opens a fresh epoch
        if timed < MIN_TIMED_PER_EPOCH:
            notes_of.append(f"{timed} timed batch(es) an epoch: the rate counts batches made ahead during the "
                            f"{skip} untimed ones (a bigger split or a smaller --batch-size)")
        note = "; ".join(notes_of) or None
        startup = median(cycles[name].startups[1:] or cycles[name].startups)  # drop the first (cold) epoch
        ips, fps = _finite(ips), _finite(fps)
        jpeg_threads = workers if name.startswith("dali") else None
        records.append(record(
            "loader", name, loader=name, images_per_s=ips, feed_images_per_s=fps,
            ratio_vs_reference=_ratio(ips, ref), feed_ratio_vs_reference=_ratio(fps, ref), note=note,
            windows=rates[name], feed_windows=None if name == "reference" else rates[f"{name}/feed"],
            decode_ceiling_images_per_s=(decode * jpeg_threads) if (decode and jpeg_threads) else None,
            decode_one_core_images_per_s=decode, memcpy_ceiling_images_per_s=memcpy,
            epoch_startup_s=startup, batches_per_epoch=len(ld), skipped_batches_per_epoch=skip,
            seconds_per_window=None if args.batches else args.seconds, windows_planned=args.windows,
            budget_s=args.budget or None,
            source=ld.describe(), split=args.split, batch_size=args.batch_size, batches_per_window=args.batches,
            img_size=args.img_size, in_chans=args.in_chans, dtype=args.dtype, workers=workers,
            torch_threads=torch.get_num_threads(),
            transform=transform, data_config=TRANSFORMS[transform], images=len(packed),
            image_size=list(packed.image_size), data=ld.data_parts(),
            synthetic=bool(manifest.get("synthetic")), device=str(ld.device)))
    print_records(records, args.json, COLUMNS)
    if not args.json:
        if decode:
            print(f"ceiling: JPEG decode-only (simplejpeg) {decode:,.0f} img/s per core "
                  f"(x {workers} cores = {decode * workers:,.0f})")
        if memcpy:
            print(f"ceiling: memcpy of raw batches {memcpy:,.0f} img/s")
        for name, ld in loaders.items():
            print(f"{name}: {ld.describe()}")
        for name, note in notes.items():
            print(f"{name}: {note}")
        prov = provenance(device)
        print(f"device {prov['device']}, {prov['cpu_cores']} cores, torch threads {prov['torch_threads']}, "
              f"git {prov['git_sha']}{', SYNTHETIC data' if manifest.get('synthetic') else ''}")
    for ld in loaders.values():
        close = getattr(ld, "close", None)
        if close:
            close()
    if tmp is not None:
        tmp.cleanup()
    return 0
