"""The canonical label vocabulary on the real NIH / CheXpert / MIMIC column names, user spellings,
and `fasttrain evaluate` of an NIH-trained model on a CheXpert-layout dataset (shared labels only)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fasttrain.converters.chexpert import CHEXPERT_ALL, COMPETITION
from fasttrain.converters.nih import NIH_LABELS
from fasttrain.labelmap import ALIASES, LabelMapError, canonical, match_labels, parse_label_map

NIH_CHEXPERT_SHARED = {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumonia",
                       "Pneumothorax"}


def test_every_real_column_name_has_a_canonical_name():
    assert all(canonical(n) is not None for n in NIH_LABELS + CHEXPERT_ALL)
    assert canonical("Effusion") == canonical("Pleural Effusion") == canonical("pleural effusion") == "Pleural Effusion"
    assert canonical("Pleural_Thickening") == canonical("Pleural Thickening") == "Pleural Thickening"
    assert canonical("Mass") != canonical("Lung Lesion") and canonical("Infiltration") != canonical("Lung Opacity")
    assert canonical("Tumour") is None
    owner = {}  # no spelling (normalised) belongs to two canonical names
    for canon, spellings in ALIASES.items():
        for s in (canon, *spellings):
            assert owner.setdefault(" ".join(s.replace("_", " ").split()).casefold(), canon) == canon, s


def test_nih_model_on_chexpert_labels_and_back():
    m = match_labels(NIH_LABELS, CHEXPERT_ALL)
    assert {s["label"] for s in m["shared"]} == NIH_CHEXPERT_SHARED and not m["identical"]
    eff = next(s for s in m["shared"] if s["label"] == "Pleural Effusion")
    assert (eff["model"], eff["data"]) == ("Effusion", "Pleural Effusion")
    assert NIH_LABELS[eff["model_index"]] == "Effusion" and CHEXPERT_ALL[eff["data_index"]] == "Pleural Effusion"
    assert set(m["model_only"]) == set(NIH_LABELS) - {"Effusion"} - NIH_CHEXPERT_SHARED
    assert "No Finding" in m["data_only"] and "Lung Opacity" in m["data_only"]
    back = match_labels(COMPETITION, NIH_LABELS)  # CheXpert competition model on NIH
    assert [s["label"] for s in back["shared"]] == COMPETITION and back["model_only"] == []
    same = match_labels(NIH_LABELS, NIH_LABELS)
    assert same["identical"] and [s["data_index"] for s in same["shared"]] == list(range(14))


def test_user_map_and_bad_input():
    assert match_labels(["Lesion"], ["Nodule/Mass"], parse_label_map("Lesion=Nodule/Mass"))["shared"][0]["label"] \
        == "Nodule/Mass"
    with pytest.raises(LabelMapError, match=r"'Lesion'='Tumor': 'Tumor' is not a canonical label"):
        parse_label_map("Lesion=Tumor")
    with pytest.raises(LabelMapError, match="expected NAME=CANONICAL"):
        parse_label_map("Lesion")
    with pytest.raises(LabelMapError, match="share no finding"):
        match_labels(["Mass"], ["Fracture"])


@pytest.mark.slow
def test_evaluate_nih_model_on_chexpert_layout(tmp_path, capsys, packed_phantoms, tiny_yaml):
    import torch

    from fasttrain.cli import main
    from fasttrain.config import build_config
    from fasttrain.converters.chexpert import convert_chexpert
    from fasttrain.converters.synthetic import generate_phantoms
    from fasttrain.format.packed import open_packed
    from fasttrain.train.checkpoint import save_atomic
    from fasttrain.train.finetune import run_finetune
    nih = packed_phantoms(tmp_path / "nih", 60, seed=4)
    (tmp_path / "ft.yaml").write_text(tiny_yaml("vit", model={"num_classes": 14}, data={"val_split": None}))
    cfg = build_config(tmp_path / "ft.yaml", [f"--data.path={nih}", f"--run.out={tmp_path / 'ft'}"])
    ckpt = run_finetune(cfg)["last"]
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    ck["model"]["head.weight"] *= 500.0  # spread the scores
    save_atomic(ck, ckpt)
    generate_phantoms(tmp_path / "cx_src", 50, seed=5, size=32, layout="chexpert", workers=1, progress=False)
    cx = convert_chexpert(tmp_path / "cx_src", tmp_path / "cx", labels="all", uncertain="ignore", size=32,
                          workers=1, progress=False)
    capsys.readouterr()
    assert main(["evaluate", "--ckpt", str(ckpt), "--data", str(cx), "--out", str(tmp_path / "ev"),
                 "--bootstrap", "20"]) == 0
    assert "label map: scored 7 shared labels" in capsys.readouterr().out
    res = json.loads((tmp_path / "ev" / "results_test.json").read_text())
    assert set(res["labels"]) == NIH_CHEXPERT_SHARED and res["label_map"]["identical"] is False
    assert res["label_map"]["shared"]["Pleural Effusion"] == {"model": "Effusion", "data": "Pleural Effusion"}
    assert "Hernia" in res["label_map"]["not_scored_model_labels"]
    assert "No Finding" in res["label_map"]["not_scored_data_labels"]
    scores = np.load(tmp_path / "ev" / "scores_test.npy").astype(np.float64)  # [N, 7] the shared labels' scores
    assert scores.shape[1] == 7
    test = open_packed(cx, "test")
    for k, name in enumerate(res["labels"]):  # columns in the JSON's label order, each the model's output
        y = test.labels[:, CHEXPERT_ALL.index(res["label_map"]["shared"][name]["data"])]
        keep = ~np.isnan(y)
        if len(np.unique(y[keep])) == 2:
            assert res["labels"][name]["auc"] == pytest.approx(roc_auc_score(y[keep], scores[keep, k]), abs=1e-6)
        else:
            assert res["labels"][name]["auc"] is None
    assert list(res["labels"])[2] == "Pleural Effusion" and NIH_LABELS[2] == "Effusion"
