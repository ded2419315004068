"""Can the probabilities be trusted: ECE (15 equal-width bins) and Brier score per label with
bootstrap CIs, a reliability diagram, and temperature scaling fitted on a validation split.

Temperature scaling (Guo et al. 2017) divides each label's logit by one positive T fitted to
minimise that label's BCE on validation scores; T is monotone in the score, so every AUC is
unchanged and only the calibration moves. The temperatures are stored as JSON beside the
checkpoint (`<ckpt>.temperature.json`) for whoever serves the model.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from fasttrain.io import write_json_atomic
from fasttrain.metrics import ECE_BINS, bootstrap_ece_matrix, brier_score, calibration_bins, expected_calibration_error
from fasttrain.train.runlog import save_figure

LOGIT_CLIP = 1e-7  # scores are float32 sigmoids: clip before the logit so 0 / 1 stay finite
TEMPERATURE_RANGE = (0.05, 20.0)  # log-spaced search bounds: beyond them a label is degenerate


def calibration_report(y_true: np.ndarray, y_prob: np.ndarray, label_names: list[str], *, n_boot: int = 1000,
                       seed: int = 0, level: float = 0.95, n_bins: int = ECE_BINS) -> dict:
    """y_true [N, C] (0/1, NaN = unknown), y_prob [N, C] -> {"ece", "ece_ci95", "ece_per_label",
    "ece_per_label_ci95", "brier", "brier_per_label", "bins", "undefined_labels"}.

    A label's ECE / Brier is over its known rows (defined even with one class present); the mean
    ECE / Brier is over the labels with known rows; the mean's CI from the same resamples as the
    AUC bootstrap (same seed)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.shape != y_prob.shape or y_true.shape[1] != len(label_names):
        raise ValueError(f"labels {y_true.shape} and scores {y_prob.shape} must both be [N, {len(label_names)}]")
    ece = {n: expected_calibration_error(y_true[:, j], y_prob[:, j], n_bins) for j, n in enumerate(label_names)}
    brier = {n: brier_score(y_true[:, j], y_prob[:, j]) for j, n in enumerate(label_names)}
    defined = [j for j, n in enumerate(label_names) if ece[n] is not None]
    boots = bootstrap_ece_matrix(y_true, y_prob, n_boot=n_boot, seed=seed, n_bins=n_bins)  # [B, C]
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def ci(vals: np.ndarray):
        vals = vals[~np.isnan(vals)]
        return [float(np.percentile(vals, lo_q)), float(np.percentile(vals, hi_q))] if vals.size else None

    mean_ci = None
    if defined:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss a label's known rows
            mean_ci = ci(np.nanmean(boots[:, defined], axis=1))
    return {"ece": float(np.mean([ece[label_names[j]] for j in defined])) if defined else None,
            "ece_ci95": mean_ci,
            "ece_per_label": ece,
            "ece_per_label_ci95": {n: ci(boots[:, j]) if ece[n] is not None else None
                                   for j, n in enumerate(label_names)},
            "brier": float(np.mean([brier[label_names[j]] for j in defined])) if defined else None,
            "brier_per_label": brier,
            "bins": n_bins,
            "undefined_labels": [n for n in label_names if ece[n] is None]}


