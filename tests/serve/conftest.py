"""What the predict and export tests share: a classifier fine-tuned by `run_finetune` on a dataset
packed by `convert images` from four file kinds (8-bit PNG, 16-bit PNG, JPEG, DICOM), and a
pre-training checkpoint (no classifier head)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.config import build_config
from fasttrain.converters.images import convert_images
from fasttrain.train.builders import build_student
from fasttrain.train.checkpoint import save_atomic
from fasttrain.train.finetune import run_finetune

SIDE, SIZE = 40, 32
LABELS = ["Effusion", "Mass", "Nodule"]


def byod_sources(root: Path, gray_image, dicom_file, n: int = 24) -> Path:
    """n images in four file kinds + labels.csv (path, one 0/1 column per label, patient)."""
    import cv2
    rng = np.random.default_rng(5)
    rows = []
    for k in range(n):
        g = gray_image(rng, SIDE, SIDE, k)
        y = rng.integers(0, 2, len(LABELS))
        g[SIDE // 2:, : SIDE // 2] = 255 if y[0] else g[SIDE // 2:, : SIDE // 2]  # a visible sign of label 0
        kind = k % 4
        rel = f"p{k // 2}/img{k}." + ("png", "png", "jpg", "dcm")[kind]
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == 0:
            Image.fromarray(g, "L").save(path)
        elif kind == 1:
            assert cv2.imwrite(str(path), g.astype(np.uint16) * 257)  # 16-bit
        elif kind == 2:
            Image.fromarray(g, "L").save(path, quality=95)
        else:
            dicom_file(path, g.astype(np.uint16) * 16, bits_stored=12, photometric="MONOCHROME2")
        rows.append([rel, *[str(int(v)) for v in y], f"p{k // 2}"])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *LABELS, "patient"])
        w.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_yaml, gray_pattern, write_dicom_file):
    """(packed dataset, fine-tuned best/last checkpoint, pretrain checkpoint, source folder)."""
    root = tmp_path_factory.mktemp("byod")
    src = root / "src"
    labels_csv = byod_sources(src, gray_pattern, write_dicom_file)
    packed = convert_images(src, labels_csv, root / "packed", path_col="path", label_cols=LABELS,
                            patient_col="patient", test_fraction=0.5, size=SIZE, workers=1, progress=False)
    (root / "tiny.yaml").write_text(tiny_yaml("vit", data={"val_split": None}))
    cfg = build_config(root / "tiny.yaml", [f"--data.path={packed}", f"--run.out={root / 'ft'}"])
    summary = run_finetune(cfg)
    # one epoch leaves the head near its 2e-5 init (scores ~0.5 +- 1e-3); spread the scores so that
    # any difference in decoding or transform between predict and evaluate shows
    ck = torch.load(summary["last"], map_location="cpu", weights_only=True)
    ck["model"]["head.weight"] *= 2000.0
    save_atomic(ck, summary["last"])
    mae = build_config(root / "tiny.yaml", ["--model.name=mae_vit_tiny_patch16", "--model.decoder_embed_dim=32",
                                            "--model.decoder_depth=1", "--model.decoder_num_heads=2"])
    save_atomic({"kind": "pretrain", "model": build_student(mae).state_dict(), "config": mae.to_dict()},
                root / "pre" / "last.pt")
    return packed, Path(summary["last"]), root / "pre" / "last.pt", src


@pytest.fixture(scope="session")
def trained_labels() -> list[str]:
    """The label names `trained` was fine-tuned on."""
    return LABELS


@pytest.fixture(scope="session")
def trained_size() -> int:
    """The packed image side of `trained`'s dataset."""
    return SIZE
