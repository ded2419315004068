"""MAE pre-training, with ETMAE distillation from a frozen teacher when one is configured.

    fasttrain pretrain --config configs/pretrain_vitb_to_vitt.yaml --out RUN --teacher vit-b_CXR_0.5M_mae.pth
"""
from __future__ import annotations

import logging

import torch

from fasttrain.config import ConfigError
from fasttrain.train import loop
from fasttrain.train.builders import build_pretrain_model
from fasttrain.train.dist import cleanup
from fasttrain.train.optim import param_groups_weight_decay

log = logging.getLogger("fasttrain.train")


def check_config(cfg) -> None:
    if cfg.run.out is None:
        raise ConfigError("no run directory: pass --out RUN")
    if cfg.data.path is None:
        raise ConfigError("no dataset: set data.path (a packed dataset folder) in the config or --data.path=DIR")
    if cfg.model.num_classes:
        raise ConfigError("model.num_classes must be 0 for pre-training (the MAE has no head)")


def run_pretrain(cfg, resume: bool = False) -> dict:
    """Build everything (all input checks first), then train. Returns the run summary."""
    check_config(cfg)
    info = loop.setup(cfg)
    try:
        from fasttrain.data import build_loader
        model = build_pretrain_model(cfg)  # teacher checkpoint errors surface here, before data or steps
        loader = build_loader(cfg.data, cfg.data.train_split, train=True, img_size=cfg.model.img_size,
                              in_chans=cfg.model.in_chans, rank=info.rank, world_size=info.world_size,
                              device=info.device, dtype=torch.float32, seed=cfg.run.seed)
        model.to(info.device)
        trainable = model.student if hasattr(model, "student") else model
        groups = param_groups_weight_decay(trainable, cfg.optim.weight_decay)
        if hasattr(model, "proj"):  # the projection heads train with the student (decay on matrices only)
            groups += param_groups_weight_decay(model.proj, cfg.optim.weight_decay)
        trainer = loop.Trainer(cfg, "pretrain", model, loader, info, groups=groups, resume=resume,
                               extra_state={"label_names": list(loader.label_names)})
        summary = trainer.fit()
        summary["data_images"] = loader.num_samples
        return summary
    finally:
        cleanup(info)
