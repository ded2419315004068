"""Fine-tuning for multi-label classification and evaluation of a fine-tuned checkpoint.

    fasttrain finetune --config configs/finetune_nih.yaml --out RUN --init STUDENT_CKPT
    fasttrain evaluate --ckpt RUN/checkpoints/best.pt --data PACKED --split test

Fine-tuning follows MAE / Xiao et al.: AdamW with layer-wise lr decay, warm-up + cosine, drop
path, BCE with NaN (ignored) labels masked; validation mAUC every `run.eval_every` epochs and
checkpoints/best.pt keeps the best of it.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fasttrain.config import ConfigError, config_from_dict
from fasttrain.labelmap import match_labels
from fasttrain.data.mixture import missing_split, packed_resize_mode
from fasttrain.models.classifier import NO_WEIGHT_DECAY
from fasttrain.train import loop
from fasttrain.train.builders import build_classifier, init_classifier
from fasttrain.eval.calibration import (apply_temperature, calibration_report, fit_temperature, plot_reliability,
                                         save_temperature)
from fasttrain.train.checkpoint import load_checkpoint
from fasttrain.train.dist import DistInfo, cleanup
from fasttrain.train.engine import cfg_amp_dtype
from fasttrain.eval.evaluate import bootstrap_auc, format_table, plot_roc, predict
from fasttrain.train.optim import param_groups_weight_decay
from fasttrain.eval.subgroups import DEFAULT_AGE_BINS, group_column, parse_age_bins, subgroup_report, youden_thresholds

log = logging.getLogger("fasttrain.train")


def _check_split(path, split: str, key: str, train_split: str = "train") -> None:
    missing = missing_split(path, split, train_split)  # every part of a mixture needs it
    if missing:
        raise ConfigError(f"config key '{key}': split '{split}' is not in {'; '.join(missing)}; "
                          "convert with --val-fraction to get a validation split, or set --data.val_split=null")


def gather_predictions(scores: np.ndarray, labels: np.ndarray, info: DistInfo) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every rank's (scores, labels) shard (DDP validation)."""
    if not info.enabled:
        return scores, labels
    import torch.distributed as dist
    parts = [None] * info.world_size
    dist.all_gather_object(parts, (scores, labels))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def val_metrics(model, loader, info: DistInfo, amp_dtype) -> dict:
    """Per-label AUC and mAUC on the validation loader (no bootstrap: it runs every epoch)."""
    from fasttrain.metrics import mean_of_defined, per_label_auc
    scores, labels = predict(model, loader, info.device, amp_dtype)
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
        _check_split(cfg.data.path, cfg.data.val_split, "data.val_split", cfg.data.train_split)
    _check_split(cfg.data.path, cfg.data.train_split, "data.train_split", cfg.data.train_split)
    info = loop.setup(cfg)
    try:
        from fasttrain.data import build_loader
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
            from fasttrain.models import param_groups_layer_decay
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


# ----------------------------------------------------------------------------- evaluate

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


def score_split(model, cfg, ckpt, data, split: str, dev, trained_labels, *, seed: int = 0,
                batch_size: int | None = None):
    """The model's scores on every image of `split`, in the split's order -> (scores [N, C_model],
    labels [N, C_data], the loader's packed data, images/s)."""
    from fasttrain.data import build_loader
    _check_split(data, split, "--split", split)  # a part's own ':SPLIT' names the split to evaluate
    # the training run's mixture weights do not apply here: evaluation reads every image once
    cfg.data.path, cfg.data.weights, cfg.data.samples_per_epoch = data, None, None
    cfg.data.train_split = split
    # every image of the split, in its order (the run's view filter and label fraction chose what it
    # trained on, not what is scored; scores_<split>.npy rows match the split's ids and metadata)
    cfg.data.views, cfg.data.label_fraction = None, 1.0
    loader = build_loader(cfg.data, split, train=False, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                          device=dev, dtype=torch.float32, seed=seed, batch_size=batch_size)
    names = list(loader.label_names)
    if trained_labels is None and len(names) != model.num_classes:
        raise ValueError(f"{data} has {len(names)} labels but the classifier in {ckpt} has {model.num_classes} outputs "
                         "(and the checkpoint names none of them, so no label map applies)")
    t0 = time.perf_counter()
    scores, labels = predict(model, loader, dev, cfg_amp_dtype(cfg, dev))
    ips = len(scores) / (time.perf_counter() - t0)
    return scores, labels, loader.packed, ips


def select_shared(scores: np.ndarray, labels: np.ndarray, mapping: dict):
    """Model scores [N, C_model] and data labels [N, C_data] -> the shared labels' columns, both
    [N, S], and their names."""
    mi = [m["model_index"] for m in mapping["shared"]]
    di = [m["data_index"] for m in mapping["shared"]]
    return scores[:, mi], labels[:, di], [m["label"] for m in mapping["shared"]]


