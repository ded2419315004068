"""The packing pipeline every converter ends in: `begin` (source check, options, problem
collector) and `pack` (decode + resize in a process pool, stream into the raw memmap (the first
format, always written), then write FFCV / DALI from that memmap, then the manifest, then the
atomic rename). Nothing holds the dataset in RAM: at most `window` chunks are in flight.

A converter (nih.py, chexpert.py, dicom.py) only turns its source layout into `Item`s per split.
"""
from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fasttrain import __version__
from fasttrain.format import dali as dali_writer
from fasttrain.format import ffcv as ffcv_writer
from fasttrain.format import raw as raw_writer
from fasttrain.format.manifest import FORMAT_PREFERENCE, MANIFEST_VERSION, split_paths, write_manifest
from fasttrain.io import write_json_atomic
from fasttrain.pool import default_workers, progress

from . import decode as decode_mod
from .common import (AtomicDir, ConvertError, DecodeFn, Item, PackOptions, Problems, convert_errors, decode_stream,
                     metadata_columns, metadata_names, sha256_file)


def begin(src, **options) -> tuple[Path, PackOptions, Problems]:
    """How every converter starts: the source folder exists, the options are valid, and a
    collector of bad-input problems for the chosen --on-error policy."""
    src = Path(src)
    if not src.is_dir():
        raise ConvertError(f"{src}: source folder not found")
    opts = PackOptions(**options)
    opts.check()
    return src, opts, Problems(opts.on_error)


def check_unique_ids(splits: dict[str, list[Item]], problems: Problems) -> dict[str, list[Item]]:
    """Duplicate ids (within or across splits) are an error: one image must never count twice."""
    seen: dict[str, str] = {}
    out = {}
    for name, items in splits.items():
        keep = []
        for it in items:
            if it.id in seen:
                problems.report(it.id, it.path, f"{it.where}: duplicate id {it.id!r} (first seen at {seen[it.id]})")
                continue
            seen[it.id] = f"{it.where} (split {name})"
            keep.append(it)
        out[name] = keep
    return out


def write_raw_splits(root: Path, splits: dict[str, list[Item]], decode: DecodeFn, size: int, workers: int,
                     show_progress: bool, problems: Problems) -> dict[str, tuple[list[Item], int]]:
    """Decode every split into root/raw/<split>.u8 through ONE process pool; return, per split,
    (items kept, number skipped). A bad item goes to `problems` (which raises under --on-error fail).

    One pool for all splits, not one per split: each pool start costs its fork and the tail of a
    split where workers wait for the last chunk (a 2-split bench pack paid both twice).
    """
    order = [it for items in splits.values() for it in items]  # position -> item, the splits end to end

    def bad(pos: int, err: str) -> None:
        it = order[pos]
        problems.report(it.id, it.path, f"{it.where}: {it.path}: {err}")

    bar = progress(len(order), "decode " + "+".join(splits), show_progress)
    decoded = decode_stream([it.path for it in order], decode, size, workers)

    def counted():
        for d in decoded:
            yield d
            bar.update(1)

    try:
        kept = raw_writer.write_splits(root, {name: len(items) for name, items in splits.items()}, size,
                                       counted(), bad)
    finally:
        decoded.close()  # an error stops the pool now, not when the generator is collected
        bar.close()
    return {name: ([items[i] for i in kept[name]], len(items) - len(kept[name])) for name, items in splits.items()}


def write_raw_split(root: Path, split: str, items: list[Item], decode: DecodeFn, size: int, workers: int,
                    show_progress: bool, problems: Problems) -> tuple[list[Item], int]:
    """write_raw_splits for one split: (items kept, number skipped)."""
    return write_raw_splits(root, {split: items}, decode, size, workers, show_progress, problems)[split]


