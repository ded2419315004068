"""`fasttrain evaluate`: a fine-tuned checkpoint on a split of a packed dataset; per-label AUC and
mAUC with 95% bootstrap confidence intervals, ROC curves, calibration and subgroups.

    fasttrain evaluate --ckpt RUN/checkpoints/best.pt --data PACKED --split test

The point estimates come from fasttrain.metrics (sklearn's roc_auc_score; a label with one
class present is undefined, never counted as 0). The CI resamples the evaluated *images* with
replacement (seeded), recomputes every label's AUC and the mean AUC on each resample, and takes
the 2.5 / 97.5 percentiles (metrics.bootstrap_auc): the percentile bootstrap clinical readers expect.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from fasttrain.config import ConfigError
from fasttrain.data import build_loader
from fasttrain.data.mixture import missing_split
from fasttrain.eval.calibration import (apply_temperature, calibration_report, fit_temperature, format_calibration,
                                         plot_reliability, save_temperature)
from fasttrain.eval.subgroups import (DEFAULT_AGE_BINS, format_subgroups, group_column, parse_age_bins,
                                       subgroup_report, youden_thresholds)
from fasttrain.io import write_atomic_with, write_json_atomic
from fasttrain.labelmap import match_labels, parse_label_map
from fasttrain.metrics import bootstrap_auc
from fasttrain.train.dist import resolve_device
from fasttrain.train.engine import cfg_amp_dtype
from fasttrain.train.finetune import check_split, load_classifier, predict_scores
from fasttrain.train.runlog import save_figure

__all__ = ["evaluate_checkpoint", "format_table", "plot_roc", "main"]


def plot_roc(y_true: np.ndarray, y_score: np.ndarray, label_names: list[str], path: str | Path,
             title: str = "ROC curves") -> Path:
    """One panel, one ROC curve per defined label, AUC in the legend (matplotlib Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 6))
    colors = plt.get_cmap("tab20")  # 14 labels: tab10 would repeat colours
    for j, name in enumerate(label_names):
        y, s = y_true[:, j], y_score[:, j]
        keep = ~np.isnan(y)
        y, s = y[keep], s[keep]
        if y.size == 0 or y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.2, color=colors(j % 20), label=f"{name} ({roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def format_table(result: dict, title: str = "") -> str:
    """Per-label AUC [95% CI] table and the mAUC line."""
    lines = [title] if title else []
    w = max(len(n) for n in result["labels"]) if result["labels"] else 5
    lines.append(f"{'label'.ljust(w)}  {'AUC':>6}  {'95% CI':>15}  {'pos':>5}  {'neg':>6}")
    for name, e in result["labels"].items():
        if e["defined"]:
            ci = f"[{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]" if e["ci95"] else "-"
            lines.append(f"{name.ljust(w)}  {e['auc']:6.3f}  {ci:>15}  {e['n_pos']:5d}  {e['n_neg']:6d}")
        else:
            lines.append(f"{name.ljust(w)}  {'undef':>6}  {'(one class only)':>15}  {e['n_pos']:5d}  {e['n_neg']:6d}")
    if result["mauc"] is not None:
        ci = result["mauc_ci95"]
        ci_s = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        n_def = len(result["labels"]) - len(result["undefined_labels"])
        lines.append(f"{'mAUC'.ljust(w)}  {result['mauc']:6.3f}  {ci_s:>15}  (mean of {n_def} defined labels)")
    else:
        lines.append("mAUC undefined: no label has both classes in this split")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a checkpoint

