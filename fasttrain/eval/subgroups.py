"""Who does the model fail: per-group AUC / mAUC with bootstrap CIs, the worst group and the gap
to the best, and the underdiagnosis rate (Seyyed-Kalantari et al., Nat Med 2021), over the
packed dataset's metadata columns (sex, age in bins, view, ...).

A group whose targets for a label hold one class has no AUC for it: the label is left out of
that group's mAUC and listed under "undefined_labels" (never counted as 0.5).

Underdiagnosis: each label's operating threshold is chosen on the validation split (Youden's J,
the ROC point maximising TPR - FPR). A study with at least one positive label is underdiagnosed
when every label scores below its threshold: the model would call it "no finding". Per label,
"fnr" is the share of its positives scored below its threshold.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
from sklearn.metrics import roc_curve

from fasttrain.labelmap import canonical
from fasttrain.metrics import bootstrap_auc

NO_FINDING = "No Finding"  # the canonical name (fasttrain.labelmap) of the label that says 'none'

DEFAULT_AGE_BINS = (0.0, 40.0, 60.0, 80.0)


class SubgroupError(ValueError):
    """--by names a column the data lacks, or bad age bins."""


def parse_age_bins(text) -> tuple[float, ...]:
    """'0,40,60,80' -> (0, 40, 60, 80): groups [0, 40), [40, 60), [60, 80), [80, inf)."""
    if isinstance(text, str):
        try:
            edges = tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise SubgroupError(f"--age-bins {text!r}: expected increasing numbers, e.g. 0,40,60,80") from None
    else:
        edges = tuple(float(v) for v in text)
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        raise SubgroupError(f"--age-bins {text!r}: expected increasing numbers, e.g. 0,40,60,80")
    return edges


def age_bin_names(edges: Sequence[float]) -> list[str]:
    """The age groups' names, youngest first: '[0,40)', ..., '80+'."""
    return [f"[{a:g},{b:g})" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]:g}+"]


