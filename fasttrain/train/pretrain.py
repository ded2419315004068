"""MAE pre-training, with ETMAE distillation from a frozen teacher when one is configured.

    fasttrain pretrain --config configs/pretrain_vitb_to_vitt.yaml --out RUN --teacher vit-b_CXR_0.5M_mae.pth
"""
from __future__ import annotations

import logging

import torch

from fasttrain.config import ConfigError
from fasttrain.data import build_loader
from fasttrain.data.mixture import missing_split
from fasttrain.models.distill import student_of
from fasttrain.train import loop
from fasttrain.train.builders import build_pretrain_model
from fasttrain.train.dist import all_reduce_mean, cleanup
from fasttrain.train.engine import autocast, cfg_amp_dtype, pretrain_terms
from fasttrain.train.knn import KnnMonitor
from fasttrain.train.optim import param_groups_weight_decay

log = logging.getLogger("fasttrain.train")


def check_config(cfg) -> None:
    loop.require_run_and_data(cfg)
    if cfg.model.num_classes:
        raise ConfigError("model.num_classes must be 0 for pre-training (the MAE has no head)")


def _has_split(path, split: str, train_split: str = "train") -> bool:
    """Every part of data.path (one packed dataset or a mixture) has `split`."""
    return not missing_split(path, split, train_split)


@torch.no_grad()
def val_losses(model, loader, info, cfg) -> dict:
    """L, L_MAE and L_dist on the validation split (eval transform, masks from a fixed seed, so
    epochs are comparable), averaged over batches and ranks: the val curves of `fasttrain plot`."""
    model.eval()
    student = student_of(model)
    gen = torch.Generator(device=info.device).manual_seed(cfg.run.seed + 0x5EED)
    amp = cfg_amp_dtype(cfg, info.device)
    mode = "full" if cfg.engine.mode == "reference" else "truncated"
    total, n = torch.zeros(3, device=info.device), 0
    for images, _ in loader:
        images = images.to(info.device, non_blocking=True)
        noise = torch.rand(images.shape[0], student.num_patches, generator=gen, device=info.device)
        with autocast(info.device, amp):
            total += pretrain_terms(model, images, noise, mode)
        n += 1
    mean = all_reduce_mean(total / max(n, 1), info).tolist()
    return dict(zip(("loss", "loss_mae", "loss_dist"), mean))


def knn_monitor(cfg, info, val_loader):
    """The kNN monitor (eval.knn_every > 0): a memory bank of train images (eval transform) and the
    val split; None when off."""
    if cfg.eval.knn_every <= 0:
        return None
    bank = build_loader(cfg.data, cfg.data.train_split, train=False, img_size=cfg.model.img_size,
                        in_chans=cfg.model.in_chans, rank=info.rank, world_size=info.world_size,
                        device=info.device, dtype=torch.float32, seed=cfg.run.seed, need_labels=False)
    if not val_loader.label_names or list(bank.label_names) != list(val_loader.label_names):
        # a mixture whose parts name their labels differently (NIH 14, CheXpert 5) has no common
        # label set to score neighbours on: pre-training goes on without the monitor
        log.warning("kNN monitor off: the parts of data.path do not share label names")
        return None
    amp = cfg_amp_dtype(cfg, info.device)
    return KnnMonitor(cfg.eval, bank, val_loader, val_loader.label_names, info, amp)


def build_trainer(cfg, info, resume=None):
    """What `run_pretrain` trains with, on an initialised `info`: (Trainer, train loader, kNN
    monitor or None). Input errors (teacher checkpoint, data) surface here, before any step."""
    point = loop.plan_resume(cfg, info, resume)  # may set the per-rank batch: before any loader
    model = build_pretrain_model(cfg)  # teacher checkpoint errors surface here, before data or steps
    loader = build_loader(cfg.data, cfg.data.train_split, train=True, img_size=cfg.model.img_size,
                          in_chans=cfg.model.in_chans, rank=info.rank, world_size=info.world_size,
                          device=info.device, dtype=torch.float32, seed=cfg.run.seed,
                          need_labels=False)  # MAE ignores labels: mixture parts may name them differently
    model.to(info.device)
    trainable = student_of(model)
    groups = param_groups_weight_decay(trainable, cfg.optim.weight_decay)
    if hasattr(model, "proj"):  # the projection heads train with the student (decay on matrices only)
        groups += param_groups_weight_decay(model.proj, cfg.optim.weight_decay)
    validate, knn = None, None
    if cfg.data.val_split is not None and _has_split(cfg.data.path, cfg.data.val_split, cfg.data.train_split):
        val_loader = build_loader(cfg.data, cfg.data.val_split, train=False, img_size=cfg.model.img_size,
                                  in_chans=cfg.model.in_chans, rank=info.rank, world_size=info.world_size,
                                  device=info.device, dtype=torch.float32, seed=cfg.run.seed, need_labels=False)
        knn = knn_monitor(cfg, info, val_loader)
        validate = lambda m: {**val_losses(m, val_loader, info, cfg), **(knn(m) if knn else {})}  # noqa: E731
    trainer = loop.Trainer(cfg, "pretrain", model, loader, info, groups=groups, resume=point,
                           validate=validate, extra_state={"label_names": list(loader.label_names)})
    if knn is not None:
        knn.trainer = trainer  # epoch, last step, progress line
    return trainer, loader, knn


def run_pretrain(cfg, resume=None) -> dict:
    """Build everything (all input checks first), then train. Returns the run summary."""
    check_config(cfg)
    info = loop.setup(cfg)
    try:
        trainer, loader, knn = build_trainer(cfg, info, resume)
        summary = trainer.fit()
        if knn is not None:
            summary["knn_s"] = knn.seconds  # time in the kNN monitor (compare with wall_s)
            if info.is_main:
                trainer.run.write_json("summary.json", summary)
        summary["data_images"] = loader.num_samples
        return summary
    finally:
        cleanup(info)