def logits_of(prob: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(prob, dtype=np.float64), LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


def apply_temperature(prob: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """sigmoid(logit(p) / T) per label: prob [N, C], temperature [C] -> [N, C]."""
    return 1.0 / (1.0 + np.exp(-logits_of(prob) / np.asarray(temperature, dtype=np.float64)))


def fit_temperature(y_true: np.ndarray, y_prob: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """One T per label minimising BCE(sigmoid(logit / T)) over its known rows (bounded search on
    log T). A label without both classes keeps T = 1 (its BCE has no interior minimum)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    z_all = logits_of(y_prob)
    out = {}
    for j, name in enumerate(label_names):
        keep = ~np.isnan(y_true[:, j])
        y, z = y_true[keep, j], z_all[keep, j]
        if y.size == 0 or y.min() == y.max():
            out[name] = 1.0
            continue

        def bce(log_t: float) -> float:
            s = z / np.exp(log_t)
            # log(1 + e^-s) for y = 1, log(1 + e^s) for y = 0, in the stable logaddexp form
            return float(np.mean(np.logaddexp(0.0, np.where(y == 1, -s, s))))

        res = minimize_scalar(bce, bounds=tuple(np.log(TEMPERATURE_RANGE)), method="bounded",
                              options={"xatol": 1e-6})
        out[name] = float(np.exp(res.x))
    return out


def temperature_path(ckpt) -> Path:
    return Path(str(ckpt) + ".temperature.json")


def save_temperature(ckpt, temperatures: dict[str, float], fitted_on: dict) -> Path:
    """Write `<ckpt>.temperature.json` atomically: {"temperature": {label: T}, "fitted_on": ...}."""
    return write_json_atomic(temperature_path(ckpt), {"temperature": temperatures, "fitted_on": fitted_on,
                                                       "apply": "p = sigmoid(logit / T) per label"})


def plot_reliability(y_true: np.ndarray, y_prob: np.ndarray, label_names: list[str], path, *, title: str,
                     n_bins: int = ECE_BINS, calibrated: np.ndarray | None = None) -> Path:
    """Reliability diagram: observed positive rate against mean predicted probability per bin, every
    label pooled (thick; after temperature scaling dashed) and per label (thin); bar chart of the
    pooled bin counts below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    y_true = np.asarray(y_true, dtype=np.float64)
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(6.5, 7.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    colors = plt.get_cmap("tab20")

    def curve(y, p):
        b = calibration_bins(p, n_bins)
        n = np.bincount(b, minlength=n_bins)
        sy = np.bincount(b, weights=y, minlength=n_bins)
        sp = np.bincount(b, weights=p, minlength=n_bins)
        ok = n > 0
        return sp[ok] / n[ok], sy[ok] / n[ok], n

    for j, name in enumerate(label_names):
        keep = ~np.isnan(y_true[:, j])
        if keep.any():
            x, f, _ = curve(y_true[keep, j], y_prob[keep, j])
            ax.plot(x, f, lw=0.7, alpha=0.6, color=colors(j % 20), label=name)
    keep = ~np.isnan(y_true)
    x, f, n = curve(y_true[keep], np.asarray(y_prob)[keep])
    ax.plot(x, f, "k-o", lw=2, ms=3, label="all labels")
    if calibrated is not None:
        xc, fc, _ = curve(y_true[keep], np.asarray(calibrated)[keep])
        ax.plot(xc, fc, "k--s", lw=1.5, ms=3, label="all labels, temperature-scaled")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_ylabel("observed positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="upper left", ncol=2)
    axh.bar((np.arange(n_bins) + 0.5) / n_bins, n, width=1.0 / n_bins, color="grey", edgecolor="k", lw=0.4)
    axh.set_yscale("log" if n.max() > 0 else "linear")
    axh.set_xlabel("predicted probability")
    axh.set_ylabel("images x labels")
    axh.set_xlim(0, 1)
    fig.tight_layout()
    return save_figure(fig, path)


def format_calibration(cal: dict) -> str:
    """ECE [95% CI] and Brier per label, the means, and the temperature-scaled ECE when fitted."""
    names = list(cal["ece_per_label"])
    w = max([len(n) for n in names] + [5])
    after = cal.get("temperature")
    head = f"{'label'.ljust(w)}  {'ECE':>6}  {'95% CI':>15}  {'Brier':>6}"
    if after:
        head += f"  {'T':>5}  {'ECE (T)':>7}"
    lines = [f"calibration ({cal['bins']} equal-width bins)", head]
    for n in names:
        e = cal["ece_per_label"][n]
        if e is None:
            lines.append(f"{n.ljust(w)}  {'-':>6}  {'(no known rows)':>15}")
            continue
        c = cal["ece_per_label_ci95"][n]
        ci = f"[{c[0]:.3f}, {c[1]:.3f}]" if c else "-"
        line = f"{n.ljust(w)}  {e:6.3f}  {ci:>15}  {cal['brier_per_label'][n]:6.3f}"
        if after:
            line += f"  {after['per_label'][n]:5.2f}  {after['ece_per_label'][n]:7.3f}"
        lines.append(line)
    c = cal["ece_ci95"]
    ci = f"[{c[0]:.3f}, {c[1]:.3f}]" if c else "-"
    if cal["ece"] is not None:
        line = f"{'mean'.ljust(w)}  {cal['ece']:6.3f}  {ci:>15}  {cal['brier']:6.3f}"
        if after:
            line += f"  {'':>5}  {after['ece']:7.3f}"
        lines.append(line)
    return "\n".join(lines)
