"""Optimiser and learning-rate schedule.

AdamW three ways: fused (one kernel for the whole update; works on CPU and CUDA in torch >= 2.4),
apex's FusedAdam when the user has apex (optional), and the plain for-loop AdamW of the baseline
(the reference mode). The lr follows MAE: absolute lr = blr * effective batch / 256, linear
warm-up then half-cycle cosine, updated every optimiser step (not every epoch).
"""
from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
from timm.optim import param_groups_weight_decay as timm_param_groups_weight_decay

log = logging.getLogger("fasttrain.train")


def absolute_lr(optim_cfg, eff_batch: int) -> float:
    """MAE's linear scaling rule: lr = blr * eff_batch / 256, unless an absolute lr is given."""
    if optim_cfg.lr is not None:
        return float(optim_cfg.lr)
    return optim_cfg.blr * eff_batch / 256


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float,
                              no_weight_decay: Iterable[str] = ()) -> list[dict]:
    """AdamW groups without layer decay: timm's `param_groups_weight_decay` (the successor of
    the `add_weight_decay` that MAE's and Xiao et al.'s main_pretrain.py call), each group
    with lr_scale 1.

    No decay on 1-d tensors, biases and the names in `no_weight_decay`; decay on the rest.
    Pre-training passes no names, as the anchors do, so `cls_token` and `mask_token`
    ([1, 1, D], not 1-d) are decayed; the sin-cos `pos_embed` is frozen and so in no group.
    Fine-tuning passes the classifier's NO_WEIGHT_DECAY (MAE's `no_weight_decay()` list)."""
    groups = timm_param_groups_weight_decay(model, weight_decay, no_weight_decay_list=tuple(no_weight_decay))
    return [{**g, "lr_scale": 1.0} for g in groups]


def build_optimizer(groups: Iterable[dict], lr: float, optim_cfg, *, reference: bool = False,
                    device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """AdamW over `groups` (each may carry "lr_scale", kept for the schedule).

    reference=True: the baseline's plain for-loop AdamW (foreach=False, fused=False): the baseline.
    Otherwise fused AdamW when optim.fused (apex FusedAdam if installed and on CUDA), foreach
    otherwise; a failure to build the fused one falls back to foreach with a log line."""
    groups = [dict(g) for g in groups]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["lr"] = lr * g["lr_scale"]
    betas = tuple(optim_cfg.betas)
    if len(betas) != 2:
        raise ValueError(f"config key 'optim.betas': expected two values, got {list(betas)}")
    kw = dict(lr=lr, betas=betas, weight_decay=optim_cfg.weight_decay)
    if reference:
        return torch.optim.AdamW(groups, foreach=False, fused=False, **kw)
    if optim_cfg.fused:
        if torch.device(device).type == "cuda":
            try:  # apex is optional: only used when the user installed it
                from apex.optimizers import FusedAdam  # type: ignore
                log.info("optimizer: apex FusedAdam (adam_w_mode)")
                return FusedAdam(groups, adam_w_mode=True, **kw)
            except ImportError:
                pass
        try:
            opt = torch.optim.AdamW(groups, fused=True, **kw)
            log.info("optimizer: torch AdamW(fused=True)")
            return opt
        except (RuntimeError, ValueError) as e:
            log.warning("optimizer: fused AdamW unavailable here (%s); using foreach AdamW", e)
    return torch.optim.AdamW(groups, foreach=True, **kw)


def lr_at(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then half-cycle cosine from base_lr to min_lr at
    `total_steps` (MAE's `adjust_learning_rate`, evaluated per optimiser step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


class Schedule:
    """Sets each group's lr = lr_at(step) * group["lr_scale"]. Stateless apart from the step
    counter the trainer checkpoints, so resume needs only the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, min_lr: float,
                 warmup_steps: int, total_steps: int):
        self.optimizer = optimizer
        self.base_lr, self.min_lr = base_lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def lr(self, step: int) -> float:
        return lr_at(step, base_lr=self.base_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps)

    def apply(self, step: int) -> float:
        lr = self.lr(step)
        for g in self.optimizer.param_groups:
            # A python float: changing it never recompiles the fused optimizer kernel.
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps}
