"""Measurements for issue 16 (bring your own data), outside the test suite:

  python scripts/byod_measure.py scale  [--dir /tmp/issue16-scale]
      `convert images`' checks before decoding at NIH's scale: 112,120 CSV rows, files in
      images_NNN/images/ found by name lookup, a multi-valued label column, patient ids. The files
      are empty (only their existence is checked before decoding): a SYNTHETIC layout.
  python scripts/byod_measure.py export [--dir /tmp/issue16-export]
      ViT-T/16 at 224 px (configs/finetune_nih.yaml, 14 labels, random weights, head std 0.02):
      ONNX (torchscript and dynamo exporters) and timm exports, max abs logit difference vs PyTorch.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from fasttrain.converters.nih import NIH_LABELS as NIH


def scale(d: Path, n: int = 112_120) -> None:
    from fasttrain.converters.common import Problems, patient_disjoint_split
    from fasttrain.converters.images import LabelSpec, build_items, parse_csv_args
    root = d / "src"
    if not root.exists():
        rng = np.random.default_rng(0)
        rows = []
        for i in range(n):
            folder = root / f"images_{1 + i * 12 // n:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{i // 3:08d}_{i % 3:03d}.png"
            (folder / name).touch()
            found = "|".join(sorted(rng.choice(NIH, rng.integers(0, 3), replace=False))) or "No Finding"
            rows.append([name, found, str(i // 3)])
        with open(root / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Image Index", "Finding Labels", "Patient ID"])
            w.writerows(rows)
    for rep in range(2):
        t, c = time.perf_counter(), time.process_time()
        splits, _, _ = build_items(root, parse_csv_args([str(root / "labels.csv")]), "Image Index",
                                   LabelSpec(label_cols=NIH, multi_col="Finding Labels"), Problems("fail"),
                                   patient_col="Patient ID")
        t1, c1 = time.perf_counter(), time.process_time()
        train, test = patient_disjoint_split(splits["train"], 0.2, 0)
        print(f"run {rep}: {len(splits['train'])} rows checked in {t1 - t:.1f} s wall / {c1 - c:.1f} s CPU; "
              f"20% patient-disjoint test carve {time.perf_counter() - t1:.2f} s ({len(train)} / {len(test)})",
              flush=True)


def export(d: Path) -> None:
    import torch

    from fasttrain.config import build_config
    from fasttrain.train.builders import build_classifier
    from fasttrain.train.checkpoint import save_atomic
    from fasttrain.serve.export import export_checkpoint
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = build_config("configs/finetune_nih.yaml", ["--data.path=/nonexistent"])
    m = build_classifier(cfg)
    torch.nn.init.normal_(m.head.weight, std=0.02)  # not the ~0 init head: the logits carry the encoder
    ckpt = d / "vitt.pt"
    save_atomic({"kind": "finetune", "model": m.state_dict(), "config": cfg.to_dict(),
                 "label_names": list(NIH), "image_size": [256, 256]}, ckpt)
    for fmt, exporter in (("onnx", "torchscript"), ("onnx", "dynamo"), ("timm", None)):
        t = time.perf_counter()
        out = d / f"vitt_{exporter or 'timm'}.{'onnx' if fmt == 'onnx' else 'safetensors'}"
        r = export_checkpoint(ckpt, fmt, out, **({"exporter": exporter} if exporter else {}))
        print(json.dumps({"format": fmt, "exporter": exporter, "max_abs_diff": r.get("max_abs_diff"),
                          "batch_sizes": r.get("batch_sizes"), "seconds": round(time.perf_counter() - t, 1)}),
              flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("scale", "export"))
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    (scale if a.what == "scale" else export)(Path(a.dir or f"/tmp/issue16-{a.what}"))
