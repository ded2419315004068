"""Config -> models: the MAE student, the frozen teacher, the ETMAE pair, the classifier.

Every check that can fail (unknown model, missing or wrong-size teacher checkpoint, label count
vs head) runs here, before any training step.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from fasttrain.config import ConfigError
from fasttrain.data.gpu_augment import norm_stats
from fasttrain.models import ETMAE, create_model
from fasttrain.models.checkpoints import CheckpointError, load_into, load_teacher, read_checkpoint, safe_globals

log = logging.getLogger("fasttrain.train")

_ARCH_KEYS = ("patch_size", "embed_dim", "depth", "num_heads")
_DECODER_KEYS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def mae_overrides(m) -> dict:
    """ModelConfig -> create_model overrides for an MAE (None fields keep the registry's value)."""
    over = dict(img_size=m.img_size, in_chans=m.in_chans, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss)
    for k in _ARCH_KEYS + _DECODER_KEYS:
        if getattr(m, k) is not None:
            over[k] = getattr(m, k)
    return over


def classifier_overrides(m) -> dict:
    over = dict(img_size=m.img_size, in_chans=m.in_chans, num_classes=m.num_classes, drop_path_rate=m.drop_path)
    for k in _ARCH_KEYS:
        if getattr(m, k) is not None:
            over[k] = getattr(m, k)
    return over


def _check_name(name: str, prefix: str, key: str) -> None:
    if not name.startswith(prefix):
        raise ConfigError(f"config key '{key}': '{name}' is not a{'n MAE' if prefix == 'mae_' else ' classifier'} "
                          f"model; use a name starting with '{prefix}' (e.g. {prefix}vit_tiny_patch16)")


def input_norms(norm: str) -> dict[int, tuple[tuple[float, ...], tuple[float, ...]]]:
    """data.norm -> its (mean, std) for 1 and 3 input channels: what makes loading an RGB
    checkpoint into a 1-channel model (or back) exact on the grey images fasttrain feeds
    (models.checkpoints.convert_in_chans)."""
    return {c: tuple(map(tuple, norm_stats(norm, c))) for c in (1, 3)}


def build_student(cfg) -> nn.Module:
    _check_name(cfg.model.name, "mae_", "model.name")
    return create_model(cfg.model.name, **mae_overrides(cfg.model))


def peek_checkpoint(path: Path):
    """The loaded object when it is a safe torch file, else None (read_checkpoint then says why)."""
    if path.suffix == ".safetensors":
        return None
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def is_fasttrain_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "config" in obj and obj.get("kind") in ("pretrain", "finetune")


def build_teacher(cfg, student: nn.Module) -> nn.Module:
    """The frozen teacher from distill.teacher_ckpt, strictly loaded; errors before training.

    A checkpoint written by `fasttrain pretrain` carries its architecture (its resolved config);
    any other (Xiao et al., MAE, timm) needs distill.teacher = its registry name."""
    d = cfg.distill
    if d.teacher_ckpt is None:
        raise ConfigError("distillation needs a teacher checkpoint: pass --teacher CKPT "
                          "(or --distill.teacher_ckpt=PATH); a random teacher teaches nothing")
    path = Path(d.teacher_ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    raw = peek_checkpoint(path)
    if is_fasttrain_checkpoint(raw):
        if raw["kind"] != "pretrain":
            raise CheckpointError(f"teacher checkpoint {path}: a fine-tuned classifier, not an MAE; "
                                  "use the last.pt of a `fasttrain pretrain` run")
        tm = raw["config"]["model"]
        over = {k: tm[k] for k in _ARCH_KEYS + _DECODER_KEYS if tm.get(k) is not None}
        over.update(img_size=student.img_size, in_chans=student.in_chans)
        teacher = create_model(tm["name"], **over)
        state, _ = read_checkpoint(raw)
        # the teacher's channels as it was trained (its run's data.norm), the student's as fed now
        t_norm = raw["config"].get("data", {}).get("norm", cfg.data.norm)
        norms = {**input_norms(cfg.data.norm), tm["in_chans"]: input_norms(t_norm)[tm["in_chans"]]}
        load_into(teacher, state, strict=True, what=f"teacher checkpoint {path}",  # (ETMAE: takes `student.*`)
                  input_norm=norms)
        teacher.requires_grad_(False).eval()
        log.info("teacher: %s from fasttrain run checkpoint %s (step %s)", tm["name"], path, raw.get("step", {}).get("opt_step"))
    else:
        if d.teacher is None:
            raise ConfigError(f"teacher checkpoint {path} does not say its architecture: set "
                              "--distill.teacher=mae_vit_base_patch16 (or mae_vit_small_patch16)")
        _check_name(d.teacher, "mae_", "distill.teacher")
        over = {k: getattr(d, f"teacher_{k}") for k in ("embed_dim", "depth", "num_heads")
                if getattr(d, f"teacher_{k}") is not None}
        if cfg.model.patch_size is not None:
            over["patch_size"] = cfg.model.patch_size
        # An RGB teacher saw the grey image replicated and normalised per channel (data.norm's
        # 3-channel stats); loaded as a 1-channel teacher, its patch embedding folds that
        # normalisation in, so it reads the student's 1-channel input with the same response.
        teacher = load_teacher(d.teacher, str(path), img_size=student.img_size, in_chans=student.in_chans,
                               input_norm=input_norms(cfg.data.norm), **over)
        log.info("teacher: %s from %s", d.teacher, path)
    return teacher


def build_pretrain_model(cfg) -> nn.Module:
    """MAE alone (no teacher configured) or ETMAE(student, frozen teacher)."""
    student = build_student(cfg)
    if cfg.distill.teacher_ckpt is None and cfg.distill.teacher is None:
        return student
    teacher = build_teacher(cfg, student)
    d = cfg.distill
    return ETMAE(student, teacher, d.student_blocks, d.teacher_blocks, alpha=d.alpha, proj=d.proj)


def build_classifier(cfg, num_labels: int | None = None) -> nn.Module:
    m = cfg.model
    _check_name(m.name, "vit_", "model.name")
    if num_labels is not None and m.num_classes != num_labels:
        if m.num_classes == 0:
            m.num_classes = num_labels
        else:
            raise ConfigError(f"the dataset has {num_labels} labels but model.num_classes = {m.num_classes}; "
                              f"set --model.num_classes={num_labels} or use the matching dataset")
    if m.num_classes < 1:
        raise ConfigError("config key 'model.num_classes' must be >= 1 for fine-tuning")
    return create_model(m.name, **classifier_overrides(m))


def init_classifier(model: nn.Module, path: str, norm: str) -> None:
    """Encoder weights from a student checkpoint: ours (pretrain last.pt/best.pt), an exported
    timm safetensors, or any MAE checkpoint. Strict on the encoder keys. `norm`: the data.norm
    the classifier is fed (an RGB checkpoint into a 1-channel classifier folds it in)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--init checkpoint not found: {p}")
    raw = peek_checkpoint(p)
    if is_fasttrain_checkpoint(raw) and raw["kind"] != "pretrain":
        raise CheckpointError(f"{p}: a fine-tuned classifier; --init takes a pre-trained student "
                              "(the last.pt of a `fasttrain pretrain` run or an exported .safetensors)")
    norms = input_norms(norm)
    if is_fasttrain_checkpoint(raw):  # its channels as its run fed them (that run's data.norm), ours as fed now
        src = raw["config"]
        src_chans, src_norm = src["model"].get("in_chans", 1), src.get("data", {}).get("norm", norm)
        norms = {**norms, src_chans: input_norms(src_norm)[src_chans]}
    report = model.load_pretrained(raw if raw is not None else str(p), what=str(p), input_norm=norms)
    log.info("fine-tuning init: %d tensors from %s", len(report.loaded), p)