def pack(*, dataset: str, source: Path, out: Path, splits: dict[str, list[Item]], label_names: list[str],
         decode: DecodeFn, opts: PackOptions, problems: Problems, source_files: Sequence[Path],
         extra: Optional[dict] = None, synthetic: bool = False) -> Path:
    """Decode, resize and write every split in every requested format, then the manifest."""
    opts.check()
    splits = check_unique_ids(splits, problems)
    for name, items in splits.items():
        if not items:
            raise ConvertError(f"split '{name}' is empty ({dataset} source {source})")
    # fail fast: a missing writer library is found before decoding, not after
    t_setup = time.perf_counter()
    with convert_errors():
        if "ffcv" in opts.formats:
            ffcv_writer.require()
        if "dali" in opts.formats:
            dali_writer.require()
    workers = default_workers(opts.workers)
    size = int(opts.size)
    if workers > 1:
        decode_mod.preload(decode)  # the workers fork with the decoders imported, not each importing them
    t_all = time.perf_counter()
    setup_s = t_all - t_setup  # importing the writers (FFCV pulls in torch + numba: seconds)
    rates = {}
    with convert_errors(), AtomicDir(out) as tmp:  # the writers' and the pool's errors as ConvertError
        (tmp / "splits").mkdir()
        split_meta = {}
        details: dict[str, dict] = {}
        t0 = time.perf_counter()
        # one set of metadata columns for every split (a split whose images all lack an age still has
        # the column, all missing)
        meta_names = metadata_names(it for items in splits.values() for it in items)
        # the decoders fit by squashing unless told otherwise (decode.RESIZE_MODES)
        fit = decode if opts.resize == "squash" else functools.partial(decode, resize=opts.resize)
        written = write_raw_splits(tmp, splits, fit, size, workers, opts.progress, problems)
        rates["decode_images_per_s"] = round(sum(map(len, splits.values())) / max(time.perf_counter() - t0, 1e-9), 1)
        for name, items in splits.items():
            kept, skipped = written[name]
            if not kept:
                raise ConvertError(f"split '{name}' is empty after skipping {skipped} bad item(s)")
            labels = np.stack([it.labels for it in kept]).astype(np.float32)  # [N, C], row i = raw image i
            paths = split_paths(name)
            np.save(tmp / paths["labels"], labels)
            (tmp / paths["ids"]).write_text("".join(it.id + "\n" for it in kept))
            # each id's source file relative to `source`: the PIL reference loader reads these
            src_abs = os.path.abspath(source)
            (tmp / paths["files"]).write_text(
                "".join(os.path.relpath(os.path.abspath(it.path), src_abs) + "\n" for it in kept))
            with np.errstate(invalid="ignore"):
                prevalence = {ln: (None if np.all(np.isnan(labels[:, j])) else round(float(np.nanmean(labels[:, j])), 6))
                              for j, ln in enumerate(label_names)}
            split_meta[name] = {
                "count": len(kept),
                "ids": paths["ids"],
                "labels": paths["labels"],
                "files": paths["files"],
                "prevalence": prevalence,
                "ignored_labels": int(np.isnan(labels).sum()),
            }
            columns = metadata_columns(kept, meta_names)  # one value per kept image, in the split's order
            if columns:
                write_json_atomic(tmp / paths["metadata"], columns, default=None)
                split_meta[name]["metadata"] = paths["metadata"]
                split_meta[name]["metadata_missing"] = {c: sum(v is None for v in vals) for c, vals in columns.items()}
        details["raw"] = raw_writer.details(split_meta, size)
        if "ffcv" in opts.formats:
            t0 = time.perf_counter()
            details["ffcv"] = ffcv_writer.write(tmp, split_meta, size, len(label_names), workers=opts.ffcv_workers,
                                                show_progress=opts.progress)
            rates["ffcv_images_per_s"] = round(sum(m["count"] for m in split_meta.values())
                                               / max(time.perf_counter() - t0, 1e-9), 1)
        if "dali" in opts.formats:
            t0 = time.perf_counter()
            details["dali"] = dali_writer.write(tmp, split_meta, size, jpeg_quality=opts.jpeg_quality,
                                                shard_size=opts.shard_size, workers=workers,
                                                show_progress=opts.progress)
            rates["dali_images_per_s"] = round(sum(m["count"] for m in split_meta.values())
                                               / max(time.perf_counter() - t0, 1e-9), 1)
        if "raw" not in opts.formats:
            # raw was only the staging copy for ffcv / dali
            shutil.rmtree(tmp / "raw")
            details.pop("raw")
        elapsed = time.perf_counter() - t_all
        total = sum(m["count"] for m in split_meta.values())
        manifest = {
            "fasttrain_manifest": MANIFEST_VERSION,
            "dataset": dataset,
            "synthetic": bool(synthetic),
            "note": ("SYNTHETIC phantom images generated by fasttrain, not real radiographs"
                     if synthetic else None),
            "source": str(Path(source).absolute()),
            "label_names": list(label_names),
            "num_labels": len(label_names),
            "image_size": [size, size],
            "resize": opts.resize,  # how each frame was fitted to the square (what `predict` repeats)
            "formats": [f for f in FORMAT_PREFERENCE if f in opts.formats],
            "splits": split_meta,
            "format_details": details,
            "preprocessing": {
                "grayscale": "ITU-R 601 luma for colour inputs, alpha dropped",
                "resize": {"crop": f"centre square of side min(H, W), resized to {size}x{size}",
                           "squash": f"whole image to {size}x{size} (aspect not kept)",
                           "pad": f"longer side to {size}, centred on black to {size}x{size}"}[opts.resize]
                          + ", cv2.INTER_AREA (INTER_LINEAR when upsampling)",
                "dtype": "uint8",
                "bit_depth": "16-bit PNG: 0..65535 -> 0..255 (0..2^b-1 when sBIT declares b bits); DICOM: see dicom section",
                **({"jpeg_quality": opts.jpeg_quality} if "dali" in opts.formats else {}),
                # how PNG / JPEG sources were decoded, and the bound of the DCT-scaled JPEG path
                **({"jpeg": decode_mod.JPEG_SCALED_NOTE, "png": decode_mod.PNG_NOTE}
                   if decode in (decode_mod.decode_raster, decode_mod.decode_file) else {}),
                # ... and DICOM sources, with the bounds of the two reduced paths
                **({"dicom_reduced": decode_mod.DICOM_REDUCED_NOTE, "dicom_jpeg2000": decode_mod.DICOM_J2K_NOTE}
                   if decode in (decode_mod.decode_dicom, decode_mod.decode_file) else {}),
                **(extra or {}).get("preprocessing", {}),
            },
            "source_sha256": {Path(p).name: sha256_file(Path(p)) for p in source_files},
            "fasttrain_version": __version__,
            "skipped": [s.to_dict() for s in problems.skipped],
            "conversion": {"seconds": round(elapsed, 2), "images": total,
                           "images_per_s": round(total / max(elapsed, 1e-9), 1), "workers": workers,
                           "writer_import_seconds": round(setup_s, 2),
                           **rates},
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest.update({k: v for k, v in (extra or {}).items() if k != "preprocessing"})
        # the manifest is the last file written: a folder with a manifest is complete
        write_manifest(tmp, manifest)
    return Path(out).absolute()
