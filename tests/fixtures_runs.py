"""The tiny run configs and packed phantom sets the trainer tests share (CPU-sized: 32-px images,
a 32-d x 2-block ViT with 8-px patches), so each test states only what it changes."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

_RUN = {"log_every": 2, "progress": False, "tensorboard": False}
BASE = {
    # MAE pre-training (and, with --teacher, distillation)
    "mae": {
        "model": {"name": "mae_vit_tiny_patch16", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                  "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
        "data": {"batch_size": 8, "eval_resize": 32},
        "optim": {"epochs": 2, "blr": 1.0e-2, "warmup_epochs": 1},
        "engine": {"compile": False},
        "run": _RUN,
    },
    # fine-tuning a classifier
    "vit": {
        "model": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                  "num_heads": 2},
        "data": {"batch_size": 8, "eval_resize": 32},
        "optim": {"epochs": 1, "blr": 1.0e-2, "warmup_epochs": 0},
        "engine": {"compile": False},
        "run": _RUN,
    },
}


def tiny_yaml(kind: str = "mae", **sections: dict) -> str:
    """BASE[kind] as YAML text, each keyword a section whose keys replace or add to the base's."""
    cfg = copy.deepcopy(BASE[kind])
    for name, keys in sections.items():
        cfg.setdefault(name, {}).update(keys)
    return yaml.safe_dump(cfg, sort_keys=False)


def packed_phantoms(root: Path, n: int, *, seed: int = 0, size: int = 32, val_fraction: float = 0.2) -> Path:
    """n SYNTHETIC phantoms in NIH's layout under root/src, packed raw by the real converter into
    root/packed (train / val / test)."""
    from fasttrain.converters.nih import convert_nih
    from fasttrain.converters.synthetic import generate_phantoms
    generate_phantoms(root / "src", n, seed=seed, size=size, workers=1, progress=False)
    return convert_nih(root / "src", root / "packed", formats=("raw",), size=size, val_fraction=val_fraction,
                       workers=1, progress=False)
