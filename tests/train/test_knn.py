"""The kNN monitor -- a hand-computed fixture, and its records in a pre-training run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fasttrain.train.knn import knn_scores


def test_knn_scores_known_answer():
    # bank on the unit circle at 0, 30, 90 and 180 degrees; the query at 10 degrees
    ang = torch.tensor([0.0, 30.0, 90.0, 180.0]) * math.pi / 180
    bank = torch.stack([ang.cos(), ang.sin()], dim=1) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])  # norms do not matter
    labels = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0], [0.0, 1.0]])
    q = torch.tensor([[math.cos(math.pi / 18), math.sin(math.pi / 18)]])
    T = 0.5
    out = knn_scores(bank, labels, q, k=2, temperature=T)  # neighbours: 0 deg (cos 10) and 30 deg (cos 20)
    w0, w1 = math.exp(math.cos(math.pi / 18) / T), math.exp(math.cos(math.pi / 9) / T)
    assert out[0, 0].item() == pytest.approx(w0 / (w0 + w1), rel=1e-5)  # label 0: only the 0-deg neighbour is positive
    assert out[0, 1].item() == pytest.approx(0.0)  # label 1: the 30-deg neighbour does not know it -> 0-deg votes alone
    out3 = knn_scores(bank, labels, q, k=3, temperature=T)  # + the 90-deg neighbour (positive for both)
    w2 = math.exp(math.cos(math.radians(80)) / T)
    assert out3[0, 0].item() == pytest.approx((w0 + w2) / (w0 + w1 + w2), rel=1e-5)
    assert out3[0, 1].item() == pytest.approx(w2 / (w0 + w2), rel=1e-5)
    # a label no neighbour knows: NaN (the monitor then uses the bank's prevalence)
    only = knn_scores(bank[1:2], labels[1:2], q, k=5, temperature=T)
    assert torch.isnan(only[0, 1]) and only[0, 0].item() == 0.0
    # a lower temperature sharpens towards the nearest neighbour
    assert knn_scores(bank, labels, q, k=2, temperature=0.01)[0, 0].item() > out[0, 0].item()


@pytest.mark.slow
def test_pretrain_logs_knn_monitor(tmp_path, packed_phantoms, tiny_yaml):
    from fasttrain.config import build_config
    from fasttrain.train.pretrain import run_pretrain
    packed = packed_phantoms(tmp_path, 40, val_fraction=0.25)
    (tmp_path / "tiny.yaml").write_text(tiny_yaml(model={"depth": 1, "decoder_embed_dim": 16},
                                                  optim={"epochs": 3, "warmup_epochs": 0},
                                                  eval={"knn_every": 2, "knn_k": 5, "knn_train_images": 12}))
    summary = run_pretrain(build_config(tmp_path / "tiny.yaml", [f"--data.path={packed}",
                                                                 f"--run.out={tmp_path / 'run'}"]))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if r["phase"] == "val"]
    assert [("knn_mauc" in r) for r in val] == [False, True, True]  # epoch 1 (every 2) and the last epoch
    r = val[1]
    assert r["knn_bank"] == 12
    assert r["knn_mauc"] is None or 0.0 <= r["knn_mauc"] <= 1.0
    assert sum(k.startswith("knn_auc/") for k in r) == 14
    assert summary["knn_s"] > 0


def test_default_bank_is_the_size_measured_under_the_budget():
    """The default bank (1,000 train images) is the size docs/benchmarks.md measured at the demo's
    scale: 3.7% of pre-training, where 2,000 cost 7.1%; a larger default needs a new measurement."""
    from fasttrain.config import EvalConfig
    assert EvalConfig().knn_train_images == 1000 and EvalConfig().knn_every == 5
