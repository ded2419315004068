"""Which images of a split a run reads when it reads fewer than all: `data.views` (the packed
'view' metadata) and `data.label_fraction` (a patient-disjoint share of the training split).

The subset is a sorted array of positions in the split's (or mixture's) index space; the samplers
draw from it (EpochSampler / MixtureSampler `subset`; FFCV and DALI read one dataset as a mixture
of one part, so the same sampler), and the run's provenance lists it. The fraction is drawn per
whole patient: patients (sorted ids, a mixture's prefixed by their part)
are permuted by numpy's PCG64 seeded with run.seed, the same permutation on every machine, and
taken in that order until the share of images is reached.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .base import LoaderError


def parse_views(views) -> Optional[tuple[str, ...]]:
    """data.views: None, "PA,AP" or ["PA", "AP"] -> ("PA", "AP") (upper-case; None = every view)."""
    if views is None:
        return None
    items = views.split(",") if isinstance(views, str) else list(views)
    out = tuple(" ".join(str(v).strip().upper().split()).replace(" ", "_") for v in items if str(v).strip())
    if not out:
        raise LoaderError(f"data.views: no view names in {views!r} (e.g. PA,AP)")
    return out


def view_mask(packed, views: tuple[str, ...]) -> np.ndarray:
    """bool [N] over a PackedMixture: the image's packed view is one of `views`; a part without view
    metadata is an error."""
    masks = []
    for p in packed.parts:
        meta = p.metadata
        if "view" not in meta:
            raise LoaderError(f"data.views={list(views)}: {p.root} (split '{p.split}') has no 'view' metadata "
                              f"(it has {sorted(meta) or 'none'}); convert it again with this fasttrain, or filter "
                              f"at convert time with --views")
        masks.append(np.array([v in views for v in meta["view"]], dtype=bool))
    return np.concatenate(masks)


def patient_keys(packed) -> np.ndarray:
    """The patient of every image of a PackedMixture, prefixed by its part when there are several
    (parts share no patient)."""
    parts = packed.parts
    keys = []
    for k, p in enumerate(parts):
        meta = p.metadata
        if "patient" not in meta:
            raise LoaderError(f"data.label_fraction: {p.root} (split '{p.split}') has no 'patient' metadata, so "
                              "no patient-disjoint subset; convert it again with this fasttrain")
        pre = f"{k}:" if len(parts) > 1 else ""
        keys.append(np.array([pre + ("" if v is None else str(v)) for v in meta["patient"]], dtype=object))
    return np.concatenate(keys)


def fraction_subset(patients: np.ndarray, labels: np.ndarray, label_names: list[str], fraction: float,
                    seed: int, candidates: np.ndarray) -> np.ndarray:
    """Sorted positions of whole patients (among `candidates`, sorted positions) holding
    ceil(fraction * len(candidates)) images or just over; an error names every label whose
    positives in the candidates all fall outside the subset."""
    if not 0.0 < fraction <= 1.0:
        raise LoaderError(f"data.label_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return candidates
    cand_patients = patients[candidates]
    uniq, inverse = np.unique(cand_patients.astype(str), return_inverse=True)  # sorted ids: order-free
    order = np.random.Generator(np.random.PCG64(int(seed))).permutation(len(uniq))
    per = np.bincount(inverse, minlength=len(uniq))  # [U] images per patient
    need = int(np.ceil(fraction * len(candidates)))
    taken = order[: int(np.searchsorted(np.cumsum(per[order]), need)) + 1]  # patients until `need` images
    keep = np.isin(inverse, taken)
    subset = candidates[keep]
    if labels.shape[1]:
        had = np.nansum(labels[candidates] == 1, axis=0) > 0  # [L] positives in the whole split
        has = np.nansum(labels[subset] == 1, axis=0) > 0
        lost = [label_names[j] for j in np.flatnonzero(had & ~has)]
        if lost:
            raise LoaderError(f"data.label_fraction={fraction} (seed {seed}) keeps {len(subset)} of "
                              f"{len(candidates)} images, with no positive for label(s) {lost}; "
                              "raise the fraction or choose another run.seed")
    return subset


def select(packed, data_cfg, split: str, seed: int, need_labels: bool = True) -> Optional[np.ndarray]:
    """The positions a loader of `split` reads (None: all), from data.views and, for every labelled
    read of the training split (fine-tuning's batches, the probe's features, whether augmented or
    not; never MAE pre-training, which reads no label), data.label_fraction; records what it chose
    on `packed.subset_info` for provenance."""
    views = parse_views(getattr(data_cfg, "views", None))
    fraction = getattr(data_cfg, "label_fraction", 1.0)
    fraction = 1.0 if fraction is None else float(fraction)
    use_fraction = need_labels and split == data_cfg.train_split and fraction != 1.0
    if not 0.0 < fraction <= 1.0:
        raise LoaderError(f"data.label_fraction must be in (0, 1], got {fraction}")
    if views is None and not use_fraction:
        return None
    n = len(packed)
    subset = np.arange(n, dtype=np.int64)
    if views is not None:
        subset = np.flatnonzero(view_mask(packed, views)).astype(np.int64)
        if subset.size == 0:
            raise LoaderError(f"data.views={list(views)}: no image of split '{split}' has one of these views")
    info = {"views": list(views) if views else None, "label_fraction": fraction if use_fraction else None,
            "seed": int(seed) if use_fraction else None}
    if use_fraction:
        subset = fraction_subset(patient_keys(packed), np.asarray(packed.labels), list(packed.label_names),
                                 fraction, seed, subset)
        info["ids"] = [packed.ids[i] for i in subset]  # the exact training images, for the provenance
    info["count"], info["of"] = int(subset.size), int(n)
    packed.subset_info = info
    return subset