def score_split(model, cfg, ckpt, data, split: str, dev, trained_labels, *, seed: int = 0,
                batch_size: int | None = None):
    """The model's scores on every image of `split`, in the split's order -> (scores [N, C_model],
    labels [N, C_data], the loader's packed data, images/s)."""
    check_split(data, split, "--split", split)  # a part's own ':SPLIT' names the split to evaluate
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
    scores, labels = predict_scores(model, loader, dev, cfg_amp_dtype(cfg, dev))
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
    write_json_atomic(out / f"results_{split}.json", result)
    tag = "SYNTHETIC phantoms - " if synthetic else ""
    plot_roc(labels, scores, names, out / f"roc_{split}.png",
             title=title or f"{tag}ROC, {manifest.get('dataset', '')} {split} (mAUC {result['mauc'] or float('nan'):.3f})")
    ece = result["calibration"]["ece"]
    plot_reliability(labels, scores, names, out / f"reliability_{split}.png", calibrated=calibrated,
                     title=f"{tag}reliability, {manifest.get('dataset', '')} {split} "
                           f"(ECE {ece if ece is not None else float('nan'):.3f})")
    write_atomic_with(out / f"scores_{split}.npy", lambda f: np.save(f, scores.astype(np.float32)))
    result["paths"] = {"results": str(out / f"results_{split}.json"), "roc": str(out / f"roc_{split}.png"),
                       "reliability": str(out / f"reliability_{split}.png"), "scores": str(out / f"scores_{split}.npy")}
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fasttrain evaluate", description=(
        "Per-label AUC and mAUC with 95% bootstrap CIs (seeded resampling of the test images), calibration "
        "(ECE, Brier, reliability diagram), subgroups (--by) and other datasets' shared labels."))
    p.add_argument("--ckpt", required=True, help="fine-tuned checkpoint (RUN/checkpoints/best.pt)")
    p.add_argument("--data", required=True, help="packed dataset folder")
    p.add_argument("--split", default="test", help="split to evaluate (NIH: official test list; CheXpert: valid.csv)")
    p.add_argument("--out", help="folder for results_<split>.json, roc_<split>.png, reliability_<split>.png and "
                                 "scores_<split>.npy (default RUN/eval)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--by", default=None, metavar="COL[,COL...]",
                   help="subgroup table over these metadata columns (sex, age, view, ...): per-group AUC and mAUC "
                        "with CIs, worst group, gap, underdiagnosis rate")
    p.add_argument("--age-bins", default="0,40,60,80", help="edges of the age groups for --by age (years)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit one temperature per label on --val-split, store it beside the checkpoint "
                        "(CKPT.temperature.json) and report the ECE after it")
    p.add_argument("--val-split", default="val",
                   help="split that picks the underdiagnosis thresholds and fits --calibrate (default val)")
    p.add_argument("--label-map", default=None, metavar="NAME=CANONICAL[,...]",
                   help="extra spellings for the canonical label vocabulary when the data's labels differ from the "
                        "model's (README: Label vocabulary)")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    args = p.parse_args(argv)
    by = [c.strip() for c in args.by.split(",") if c.strip()] if args.by else None
    res = evaluate_checkpoint(args.ckpt, args.data, args.split, args.out, n_boot=args.bootstrap, seed=args.seed,
                              batch_size=args.batch_size, device=args.device, by=by, age_bins=args.age_bins,
                              calibrate=args.calibrate, val_split=args.val_split,
                              label_map=parse_label_map(args.label_map))
    if args.json:
        print(json.dumps(res, default=str))
    else:
        tag = "SYNTHETIC phantoms: " if res["synthetic"] else ""
        print(format_table(res, f"{tag}{res['dataset']} {args.split}, {res['n_images']} images, "
                                f"95% CI from {args.bootstrap} bootstrap resamples"))
        lm = res["label_map"]
        if not lm["identical"]:
            print(f"label map: scored {len(lm['shared'])} shared labels "
                  + ", ".join(f"{k} (model {v['model']!r} = data {v['data']!r})" for k, v in lm["shared"].items())
                  + f"; cannot score the model's {lm['not_scored_model_labels']} (not in the data) "
                    f"nor the data's {lm['not_scored_data_labels']} (no model output)")
        print("\n" + format_calibration(res["calibration"]))
        if "subgroups" in res:
            src = res["subgroups"]["thresholds_from"]
            print(f"\nsubgroups (underdiagnosis: a positive study with every label below its "
                  + (f"Youden threshold on '{src}')" if src else "threshold: no validation split, not computed)"))
            print(format_subgroups(res["subgroups"]))
        print(f"results: {res['paths']['results']}\nROC curves: {res['paths']['roc']}\n"
              f"reliability diagram: {res['paths']['reliability']}")
    return 0