def age_groups(age: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Ages [N] (NaN = missing) -> group names [N] ('[0,40)', ..., '80+'; None = missing or below edges[0])."""
    names = age_bin_names(edges)
    k = np.searchsorted(np.asarray(edges), age, side="right") - 1  # [N] bin, -1 below the first edge
    out = np.empty(len(age), dtype=object)
    for i, (a, kk) in enumerate(zip(age, k)):
        out[i] = None if np.isnan(a) or kk < 0 else names[kk]
    return out


def group_column(metadata: dict[str, np.ndarray], column: str, age_bins: Sequence[float], where: str) -> np.ndarray:
    """The group name of every image for `--by column` (None = missing)."""
    if column not in metadata:
        have = sorted(metadata)
        raise SubgroupError(f"--by {column}: {where} has no '{column}' metadata; it has "
                            + (f"{have}" if have else "none (packed without metadata: convert it again with this "
                                                      "fasttrain to carry patient / sex / age / view)"))
    values = metadata[column]
    if column == "age":
        return age_groups(np.asarray(values, dtype=np.float64), age_bins)
    return values


def youden_thresholds(y_true: np.ndarray, y_score: np.ndarray, label_names: list[str]) -> dict[str, Optional[float]]:
    """Per label, the score threshold maximising TPR - FPR on (validation) scores; None without both classes."""
    out = {}
    for j, name in enumerate(label_names):
        keep = ~np.isnan(y_true[:, j])
        y, s = y_true[keep, j], y_score[keep, j]
        if y.size == 0 or y.min() == y.max():
            out[name] = None
            continue
        fpr, tpr, thr = roc_curve(y, s)
        k = int(np.argmax(tpr - fpr))
        out[name] = float(min(thr[k], 1.0))  # roc_curve's first threshold is +inf
    return out


def underdiagnosis(y_true: np.ndarray, y_score: np.ndarray, label_names: list[str],
                   thresholds: dict[str, Optional[float]]) -> dict:
    """{"rate", "n_positive_studies", "n_underdiagnosed", "fnr": {label: rate | None}} over the
    labels with a threshold (a label without one is neither a positive nor a call). "No Finding"
    (CheXpert / MIMIC) is neither: a study is underdiagnosed when it has a finding and no finding
    label is called (Seyyed-Kalantari et al. 2021)."""
    cols = [j for j, n in enumerate(label_names)
            if thresholds.get(n) is not None and canonical(n) != NO_FINDING]
    thr = np.array([thresholds[label_names[j]] for j in cols])  # [K]
    y = y_true[:, cols]  # [N, K]
    called = y_score[:, cols] >= thr  # [N, K]
    positive = (y == 1).any(axis=1)  # [N] NaN compares False
    missed = positive & ~called.any(axis=1)
    fnr = {}
    for k, j in enumerate(cols):
        pos = y[:, k] == 1
        fnr[label_names[j]] = float((~called[pos, k]).mean()) if pos.any() else None
    n_pos = int(positive.sum())
    return {"rate": float(missed.sum() / n_pos) if n_pos else None, "n_positive_studies": n_pos,
            "n_underdiagnosed": int(missed.sum()), "fnr": fnr}


def subgroup_report(y_true: np.ndarray, y_score: np.ndarray, label_names: list[str], metadata: dict[str, np.ndarray],
                    by: Sequence[str], *, age_bins: Sequence[float] = DEFAULT_AGE_BINS,
                    thresholds: Optional[dict[str, Optional[float]]] = None, n_boot: int = 1000, seed: int = 0,
                    where: str = "the data") -> dict:
    """{"groups": {column: {group: {"n", "mauc", "mauc_ci95", "auc": {label: auc}, "ci": {label: [lo, hi]},
    "undefined_labels", "underdiagnosis"}}}, "missing": {column: n}, "worst": {column: {"group", "mauc"}},
    "gap": {column: best mAUC - worst mAUC}, "thresholds": {...}, "age_bins": [...]}."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    columns = {c: group_column(metadata, c, age_bins, where) for c in by}  # every bad name before any work
    for c, g in columns.items():
        if len(g) != len(y_true):
            raise SubgroupError(f"--by {c}: {len(g)} metadata values for {len(y_true)} scored images in {where}")
    out = {"groups": {}, "missing": {}, "worst": {}, "gap": {}, "thresholds": thresholds,
           "age_bins": list(age_bins) if "age" in by else None}
    for c, g in columns.items():
        present = np.array([v is not None for v in g], dtype=bool)
        out["missing"][c] = int((~present).sum())
        groups = {}
        rank = {n: k for k, n in enumerate(age_bin_names(age_bins))} if c == "age" else {}  # ages youngest first
        for name in sorted({v for v in g[present]}, key=lambda v: (rank.get(v, 0), str(v))):
            rows = np.flatnonzero(present & (g == name))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # undefined labels: listed below
                r = bootstrap_auc(y_true[rows], y_score[rows], label_names, n_boot=n_boot, seed=seed)
            entry = {"n": int(rows.size), "mauc": r["mauc"], "mauc_ci95": r["mauc_ci95"],
                     "auc": {n: e["auc"] for n, e in r["labels"].items() if e["defined"]},
                     "ci": {n: e["ci95"] for n, e in r["labels"].items() if e["defined"]},
                     "n_pos": {n: e["n_pos"] for n, e in r["labels"].items()},
                     "undefined_labels": r["undefined_labels"]}
            if thresholds is not None:
                entry["underdiagnosis"] = underdiagnosis(y_true[rows], y_score[rows], label_names, thresholds)
            groups[str(name)] = entry
        out["groups"][c] = groups
        scored = {k: v["mauc"] for k, v in groups.items() if v["mauc"] is not None}
        if scored:
            worst = min(scored, key=scored.get)
            out["worst"][c] = {"group": worst, "mauc": scored[worst]}
            out["gap"][c] = max(scored.values()) - scored[worst]
    return out


def format_subgroups(rep: dict) -> str:
    """One table per column: group, n, mAUC [95% CI], undefined labels, underdiagnosis; worst and gap."""
    lines = []
    for c, groups in rep["groups"].items():
        w = max([len(g) for g in groups] + [len(c), 5])
        lines.append(f"{c.ljust(w)}  {'n':>6}  {'mAUC':>6}  {'95% CI':>15}  {'undef':>5}  {'underdiag':>9}")
        for g, e in groups.items():
            m = f"{e['mauc']:6.3f}" if e["mauc"] is not None else f"{'-':>6}"
            ci = f"[{e['mauc_ci95'][0]:.3f}, {e['mauc_ci95'][1]:.3f}]" if e["mauc_ci95"] else "-"
            ud = e.get("underdiagnosis")
            ud_s = f"{ud['rate']:9.3f}" if ud and ud["rate"] is not None else f"{'-':>9}"
            lines.append(f"{g.ljust(w)}  {e['n']:6d}  {m}  {ci:>15}  {len(e['undefined_labels']):5d}  {ud_s}")
        if rep["missing"].get(c):
            lines.append(f"{'(missing)'.ljust(w)}  {rep['missing'][c]:6d}  not grouped")
        if c in rep["worst"]:
            lines.append(f"worst {c}: {rep['worst'][c]['group']} (mAUC {rep['worst'][c]['mauc']:.3f}), "
                         f"gap to the best {rep['gap'][c]:.3f}")
        lines.append("")
    return "\n".join(lines).rstrip()
