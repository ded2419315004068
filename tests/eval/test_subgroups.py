"""Subgroup tables (per-group AUC / mAUC, worst group, gap, underdiagnosis), checked against a
plain sklearn computation on the same scores."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fasttrain.eval.subgroups import SubgroupError, subgroup_report, underdiagnosis, youden_thresholds


def test_subgroup_aucs_match_sklearn_and_undefined_is_omitted(label_scores, score_names):
    y, s = label_scores(300, seed=2)
    rng = np.random.default_rng(4)
    sex = np.array(["M" if v < 0.5 else "F" for v in rng.random(300)], dtype=object)
    sex[:7] = None  # missing: not grouped, counted
    age = rng.uniform(20, 95, 300)
    age[7:10] = np.nan
    view = np.array(["PA"] * 300, dtype=object)
    view[:25] = "LL"
    y[:25, 1] = 0  # no positive for label b among the laterals: undefined there
    meta = {"sex": sex, "age": age, "view": view}
    thr = youden_thresholds(y, s, score_names)
    rep = subgroup_report(y, s, score_names, meta, ["sex", "age", "view"], age_bins=(0, 40, 60, 80), thresholds=thr,
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
            for j, n in enumerate(score_names):
                keep = ~np.isnan(y[rows, j])
                yy, ss = y[rows, j][keep], s[rows, j][keep]
                if len(np.unique(yy)) == 2:
                    want[n] = roc_auc_score(yy, ss)
            assert set(e["auc"]) == set(want) and set(e["undefined_labels"]) == set(score_names) - set(want)
            for n in want:
                assert e["auc"][n] == pytest.approx(want[n], abs=1e-9)
            assert e["mauc"] == pytest.approx(np.mean(list(want.values())), abs=1e-9)
            maucs[name] = e["mauc"]
            # underdiagnosis: positive studies with every label below its threshold
            pos = (y[rows] == 1).any(axis=1)
            miss = pos & ~(s[rows] >= np.array([thr[n] for n in score_names])).any(axis=1)
            assert e["underdiagnosis"]["rate"] == pytest.approx(miss.sum() / pos.sum(), abs=1e-12)
        worst = min(maucs, key=maucs.get)
        assert rep["worst"][col] == {"group": worst, "mauc": maucs[worst]}
        assert rep["gap"][col] == pytest.approx(max(maucs.values()) - maucs[worst], abs=1e-12)
    assert "b" in rep["groups"]["view"]["LL"]["undefined_labels"] and "b" not in rep["groups"]["view"]["LL"]["auc"]


def test_by_a_missing_column_lists_the_ones_there(label_scores, score_names):
    y, s = label_scores(50)
    with pytest.raises(SubgroupError, match=r"--by race: X has no 'race' metadata; it has \['sex'\]"):
        subgroup_report(y, s, score_names, {"sex": np.array(["M"] * 50, dtype=object)}, ["race"], where="X")
    with pytest.raises(SubgroupError, match="packed without metadata"):
        subgroup_report(y, s, score_names, {}, ["sex"], where="X")


def test_underdiagnosis_ignores_no_finding():
    """A 'No Finding' output (CheXpert / MIMIC label sets) is neither a finding nor a call: a study
    with Edema whose only score above threshold is 'No Finding' is underdiagnosed."""
    names = ["No Finding", "Edema", "Cardiomegaly"]
    y = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float64)
    s = np.array([[0.9, 0.1, 0.1], [0.9, 0.1, 0.1], [0.1, 0.1, 0.8]])
    r = underdiagnosis(y, s, names, {n: 0.5 for n in names})
    assert r["n_positive_studies"] == 2 and r["n_underdiagnosed"] == 1 and r["rate"] == 0.5
    assert set(r["fnr"]) == {"Edema", "Cardiomegaly"}
