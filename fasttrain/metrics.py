"""Per-label ROC AUC and their mean, for multi-label chest X-ray classification.

A label whose evaluated targets hold a single class has no ROC curve: its AUC is undefined,
reported as None, warned about, and left out of the mean -- never counted as 0 (the seed did,
which drags the mean down by 1/C per such label).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def _as_2d(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().float().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [N, C], got shape {list(a.shape)}")
    return a


def per_label_auc(y_true, y_score, label_names: Sequence[str]) -> dict[str, float | None]:
    """y_true [N, C] in {0, 1} (NaN = ignored), y_score [N, C] -> {label: AUC or None}.

    For each label the images with a NaN target are dropped; AUC = sklearn's roc_auc_score on
    the rest. None (with a warning naming the label) when fewer than two classes remain.
    """
    t = _as_2d(y_true, "y_true")
    s = _as_2d(y_score, "y_score")
    if t.shape != s.shape:
        raise ValueError(f"y_true {list(t.shape)} and y_score {list(s.shape)} must have the same shape")
    if len(label_names) != t.shape[1]:
        raise ValueError(f"{len(label_names)} label names for {t.shape[1]} label columns")
    if not np.isfinite(s).all():
        bad = [label_names[j] for j in range(s.shape[1]) if not np.isfinite(s[:, j]).all()]
        raise ValueError(f"non-finite scores for labels {bad}")
    out: dict[str, float | None] = {}
    undefined = []
    for j, name in enumerate(label_names):
        keep = ~np.isnan(t[:, j])
        tj, sj = t[keep, j], s[keep, j]
        if not np.isin(tj, (0.0, 1.0)).all():
            raise ValueError(f"label '{name}': targets must be 0, 1 or NaN, got {sorted(set(tj.tolist()))[:5]}")
        if len(np.unique(tj)) < 2:
            out[name] = None
            undefined.append(f"{name} (n={len(tj)}, only class {int(tj[0]) if len(tj) else '-'})")
        else:
            out[name] = float(roc_auc_score(tj, sj))
    if undefined:
        warnings.warn("AUC undefined (a single class present), left out of the mean: " + ", ".join(undefined),
                      RuntimeWarning, stacklevel=2)
    return out


def mean_of_defined(aucs: dict[str, float | None]) -> float | None:
    """Mean over the labels whose AUC is defined; None if none is."""
    vals = [v for v in aucs.values() if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def mean_auc(y_true, y_score, label_names: Sequence[str]) -> float | None:
    """Mean AUC over the labels with a defined AUC (see per_label_auc); None if no label has one."""
    return mean_of_defined(per_label_auc(y_true, y_score, label_names))
