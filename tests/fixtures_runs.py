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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound to port 0, then released)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, cfgs: dict, need_labels: bool, outdir: str) -> None:
    """One spawned gloo rank of `gloo_positions`: writes outdir/rank<r>.json."""
    import json
    import os

    import torch.distributed as dist

    from fasttrain.data import build_loader
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for kind, cfg in cfgs.items():
            for train in (True, False):
                ld = build_loader(cfg, "train", train, img_size=24, in_chans=1, rank=rank, world_size=world,
                                  seed=4, need_labels=need_labels)
                ld.set_epoch(1)
                pos = [int(j) for _, _, i in ld.iter_with_index() for j in i]
                res[f"{kind}-{train}"] = {"pos": pos, "len": len(ld)}
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def gloo_positions(cfgs: dict, outdir: Path, world: int = 2, need_labels: bool = True) -> list[dict]:
    """Per rank, {"<kind>-<train>": {"pos": split positions read in epoch 1 (seed 4), "len": batches}}
    for each loader config in `cfgs` (kind -> DataConfig), from `world` real gloo processes.

    Spawned, not forked: this process has used OpenMP (torch, numba) threads, and a forked child
    that enters an OpenMP region can hang forever (libgomp is not fork-safe)."""
    import json

    import torch.multiprocessing as mp
    mp.start_processes(_gloo_rank, args=(world, free_port(), cfgs, need_labels, str(outdir)), nprocs=world, join=True,
                       start_method="spawn")
    return [json.loads((Path(outdir) / f"rank{k}.json").read_text()) for k in range(world)]
