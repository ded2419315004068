"""One label vocabulary across chest X-ray datasets: each dataset's names -> shared canonical ones.

A model fine-tuned on one dataset is scored on another only on the findings both name (Cohen et
al. 2020: most of the cross-dataset drop is label shift, so an unmatched label is listed, never
forced). Names are matched after case-folding, '_' -> ' ' and whitespace collapsing, so
"Pleural_Thickening" (NIH), "Pleural Thickening" and "pleural thickening" (PadChest) agree.

The table (README "Label vocabulary" prints it): ALIASES[canonical] = every dataset's spelling.
Deliberately absent: merges that change a finding's meaning (NIH "Mass" / "Nodule" are not
CheXpert's "Lung Lesion"; NIH "Infiltration" is not CheXpert's "Lung Opacity").
"""
from __future__ import annotations

from typing import Optional, Sequence

# canonical name -> spellings (by dataset: NIH ChestX-ray14, CheXpert / MIMIC-CXR, PadChest, VinDr-CXR)
ALIASES: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Atelectasis",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Consolidation": ("Consolidation",),
    "Edema": ("Edema", "pulmonary edema"),
    "Pleural Effusion": ("Effusion", "Pleural Effusion", "pleural effusion"),
    "Emphysema": ("Emphysema",),
    "Fibrosis": ("Fibrosis", "pulmonary fibrosis"),
    "Hernia": ("Hernia", "hiatal hernia"),
    "Infiltration": ("Infiltration", "infiltrates"),
    "Mass": ("Mass",),
    "Nodule": ("Nodule",),
    "Nodule/Mass": ("Nodule/Mass",),
    "Pleural Thickening": ("Pleural_Thickening", "Pleural Thickening"),
    "Pneumonia": ("Pneumonia",),
    "Pneumothorax": ("Pneumothorax",),
    "Enlarged Cardiomediastinum": ("Enlarged Cardiomediastinum",),
    "Lung Opacity": ("Lung Opacity",),
    "Lung Lesion": ("Lung Lesion",),
    "Pleural Other": ("Pleural Other",),
    "Fracture": ("Fracture",),
    "Support Devices": ("Support Devices",),
    "No Finding": ("No Finding", "normal"),
    "Aortic Enlargement": ("Aortic enlargement",),
    "Calcification": ("Calcification",),
    "Interstitial Lung Disease": ("ILD",),
    "Tuberculosis": ("Tuberculosis",),
}


def normalise(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split()).casefold()


class LabelMapError(ValueError):
    """An unknown canonical name in a user's label map, or two datasets that share no label."""


def build_lookup(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """normalised spelling -> canonical name, ALIASES plus `extra` ({spelling: canonical}); a
    canonical name `extra` points at must exist."""
    lookup = {}
    for canon, spellings in ALIASES.items():
        for s in (canon, *spellings):
            lookup[normalise(s)] = canon
    for spelling, canon in (extra or {}).items():
        if canon not in ALIASES:
            raise LabelMapError(f"label map {spelling!r}={canon!r}: {canon!r} is not a canonical label; "
                                f"known: {sorted(ALIASES)}")
        lookup[normalise(spelling)] = canon
    return lookup


def canonical(name: str, extra: Optional[dict[str, str]] = None) -> Optional[str]:
    """A dataset's label name -> its canonical name (None: not in the vocabulary)."""
    return build_lookup(extra).get(normalise(name))


def parse_label_map(text: Optional[str]) -> dict[str, str]:
    """'--label-map "Lesion=Nodule/Mass,Opacity=Lung Opacity"' -> {spelling: canonical}."""
    out = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        spelling, eq, canon = entry.partition("=")
        if not eq or not spelling.strip() or not canon.strip():
            raise LabelMapError(f"--label-map {entry!r}: expected NAME=CANONICAL")
        out[spelling.strip()] = canon.strip()
    build_lookup(out)  # unknown canonical names fail here, naming the entry
    return out


def match_labels(model_labels: Sequence[str], data_labels: Sequence[str],
                 extra: Optional[dict[str, str]] = None) -> dict:
    """Which outputs of a model trained on `model_labels` score which columns of `data_labels`.

    Returns {"shared": [{"label": canonical, "model": name, "data": name, "model_index": i,
    "data_index": j}], "model_only": [names the data cannot score], "data_only": [data labels
    the model has no output for], "identical": bool}. Raises LabelMapError if nothing is shared.
    """
    lookup = build_lookup(extra)
    identical = list(model_labels) == list(data_labels)
    if identical:  # the usual case: every output scores its own column, whatever the vocabulary says
        return {"shared": [{"label": n, "model": n, "data": n, "model_index": i, "data_index": i}
                           for i, n in enumerate(model_labels)], "model_only": [], "data_only": [], "identical": True}

    def key(n: str) -> str:  # outside the vocabulary a label matches only its own spelling
        return lookup.get(normalise(n), "?" + normalise(n))

    data_keys = {}
    for j, n in enumerate(data_labels):
        data_keys.setdefault(key(n), j)
    shared, model_only, used = [], [], set()
    for i, n in enumerate(model_labels):
        k = key(n)
        if k in data_keys and k not in used:
            j = data_keys[k]
            shared.append({"label": k if not k.startswith("?") else n, "model": n,
                           "data": data_labels[j], "model_index": i, "data_index": j})
            used.add(k)
        else:
            model_only.append(n)
    data_only = [n for j, n in enumerate(data_labels) if j not in {s["data_index"] for s in shared}]
    if not shared:
        raise LabelMapError(f"the model's labels {list(model_labels)} and the data's {list(data_labels)} share no "
                            f"finding (after the canonical label map); nothing to score")
    return {"shared": shared, "model_only": model_only, "data_only": data_only, "identical": False}
