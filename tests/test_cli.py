"""CLI smoke on tiny configs: pretrain (MAE) -> pretrain --teacher (ETMAE) -> finetune -> evaluate
-> plot, through `fasttrain.cli.main` exactly as a user types it; and the CLI's input errors."""
from __future__ import annotations

import json

import pytest

from fasttrain.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory, packed_phantoms, tiny_yaml):
    root = tmp_path_factory.mktemp("cli")
    packed = packed_phantoms(root, 80, seed=1)
    (root / "pre.yaml").write_text(tiny_yaml(distill={"student_blocks": [1], "teacher_blocks": [1]},
                                             optim={"epochs": 1, "warmup_epochs": 0.5}))
    (root / "ft.yaml").write_text(tiny_yaml("vit", model={"num_classes": 14}, data={"val_split": "val"},
                                            optim={"epochs": 2, "betas": [0.9, 0.999], "layer_decay": 0.75,
                                                   "warmup_epochs": 0.5}))
    return root, packed


@pytest.mark.slow
def test_cli_pipeline_smoke(setup, capsys):
    root, packed = setup
    d = f"--data.path={packed}"
    assert main(["pretrain", "--config", str(root / "pre.yaml"), "--out", str(root / "teacher"), d]) == 0
    teacher = root / "teacher" / "checkpoints" / "last.pt"
    assert main(["pretrain", "--config", str(root / "pre.yaml"), "--out", str(root / "student"), d,
                 "--teacher", str(teacher)]) == 0
    student_metrics = [json.loads(x) for x in (root / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loss_dist", 0) > 0 for r in student_metrics)  # distillation ran
    assert main(["finetune", "--config", str(root / "ft.yaml"), "--out", str(root / "ft"), d,
                 "--init", str(root / "student" / "checkpoints" / "last.pt")]) == 0
    best = root / "ft" / "checkpoints" / "best.pt"
    assert best.is_file()
    vals = [json.loads(x) for x in (root / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["phase"] == "val" for r in vals) == 2  # validation every epoch
    capsys.readouterr()
    assert main(["evaluate", "--ckpt", str(best), "--data", str(packed), "--split", "test",
                 "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "mAUC" in out and "95% CI" in out
    res = json.loads((root / "ft" / "eval" / "results_test.json").read_text())
    assert res["synthetic"] is True and len(res["labels"]) == 14
    assert (root / "ft" / "eval" / "roc_test.png").stat().st_size > 1000
    assert main(["plot", str(root / "teacher"), str(root / "student"), str(root / "ft"),
                 "--out", str(root / "plots")]) == 0
    for f in ("losses.png", "finetune.png", "auc_bars.png"):
        assert (root / "plots" / f).stat().st_size > 1000, f


def test_cli_errors_are_one_line_and_exit_2(setup, capsys):
    root, packed = setup
    d = f"--data.path={packed}"
    assert main(["pretrain", "--config", str(root / "pre.yaml"), "--out", str(root / "x"), d,
                 "--optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(root / "pre.yaml"), "--out", str(root / "x"), d,
                 "--teacher", str(root / "missing.pt")]) == 2
    assert "teacher checkpoint not found" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(root / "missing.yaml"), "--out", str(root / "x")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(root / "pre.yaml"), "--out", str(root / "x"),
                 "--data.path=/nonexistent/packed"]) == 2
    assert "/nonexistent/packed" in capsys.readouterr().err
    from fasttrain.train.checkpoint import save_atomic
    save_atomic({"kind": "pretrain", "model": {}}, root / "pre.pt")
    assert main(["evaluate", "--ckpt", str(root / "pre.pt"), "--data", str(packed)]) == 2
    assert "not a fine-tuned classifier checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", str(root / "pre.yaml"), "--out", str(root / "x"), "stray"])
    assert not (root / "x").exists()
