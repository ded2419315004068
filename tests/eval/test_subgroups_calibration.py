"""evaluate's calibration (ECE, Brier, bootstrap CIs, temperature scaling) and subgroup tables
(per-group AUC / mAUC, worst group, gap, underdiagnosis), each checked against a plain sklearn /
numpy computation on the same scores; then `fasttrain evaluate --by --calibrate` end to end on
SYNTHETIC phantoms packed with their metadata."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from fasttrain.config import build_config
from fasttrain.metrics import bootstrap_ece_matrix
from fasttrain.eval.calibration import apply_temperature, calibration_report, fit_temperature
from fasttrain.eval.subgroups import SubgroupError, subgroup_report, youden_thresholds

NAMES = ["a", "b", "c"]


def _scores(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.3, 0.15, 0.5]).astype(float)
    s = np.clip(0.35 * y + rng.random((n, 3)) * 0.65, 0, 1)
    y[rng.random((n, 3)) < 0.05] = np.nan  # unknown labels
    s[:3, 0] = [0.0, 1.0, 1 / 15]  # bin edges: 0 in bin 0, 1 in the last, an interior edge below it
    return y, s


def _plain_ece(y, p, n_bins=15):
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for k in range(n_bins):
        m = (p <= edges[k + 1]) & ((p > edges[k]) if k else (p >= 0))
        if m.any():
            total += m.sum() / y.size * abs(y[m].mean() - p[m].mean())
    return total


def test_ece_and_brier_match_plain_numpy_and_sklearn():
    y, s = _scores()
    cal = calibration_report(y, s, NAMES, n_boot=50, seed=3)
    for j, n in enumerate(NAMES):
        keep = ~np.isnan(y[:, j])
        assert cal["ece_per_label"][n] == pytest.approx(_plain_ece(y[:, j], s[:, j]), abs=1e-9)
        assert cal["brier_per_label"][n] == pytest.approx(brier_score_loss(y[keep, j], s[keep, j]), abs=1e-9)
        # the same bins as sklearn's reliability curve: ECE from its curve and the bin counts
        frac, mean_p = calibration_curve(y[keep, j], s[keep, j], n_bins=15)
        counts = np.histogram(s[keep, j], bins=np.linspace(0, 1, 16))[0]
        assert len(frac) == (counts > 0).sum()
    assert cal["ece"] == pytest.approx(np.mean([_plain_ece(y[:, j], s[:, j]) for j in range(3)]), abs=1e-9)
    lo, hi = cal["ece_ci95"]
    assert lo < cal["ece"] < hi


def test_bootstrap_ece_matches_per_resample_loop():
    y, s = _scores(120, seed=1)
    boots = bootstrap_ece_matrix(y, s, n_boot=30, seed=7, chunk=7)
    rng = np.random.default_rng(7)
    for b in range(30):
        idx = rng.integers(0, len(y), size=len(y))
        for j in range(3):
            assert boots[b, j] == pytest.approx(_plain_ece(y[idx, j], s[idx, j]), abs=1e-9)


def test_temperature_recovers_a_known_temperature_and_keeps_auc():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, size=(20000, 2))  # the model's logits
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z / np.array([2.0, 0.5])))).astype(float)  # truth: z / T
    p = 1 / (1 + np.exp(-z))
    temps = fit_temperature(y, p, ["x", "y"])
    assert temps["x"] == pytest.approx(2.0, rel=0.08) and temps["y"] == pytest.approx(0.5, rel=0.08)
    q = apply_temperature(p, np.array([temps["x"], temps["y"]]))
    for j in range(2):
        assert roc_auc_score(y[:, j], q[:, j]) == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-12)
    before = calibration_report(y, p, ["x", "y"], n_boot=10)["ece"]
    after = calibration_report(y, q, ["x", "y"], n_boot=10)["ece"]
    assert after < before / 3
    one_class = fit_temperature(np.zeros((5, 1)), np.full((5, 1), 0.2), ["z"])
    assert one_class == {"z": 1.0}


def test_subgroup_aucs_match_sklearn_and_undefined_is_omitted():
    y, s = _scores(300, seed=2)
    rng = np.random.default_rng(4)
    sex = np.array(["M" if v < 0.5 else "F" for v in rng.random(300)], dtype=object)
    sex[:7] = None  # missing: not grouped, counted
    age = rng.uniform(20, 95, 300)
    age[7:10] = np.nan
    view = np.array(["PA"] * 300, dtype=object)
    view[:25] = "LL"
    y[:25, 1] = 0  # no positive for label b among the laterals: undefined there
    meta = {"sex": sex, "age": age, "view": view}
    thr = youden_thresholds(y, s, NAMES)
    rep = subgroup_report(y, s, NAMES, meta, ["sex", "age", "view"], age_bins=(0, 40, 60, 80), thresholds=thr,
                          n_boot=40, seed=1)
    assert set(rep["groups"]["sex"]) == {"M", "F"} and rep["missing"]["sex"] == 7
    assert list(rep["groups"]["age"]) == ["[0,40)", "[40,60)", "[60,80)", "80+"] and rep["missing"]["age"] == 3  # youngest first
    groups = {"sex": sex, "view": view,
              "age": np.array([None if np.isnan(a) else ("[0,40)" if a < 40 else "[40,60)" if a < 60 else
                                                         "[60,80)" if a < 80 else "80+") for a in age], dtype=object)}
    for col, g in groups.items():
        maucs = {}
        for name, e in rep["groups"][col].items():
            rows = np.flatnonzero(g == name)
            assert e["n"] == rows.size
            want = {}
            for j, n in enumerate(NAMES):
                keep = ~np.isnan(y[rows, j])
                yy, ss = y[rows, j][keep], s[rows, j][keep]
                if len(np.unique(yy)) == 2:
                    want[n] = roc_auc_score(yy, ss)
            assert set(e["auc"]) == set(want) and set(e["undefined_labels"]) == set(NAMES) - set(want)
            for n in want:
                assert e["auc"][n] == pytest.approx(want[n], abs=1e-9)
            assert e["mauc"] == pytest.approx(np.mean(list(want.values())), abs=1e-9)
            maucs[name] = e["mauc"]
            # underdiagnosis: positive studies with every label below its threshold
            pos = (y[rows] == 1).any(axis=1)
            miss = pos & ~(s[rows] >= np.array([thr[n] for n in NAMES])).any(axis=1)
            assert e["underdiagnosis"]["rate"] == pytest.approx(miss.sum() / pos.sum(), abs=1e-12)
        worst = min(maucs, key=maucs.get)
        assert rep["worst"][col] == {"group": worst, "mauc": maucs[worst]}
        assert rep["gap"][col] == pytest.approx(max(maucs.values()) - maucs[worst], abs=1e-12)
    assert "b" in rep["groups"]["view"]["LL"]["undefined_labels"] and "b" not in rep["groups"]["view"]["LL"]["auc"]


def test_by_a_missing_column_lists_the_ones_there():
    y, s = _scores(50)
    with pytest.raises(SubgroupError, match=r"--by race: X has no 'race' metadata; it has \['sex'\]"):
        subgroup_report(y, s, NAMES, {"sex": np.array(["M"] * 50, dtype=object)}, ["race"], where="X")
    with pytest.raises(SubgroupError, match="packed without metadata"):
        subgroup_report(y, s, NAMES, {}, ["sex"], where="X")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, packed_phantoms, tiny_yaml):
    from fasttrain.train.checkpoint import save_atomic
    from fasttrain.train.finetune import run_finetune
    root = tmp_path_factory.mktemp("subgroups")
    packed = packed_phantoms(root, 120, seed=3)
    (root / "ft.yaml").write_text(tiny_yaml("vit", model={"num_classes": 14}, data={"val_split": "val"},
                                            optim={"epochs": 1}))
    cfg = build_config(root / "ft.yaml", [f"--data.path={packed}", f"--run.out={root / 'ft'}"])
    summary = run_finetune(cfg)
    # one epoch leaves the head near its init; spread the scores so that calibration has work to do
    ck = torch.load(summary["last"], map_location="cpu", weights_only=True)
    ck["model"]["head.weight"] *= 500.0
    save_atomic(ck, summary["last"])
    return packed, Path(summary["last"])


def test_evaluate_by_and_calibrate_end_to_end(finetuned, tmp_path, capsys):
    from fasttrain.cli import main
    from fasttrain.format.packed import open_packed
    packed, ckpt = finetuned
    assert main(["evaluate", "--ckpt", str(ckpt), "--data", str(packed), "--out", str(tmp_path), "--bootstrap", "30",
                 "--by", "sex,age,view", "--age-bins", "0,50,70", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "calibration (15 equal-width bins)" in out and "worst sex:" in out and "[50,70)" in out
    res = json.loads((tmp_path / "results_test.json").read_text())
    scores = np.load(tmp_path / "scores_test.npy").astype(np.float64)
    test = open_packed(packed, "test")
    assert scores.shape == test.labels.shape
    # the groups are the packed metadata's, scored on the saved scores
    for sex in ("M", "F"):
        rows = np.flatnonzero(test.metadata["sex"] == sex)
        assert res["subgroups"]["groups"]["sex"][sex]["n"] == rows.size
        for n, auc in res["subgroups"]["groups"]["sex"][sex]["auc"].items():
            j = test.label_names.index(n)
            assert auc == pytest.approx(roc_auc_score(test.labels[rows, j], scores[rows, j]), abs=1e-6)
    cal = res["calibration"]
    assert cal["ece"] == pytest.approx(np.mean([_plain_ece(test.labels[:, j], scores[:, j]) for j in range(14)]),
                                       abs=1e-6)
    temp = json.loads((ckpt.parent / (ckpt.name + ".temperature.json")).read_text())
    assert set(temp["temperature"]) == set(test.label_names) and temp["fitted_on"]["split"] == "val"
    assert cal["temperature"]["ece"] is not None and res["subgroups"]["thresholds_from"] == "val"
    assert (tmp_path / "reliability_test.png").stat().st_size > 1000
    assert main(["evaluate", "--ckpt", str(ckpt), "--data", str(packed), "--out", str(tmp_path),
                 "--bootstrap", "5", "--by", "race"]) == 2
    assert "--by race" in capsys.readouterr().err


def test_underdiagnosis_ignores_no_finding():
    """A 'No Finding' output (CheXpert / MIMIC label sets) is neither a finding nor a call: a study
    with Edema whose only score above threshold is 'No Finding' is underdiagnosed."""
    from fasttrain.eval.subgroups import underdiagnosis
    names = ["No Finding", "Edema", "Cardiomegaly"]
    y = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float64)
    s = np.array([[0.9, 0.1, 0.1], [0.9, 0.1, 0.1], [0.1, 0.1, 0.8]])
    r = underdiagnosis(y, s, names, {n: 0.5 for n in names})
    assert r["n_positive_studies"] == 2 and r["n_underdiagnosed"] == 1 and r["rate"] == 0.5
    assert set(r["fnr"]) == {"Edema", "Cardiomegaly"}
