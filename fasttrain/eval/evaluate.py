"""Evaluation: per-label AUC and mAUC with 95% bootstrap confidence intervals, ROC curves.

The point estimates come from fasttrain.metrics (sklearn's roc_auc_score; a label with one
class present is undefined, never counted as 0). The CI resamples the evaluated *images* with
replacement (seeded), recomputes every label's AUC and the mean AUC on each resample, and takes
the 2.5 / 97.5 percentiles: the percentile bootstrap clinical readers expect.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from fasttrain.train.runlog import save_figure


def bootstrap_auc(y_true: np.ndarray, y_score: np.ndarray, label_names: list[str], *,
                  n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """y_true [N, C] (0/1, NaN = unknown), y_score [N, C] -> per-label AUC + CI and mAUC + CI.

    Returns {"labels": {name: {"auc", "ci95", "n_pos", "n_neg", "defined"}}, "mauc", "mauc_ci95",
    "undefined_labels", "bootstrap": {"n", "seed", "level"}}. mAUC is the mean over the labels
    defined on the whole set; on a resample, over those of them defined on that resample."""
    from fasttrain.metrics import bootstrap_auc_matrix, mean_of_defined, per_label_auc
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape != y_score.shape or y_true.ndim != 2 or y_true.shape[1] != len(label_names):
        raise ValueError(f"labels {y_true.shape} and scores {y_score.shape} must both be [N, {len(label_names)}]")
    point = per_label_auc(y_true, y_score, label_names)  # {name: auc | None}; warns on undefined ones
    mauc = mean_of_defined(point)
    defined = [j for j, n in enumerate(label_names) if point[n] is not None]
    # [B, C]: vectorised (ranks once, Mann-Whitney from resample counts); same resamples and
    # values as the sklearn loop `bootstrap_auc_matrix_reference` for the same seed
    boots = bootstrap_auc_matrix(y_true, y_score, defined, n_boot=n_boot, seed=seed)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    labels = {}
    for j, name in enumerate(label_names):
        col = y_true[:, j]
        col = col[~np.isnan(col)]
        entry = {"auc": point[name], "n_pos": int((col == 1).sum()), "n_neg": int((col == 0).sum()),
                 "defined": point[name] is not None, "ci95": None}
        vals = boots[:, j][~np.isnan(boots[:, j])]
        if entry["defined"] and vals.size:
            entry["ci95"] = [float(np.percentile(vals, lo_q)), float(np.percentile(vals, hi_q))]
        labels[name] = entry
    mauc_ci = None
    if defined:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample may leave a row all-NaN
            per_boot = np.nanmean(boots[:, defined], axis=1)  # [B]
        per_boot = per_boot[~np.isnan(per_boot)]
        if per_boot.size:
            mauc_ci = [float(np.percentile(per_boot, lo_q)), float(np.percentile(per_boot, hi_q))]
    return {"labels": labels, "mauc": mauc, "mauc_ci95": mauc_ci,
            "undefined_labels": [n for n in label_names if point[n] is None],
            "bootstrap": {"n": n_boot, "seed": seed, "level": level}}


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device, amp_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and labels over a loader -> (scores [N, C], labels [N, C]) as float64."""
    model.eval()
    scores, labels = [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        ctx = torch.autocast(torch.device(device).type, dtype=amp_dtype) if amp_dtype else _null()
        with ctx:
            logits = model(images)  # [B, C]
        scores.append(torch.sigmoid(logits.float()).cpu())
        labels.append(y.float().cpu())
    if not scores:
        raise ValueError("evaluation split is empty")
    return torch.cat(scores).double().numpy(), torch.cat(labels).double().numpy()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


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
