"""Fine-tuning for multi-label classification, its validation, and loading a fine-tuned checkpoint.

    fasttrain finetune --config configs/finetune_nih.yaml --out RUN --init STUDENT_CKPT

Fine-tuning follows MAE / Xiao et al.: AdamW with layer-wise lr decay, warm-up + cosine, drop
path, BCE with NaN (ignored) labels masked; validation mAUC every `run.eval_every` epochs and
checkpoints/best.pt keeps the best of it.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fasttrain.config import ConfigError, config_from_dict
from fasttrain.data import build_loader
from fasttrain.data.mixture import missing_split, packed_resize_mode
from fasttrain.metrics import mean_of_defined, per_label_auc
from fasttrain.models import param_groups_layer_decay
from fasttrain.models.classifier import NO_WEIGHT_DECAY
from fasttrain.train import loop
from fasttrain.train.builders import build_classifier, init_classifier
from fasttrain.train.checkpoint import load_checkpoint
from fasttrain.train.dist import DistInfo, cleanup
from fasttrain.train.engine import autocast, cfg_amp_dtype
from fasttrain.train.optim import param_groups_weight_decay

log = logging.getLogger("fasttrain.train")


def check_split(path, split: str, key: str, train_split: str = "train") -> None:
    """ConfigError naming `key` when a part of the packed dataset (or mixture) at `path` lacks `split`."""
    missing = missing_split(path, split, train_split)  # every part of a mixture needs it
    if missing:
        raise ConfigError(f"config key '{key}': split '{split}' is not in {'; '.join(missing)}; "
                          "convert with --val-fraction to get a validation split, or set --data.val_split=null")


@torch.no_grad()
def predict_scores(model: torch.nn.Module, loader, device, amp_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and labels over a loader -> (scores [N, C], labels [N, C]) as float64."""
    model.eval()
    scores, labels = [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)  # [B, C]
        scores.append(torch.sigmoid(logits.float()).cpu())
        labels.append(y.float().cpu())
    if not scores:
        raise ValueError("evaluation split is empty")
    return torch.cat(scores).double().numpy(), torch.cat(labels).double().numpy()


def gather_predictions(scores: np.ndarray, labels: np.ndarray, info: DistInfo) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every rank's (scores, labels) shard (DDP validation)."""
    if not info.enabled:
        return scores, labels
    parts = [None] * info.world_size
    dist.all_gather_object(parts, (scores, labels))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def val_metrics(model, loader, info: DistInfo, amp_dtype) -> dict:
    """Per-label AUC and mAUC on the validation loader (no bootstrap: it runs every epoch)."""
    scores, labels = predict_scores(model, loader, info.device, amp_dtype)
    scores, labels = gather_predictions(scores, labels, info)
    if len(scores) != loader.dataset_size:  # the ranks' shards: each image once, none repeated or dropped
        raise RuntimeError(f"validation scored {len(scores)} images of a {loader.dataset_size}-image split over "
                           f"{info.world_size} rank(s) ({loader.describe()}): each image must count once")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined labels: reported as None below
        aucs = per_label_auc(labels, scores, loader.label_names)
    return {"mauc": mean_of_defined(aucs), "auc": aucs, "loss": val_bce(scores, labels)}


def val_bce(scores: np.ndarray, labels: np.ndarray) -> float:
    """The training loss (engine.bce_masked) on validation: mean BCE over the known (non-NaN)
    labels, from the sigmoid scores [N, C] (clipped as float32 logits would saturate): the val curve."""
    valid = ~np.isnan(labels)
    p = np.clip(scores[valid], 1e-7, 1 - 1e-7)
    y = labels[valid]
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean()) if valid.any() else float("nan")


def run_finetune(cfg, resume=None) -> dict:
    loop.require_run_and_data(cfg)
    if cfg.data.val_split is not None:
        check_split(cfg.data.path, cfg.data.val_split, "data.val_split", cfg.data.train_split)
    check_split(cfg.data.path, cfg.data.train_split, "data.train_split", cfg.data.train_split)
    info = loop.setup(cfg)
    try:
        point = loop.plan_resume(cfg, info, resume)  # may set the per-rank batch: before any loader
        common = dict(img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, rank=info.rank,
                      world_size=info.world_size, device=info.device, dtype=torch.float32, seed=cfg.run.seed)
        loader = build_loader(cfg.data, cfg.data.train_split, train=True, **common)
        model = build_classifier(cfg, num_labels=len(loader.label_names))  # label-count check first
        if cfg.model.init is not None:
            init_classifier(model, cfg.model.init, cfg.data.norm)
        else:
            log.warning("fine-tuning from random init (no --init student checkpoint)")
        model.to(info.device)
        if cfg.optim.layer_decay is not None:
            groups = param_groups_layer_decay(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
        else:
            groups = param_groups_weight_decay(model, cfg.optim.weight_decay, NO_WEIGHT_DECAY)
        validate = None
        if cfg.data.val_split is not None:
            val_loader = build_loader(cfg.data, cfg.data.val_split, train=False, **common)
            amp = cfg_amp_dtype(cfg, info.device)
            validate = lambda m: val_metrics(m, val_loader, info, amp)  # noqa: E731
        trainer = loop.Trainer(cfg, "finetune", model, loader, info, groups=groups, resume=point, validate=validate,
                               extra_state={"label_names": list(loader.label_names),
                                            # packed size: what `fasttrain predict` resizes new files to
                                            "image_size": list(loader.image_size),
                                            # ... and how it fits them to the square (convert --resize)
                                            "resize": packed_resize_mode(cfg.data.path)})
        return trainer.fit()
    finally:
        cleanup(info)


# ----------------------------------------------------------------------------- loading

def load_classifier(path: str | Path, ck: dict | None = None):
    """A fine-tuned checkpoint (ours; `ck` if the caller already loaded it) -> (model in eval mode,
    its Config, its label names)."""
    ck = load_checkpoint(path) if ck is None else ck
    if ck.get("kind") != "finetune":
        raise ValueError(f"{path}: not a fine-tuned classifier checkpoint (kind={ck.get('kind')!r}); "
                         "evaluate takes RUN/checkpoints/best.pt or last.pt of a `fasttrain finetune` run")
    cfg = config_from_dict(ck["config"])
    model = build_classifier(cfg)
    model.load_state_dict(ck["model"], strict=True)
    return model.eval(), cfg, ck.get("label_names")


__all__ = ["run_finetune", "load_classifier", "val_metrics", "predict_scores", "check_split"]
