"""`fasttrain predict`: a fine-tuned checkpoint on new image files -> one CSV row per image.

    fasttrain predict --ckpt RUN/checkpoints/best.pt --images DIR --out PRED.csv [--batch-size N]
    fasttrain predict --ckpt RUN/checkpoints/best.pt --list FILES.csv --out PRED.csv

Each file goes through exactly what a training image went through:
  decode   converters.decode.decode_file (the converter's grey conversion, bit depth, DICOM VOI,
           area resize to the packed size the model was trained on, fitted to the square as the
           packed data was: the manifest's `resize`), uint8 [S, S]
  batch    uint8 [B, S, S] to the device
  eval     data.gpu_augment.BatchAugment(train=False): the checkpoint's Resize(eval_resize) +
           CenterCrop(img_size) + normalisation, the transform `fasttrain evaluate` applies
  model    the checkpoint's classifier under its autocast dtype, sigmoid -> [B, C]
so on a packed split `predict` gives the scores `evaluate` gives (tests/serve/test_predict.py).

Decoding runs in spawned worker processes (libgomp is not fork-safe once torch has run) with a
bounded window of chunks in flight, overlapping the model's batches. A file that cannot be read
gets a row with empty probabilities and the reason in the `error` column: never dropped.
PRED.csv.json beside the CSV records the checkpoint, the transform and the provenance.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from fasttrain.converters.common import ConvertError, decode_chunk, default_workers, read_csv, worker_init
from fasttrain.converters.decode import DICOM_SUFFIXES, RASTER_SUFFIXES, decode_file
from fasttrain.data.gpu_augment import BatchAugment
from fasttrain.data.mixture import MixtureError, part_manifests
from fasttrain.io import write_atomic, write_json_atomic
from fasttrain.models.checkpoints import CheckpointError
from fasttrain.provenance import provenance
from fasttrain.train.checkpoint import load_checkpoint
from fasttrain.train.dist import resolve_device
from fasttrain.train.engine import autocast, cfg_amp_dtype
from fasttrain.train.finetune import load_classifier


class PredictError(ValueError):
    """Bad arguments or inputs to predict / export, found before any work; names the file."""


# ----------------------------------------------------------------------------- the checkpoint

def load_for_inference(ckpt: str | Path, size: Optional[int] = None, ck: Optional[dict] = None):
    """-> (model in eval mode, cfg, label names, packed image size S); `ck` if the caller already
    loaded the checkpoint. A checkpoint without a classifier head (a pre-training checkpoint, a timm
    export) is refused here, before any work."""
    ck = load_checkpoint(ckpt) if ck is None else ck
    if ck.get("kind") != "finetune":
        raise PredictError(f"{ckpt}: no classifier head (a {ck.get('kind')!r} checkpoint); predict and ONNX export "
                           f"need a fine-tuned classifier: RUN/checkpoints/best.pt of a `fasttrain finetune` run")
    model, cfg, names = load_classifier(ckpt, ck=ck)
    manifest = training_manifest(cfg.data.path)
    if names is None:
        names = list(manifest["label_names"]) if manifest else [f"label_{j}" for j in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise PredictError(f"{ckpt}: {len(names)} label names for {model.num_classes} outputs")
    if size is None:
        stored = ck.get("image_size") or (manifest or {}).get("image_size")
        if stored is None:
            raise PredictError(f"{ckpt}: the packed image size it was trained on is unknown (its dataset "
                               f"{cfg.data.path} is not here); pass --size (the converter's --size, default 256)")
        size = int(stored[0])
    if size < cfg.model.img_size:
        raise PredictError(f"--size {size} is smaller than the model's input {cfg.model.img_size} px")
    return model, cfg, list(names), int(size)


def training_manifest(path) -> Optional[dict]:
    """The manifest of the packed data a classifier was fine-tuned on (data.path: one dataset or a
    mixture's parts, whose label names and packed size are one; its first part's), or None when
    that data is not on this machine."""
    if not path:
        return None
    try:
        return part_manifests(path)[0][1]
    except MixtureError:
        return None


def packed_resize(ck: dict, cfg) -> str:
    """How the training images were fitted to the square (the converter's --resize), which
    `predict` repeats: the checkpoint's record, else its packed data's manifest; squash for data
    packed without the key (the only fitting then)."""
    return ck.get("resize") or (training_manifest(cfg.data.path) or {}).get("resize") or "squash"


# ----------------------------------------------------------------------------- the inputs

IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES


def list_images(folder: str | Path) -> list[tuple[str, str]]:
    """Every PNG / JPEG / DICOM file under `folder`, sorted -> [(id = relative path, absolute path)]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PredictError(f"--images {folder}: folder not found")
    out = []
    for dirpath, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                p = Path(dirpath) / f
                out.append((str(p.relative_to(folder)), str(p.absolute())))
    if not out:
        raise PredictError(f"--images {folder}: no {', '.join(IMAGE_SUFFIXES)} files in it")
    return out


def read_list(csv_path: str | Path, path_col: str = "path") -> list[tuple[str, str]]:
    """A CSV with a `path_col` column (relative to the CSV's folder, or absolute) -> [(id, path)].
    Files that do not exist stay in the list: their row says so."""
    csv_path = Path(csv_path)
    try:
        _, rows = read_csv(csv_path, [path_col])
    except ConvertError as e:
        raise PredictError(f"--list {e}") from None
    out = []
    for lineno, r in rows:
        if not r[path_col]:
            raise PredictError(f"--list {csv_path} row {lineno}: empty {path_col!r}")
        p = Path(r[path_col])
        out.append((r[path_col], str(p if p.is_absolute() else (csv_path.parent / p).absolute())))
    if not out:
        raise PredictError(f"--list {csv_path}: no rows")
    return out


# ----------------------------------------------------------------------------- decoding

def decoded(paths: Sequence[str], size: int, workers: int, chunk: int = 16, resize: str = "squash"
            ) -> Iterator[tuple[int, Optional[np.ndarray], Optional[str]]]:
    """(position, uint8 [size, size] | None, error | None) in input order, decoded by the
    converters' own worker function (same decoder, same error text, the packed data's `resize`
    fitting) in spawned processes."""
    fit = functools.partial(decode_file, resize=resize)
    tasks = [(fit, size, list(zip(range(s, min(s + chunk, len(paths))), paths[s:s + chunk])))
             for s in range(0, len(paths), chunk)]
    if workers <= 1:
        for t in tasks:
            yield from decode_chunk(t)
        return

    # spawn, not fork: this process has run torch (libgomp's thread pool does not survive a fork);
    # ProcessPoolExecutor raises on a dead worker instead of waiting for it forever.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=worker_init) as pool:
        window = 4 * workers  # bounded: at most this many chunks decoded ahead of the model
        pending = [pool.submit(decode_chunk, t) for t in tasks[:window]]
        nxt = len(pending)
        try:
            while pending:
                res = pending.pop(0).result()
                if nxt < len(tasks):
                    pending.append(pool.submit(decode_chunk, tasks[nxt]))
                    nxt += 1
                yield from res
        except BrokenProcessPool as e:
            raise RuntimeError(f"a decode worker died ({e}); out of memory? retry with fewer --workers") from e
        finally:
            for f in pending:
                f.cancel()


# ----------------------------------------------------------------------------- predict

class Predictor:
    """The checkpoint's eval transform and model on one device: uint8 [B, S, S] -> probabilities [B, C]."""

    def __init__(self, model, cfg, size: int, device: torch.device):
        self.model = model.to(device).eval()
        self.device = device
        self.amp = cfg_amp_dtype(cfg, device)  # what `evaluate` runs under, so the scores match it
        # the loaders' eval transform (data/base.py make_augment with train=False)
        self.augment = BatchAugment((size, size), cfg.model.img_size, cfg.model.in_chans, train=False,
                                    norm=cfg.data.norm, eval_resize=cfg.data.eval_resize, device=device,
                                    dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images)  # [B, S, S] uint8
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = self.augment(x.to(self.device, non_blocking=True))  # [B, C, h, w] normalised
        with autocast(self.device, self.amp):
            logits = self.model(x)  # [B, num_classes]
        return torch.sigmoid(logits.float()).cpu().double().numpy()  # [B, C]


def predict_files(ckpt: str | Path, items: list[tuple[str, str]], out: str | Path, *, batch_size: int = 64,
                  device: str = "auto", size: Optional[int] = None, workers: Optional[int] = None,
                  progress: bool = True) -> dict:
    """Probabilities for every (id, path) in `items`, written to the CSV `out` (atomically):
    columns `id, path, <label>..., error`, one row per item in input order."""

    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out)
    if not out.parent.is_dir():
        raise PredictError(f"--out {out}: folder {out.parent} does not exist")
    ck = load_checkpoint(ckpt)
    model, cfg, names, size = load_for_inference(ckpt, size, ck=ck)
    resize = packed_resize(ck, cfg)
    dev = resolve_device(device)
    predictor = Predictor(model, cfg, size, dev)
    if workers is None:  # all cores, but no more than one per 64 files: spawning costs ~1 s a worker
        workers = min(default_workers(None), max(1, len(items) // 64))
    workers = default_workers(workers)
    probs = np.full((len(items), len(names)), np.nan)  # [N, C]
    errors: list[Optional[str]] = [None] * len(items)
    buf = np.empty((batch_size, size, size), np.uint8)  # [B, S, S] the batch being filled
    pos: list[int] = []

    def flush():
        if pos:
            probs[pos] = predictor(buf[: len(pos)])
            pos.clear()

    t0 = time.perf_counter()
    bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for i, img, err in decoded([p for _, p in items], size, workers, resize=resize):
        if err is not None:
            errors[i] = err
        else:
            buf[len(pos)] = img
            pos.append(i)
            if len(pos) == batch_size:
                flush()
        bar.update(1)
    flush()
    bar.close()
    seconds = time.perf_counter() - t0  # decode + transform + model: what evaluate's images_per_s times
    _write_csv(out, items, names, probs, errors)
    n_bad = sum(e is not None for e in errors)
    _write_provenance(out, ckpt, cfg, size, resize, len(items), n_bad, dev, seconds)
    return {"out": str(out), "images": len(items), "predicted": len(items) - n_bad, "unreadable": n_bad,
            "labels": names, "device": str(dev), "size": size, "workers": workers, "seconds": seconds,
            "images_per_s": len(items) / max(seconds, 1e-9), "probs": probs, "errors": errors}


def _write_provenance(out: Path, ckpt, cfg, size: int, resize: str, n: int, n_bad: int, dev, seconds: float) -> None:
    """PRED.csv.json beside the CSV: which model, which transform, which code produced it."""
    info = {"checkpoint": str(Path(ckpt).absolute()), "images": n, "unreadable": n_bad, "seconds": round(seconds, 2),
            "decode": f"converters.decode.decode_file -> uint8 {size}x{size}, resize={resize}",
            "eval_transform": {"img_size": cfg.model.img_size, "in_chans": cfg.model.in_chans,
                               "eval_resize": cfg.data.eval_resize, "norm": cfg.data.norm,
                               "autocast": str(cfg_amp_dtype(cfg, dev))},
            "provenance": provenance(str(dev))}
    write_json_atomic(out.with_name(out.name + ".json"), info)


def _write_csv(out: Path, items, names, probs, errors) -> None:
    """Written atomically: a reader never sees half a CSV."""
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["id", "path", *names, "error"])
    for (ident, path), p, e in zip(items, probs, errors):
        w.writerow([ident, path, *([""] * len(names) if e else [f"{v:.6f}" for v in p]), e or ""])
    write_atomic(out, text.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fasttrain predict", description=(
        "Probabilities per label for image files (PNG / JPEG / DICOM), decoded as the converter does, "
        "through the checkpoint's eval transform; one CSV row per image, unreadable ones with the reason."))
    p.add_argument("--ckpt", required=True, help="fine-tuned checkpoint (RUN/checkpoints/best.pt)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--list", help="CSV with a path column (relative to the CSV's folder, or absolute)")
    p.add_argument("--path-col", default="path", help="column of --list naming the files (default: path)")
    p.add_argument("--out", required=True, help="output CSV: id, path, one probability per label, error")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    p.add_argument("--size", type=int, default=None,
                   help="packed image size the model was trained on (default: from the checkpoint's dataset)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        items = list_images(args.images) if args.images else read_list(args.list, args.path_col)
        res = predict_files(args.ckpt, items, args.out, batch_size=args.batch_size, device=args.device,
                            size=args.size, workers=args.workers, progress=not args.no_progress)
    except (PredictError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"fasttrain predict: error: {e}", file=sys.stderr)
        return 2
    print(f"predicted {res['predicted']} of {res['images']} images ({len(res['labels'])} labels, {res['device']}, "
          f"{res['images_per_s']:.1f} img/s with {res['workers']} decode worker(s)) -> {res['out']}")
    if res["unreadable"]:
        print(f"  {res['unreadable']} unreadable: listed in {res['out']} with the reason (column 'error')",
              file=sys.stderr)
    if res["images"] and not res["predicted"]:
        # every file failed: a script chaining `predict && ...` must not take an all-error CSV as a result
        print(f"fasttrain predict: error: none of the {res['images']} images could be read "
              f"(reasons in {res['out']})", file=sys.stderr)
        return 1
    return 0
