"""`fasttrain evaluate` and `fasttrain plot` live in fasttrain.eval, dispatched by fasttrain.cli; the
training core (fasttrain/train) parses no arguments and imports nothing from eval, serve or workflows."""
from __future__ import annotations

from pathlib import Path

import pytest

import fasttrain.train
from fasttrain import cli
from fasttrain.eval import evaluate, plots


def test_evaluate_and_plot_dispatch_to_eval():
    assert cli.COMMANDS["evaluate"][:2] == ("fasttrain.eval.evaluate", "main")
    assert cli.COMMANDS["plot"][:2] == ("fasttrain.eval.plots", "main")
    assert callable(evaluate.main) and callable(plots.main)


def test_evaluate_help_is_its_own_parser(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "fasttrain evaluate" in out and "--calibrate" in out and "--label-map" in out


def test_plot_of_a_folder_that_is_no_run_exits_2(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"fasttrain plot: error: {tmp_path}: not a fasttrain run directory")


def test_evaluate_of_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert cli.main(["evaluate", "--ckpt", str(tmp_path / "none.pt"), "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"fasttrain evaluate: error: checkpoint not found: {tmp_path / 'none.pt'}\n"


def test_the_training_core_parses_no_arguments():
    files = sorted(Path(fasttrain.train.__file__).parent.glob("*.py"))
    assert {f.stem for f in files} >= {"engine", "loop", "optim", "dist", "checkpoint", "runlog", "builders",
                                       "pretrain", "finetune", "knn"}
    for f in files:  # its imports are checked by tests/format/test_layering.py
        assert "argparse" not in f.read_text(), f