def evaluate_checkpoint(ckpt: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None, *,
                        n_boot: int = 1000, seed: int = 0, batch_size: int | None = None,
                        device: str = "auto", title: str | None = None, by: list[str] | None = None,
                        age_bins=DEFAULT_AGE_BINS, calibrate: bool = False, val_split: str = "val",
                        label_map: dict[str, str] | None = None) -> dict:
    """Per-label AUC + mAUC with bootstrap 95% CIs, and calibration (ECE, Brier), on `split` of the
    packed dataset `data`; writes OUT/results_<split>.json, OUT/roc_<split>.png,
    OUT/reliability_<split>.png and OUT/scores_<split>.npy (OUT defaults to the run's eval/).

    by: metadata columns ('sex', 'age', 'view', ...) for the subgroup table; its underdiagnosis
    thresholds come from `val_split` when `data` has it. calibrate: fit one temperature per label
    on `val_split`, store it beside the checkpoint, report the ECE after it. A dataset labelled
    with other names than the model's (NIH model, CheXpert data) is scored on the labels both
    name after the canonical map (fasttrain.labelmap; `label_map` adds spellings), and the JSON's
    "label_map" lists the shared ones and those it cannot score."""
    from fasttrain.train.dist import resolve_device
    model, cfg, trained_labels = load_classifier(ckpt)
    data = data if isinstance(data, (list, tuple)) else str(data)  # one packed dataset or a mixture's parts
    dev = resolve_device(device)
    age_bins = parse_age_bins(age_bins)
    model.to(dev)
    scores, labels, packed, ips = score_split(model, cfg, ckpt, data, split, dev, trained_labels, seed=seed,
                                              batch_size=batch_size)
    manifest = packed.manifest
    model_names = list(trained_labels) if trained_labels is not None else list(packed.label_names)
    mapping = match_labels(model_names, list(packed.label_names), label_map)
    scores, labels, names = select_shared(scores, labels, mapping)
    metadata = packed.metadata if by else {}
    if by:  # a bad column name is reported before any bootstrap
        for c in by:
            group_column(metadata, c, age_bins, f"{data} (split '{split}')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap_auc(labels, scores, names, n_boot=n_boot, seed=seed)
    result["calibration"] = calibration_report(labels, scores, names, n_boot=n_boot, seed=seed)
    val = None
    if calibrate or by:
        if not missing_split(data, val_split, val_split):
            val = select_shared(*score_split(model, cfg, ckpt, data, val_split, dev, trained_labels, seed=seed,
                                             batch_size=batch_size)[:2], mapping)
        elif calibrate:
            raise ConfigError(f"--calibrate fits the temperatures on split '{val_split}', which {data} lacks; "
                              "convert with --val-fraction or name another split with --val-split")
    calibrated = None
    if calibrate:
        temps = fit_temperature(val[1], val[0], names)
        t_path = save_temperature(ckpt, temps, {"data": str(data), "split": val_split, "n_images": int(len(val[0]))})
        calibrated = apply_temperature(scores, np.array([temps[n] for n in names]))
        after = calibration_report(labels, calibrated, names, n_boot=n_boot, seed=seed)
        result["calibration"]["temperature"] = {"per_label": temps, "fitted_on": val_split, "path": str(t_path),
                                                "ece": after["ece"], "ece_ci95": after["ece_ci95"],
                                                "ece_per_label": after["ece_per_label"], "brier": after["brier"]}
    if by:
        thresholds = youden_thresholds(val[1], val[0], names) if val is not None else None
        result["subgroups"] = subgroup_report(labels, scores, names, metadata, by, age_bins=age_bins,
                                              thresholds=thresholds, n_boot=n_boot, seed=seed,
                                              where=f"{data} (split '{split}')")
        result["subgroups"]["thresholds_from"] = val_split if val is not None else None
    result["label_map"] = {"identical": mapping["identical"],
                           "shared": {m["label"]: {"model": m["model"], "data": m["data"]} for m in mapping["shared"]},
                           "not_scored_model_labels": mapping["model_only"],
                           "not_scored_data_labels": mapping["data_only"]}
    synthetic = bool(manifest.get("synthetic", False))
    result.update(checkpoint=str(ckpt), data=str(data), split=split, n_images=int(len(scores)),
                  synthetic=synthetic, images_per_s=ips, dataset=manifest.get("dataset"))
    out = Path(out) if out is not None else Path(ckpt).resolve().parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    from fasttrain.io import write_json_atomic
    write_json_atomic(out / f"results_{split}.json", result)
    tag = "SYNTHETIC phantoms - " if synthetic else ""
    plot_roc(labels, scores, names, out / f"roc_{split}.png",
             title=title or f"{tag}ROC, {manifest.get('dataset', '')} {split} (mAUC {result['mauc'] or float('nan'):.3f})")
    ece = result["calibration"]["ece"]
    plot_reliability(labels, scores, names, out / f"reliability_{split}.png", calibrated=calibrated,
                     title=f"{tag}reliability, {manifest.get('dataset', '')} {split} "
                           f"(ECE {ece if ece is not None else float('nan'):.3f})")
    np.save(out / f"scores_{split}.npy", scores.astype(np.float32))
    result["paths"] = {"results": str(out / f"results_{split}.json"), "roc": str(out / f"roc_{split}.png"),
                       "reliability": str(out / f"reliability_{split}.png"), "scores": str(out / f"scores_{split}.npy")}
    return result


__all__ = ["run_finetune", "evaluate_checkpoint", "load_classifier", "format_table", "val_metrics"]
