"""What only the data tests use: timm's RandAugment ops as the oracle for ours, and the split
positions that real gloo ranks read."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from timm.data import auto_augment as taa

from fasttrain.data import build_loader


def timm_augment_op(name: str, img: Image.Image, magnitude: float, negate: bool, hparams: dict) -> Image.Image:
    """timm's AugmentOp body without the apply draw, with `_randomly_negate` fixed to `negate`;
    PosterizeIncreasing at 0 bits gives black (our decision, fasttrain.data.randaug: Pillow
    refuses it)."""
    orig = taa._randomly_negate
    taa._randomly_negate = lambda v: -v if negate else v
    try:
        level_fn = taa.LEVEL_TO_ARG[name]
        args = level_fn(magnitude, hparams) if level_fn is not None else tuple()
        if name.startswith("Posterize") and args[0] == 0:
            return Image.new(img.mode, img.size)
        return taa.NAME_TO_OP[name](img, *args, fillcolor=hparams["img_mean"], resample=hparams["interpolation"])
    finally:
        taa._randomly_negate = orig


@pytest.fixture(scope="session")
def timm_op():
    """`timm_op(name, img, magnitude, negate, hparams) -> PIL image`: one timm op, the sign fixed."""
    return timm_augment_op


def _gloo_rank(rank: int, world: int, port: int, cfgs: dict, need_labels: bool, outdir: str) -> None:
    """One spawned gloo rank of `gloo_positions`: writes outdir/rank<r>.json."""
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


# pytest imports every conftest.py as the module "conftest"; this one, while that name is its own
THIS_CONFTEST = sys.modules[__name__]


@pytest.fixture
def gloo_positions(free_port, monkeypatch):
    """`gloo_positions(cfgs, outdir, world=2, need_labels=True) -> [per rank {"<kind>-<train>":
    {"pos": split positions read in epoch 1 (seed 4), "len": batches}}]` for each loader config in
    `cfgs` (kind -> DataConfig), from `world` real gloo processes.

    Spawned, not forked: this process has used OpenMP (torch, numba) threads, and a forked child
    that enters an OpenMP region can hang forever (libgomp is not fork-safe)."""
    def positions(cfgs: dict, outdir: Path, world: int = 2, need_labels: bool = True) -> list[dict]:
        # the ranks find _gloo_rank as conftest._gloo_rank only while "conftest" names this file: here
        # (pickle looks the function up by module name) and in each rank (spawn copies our sys.path)
        monkeypatch.setitem(sys.modules, "conftest", THIS_CONFTEST)
        monkeypatch.syspath_prepend(str(Path(__file__).parent))
        mp.start_processes(_gloo_rank, args=(world, free_port(), cfgs, need_labels, str(outdir)), nprocs=world,
                           join=True, start_method="spawn")
        return [json.loads((Path(outdir) / f"rank{k}.json").read_text()) for k in range(world)]
    return positions
