"""fasttrain.cli's one table from exception type to exit code: each row, through `cli.main` and a
command registered for the test; exceptions outside the table keep their traceback; the table
never imports a module by itself; process groups are released after every command."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from fasttrain import cli
from fasttrain.config import ConfigError
from fasttrain.data.base import LoaderError
from fasttrain.format.packed import PackedError
from fasttrain.models.checkpoints import CheckpointError
from fasttrain.serve.predict import PredictError
from fasttrain.train import dist
from fasttrain.train.checkpoint import CheckpointWriteError
from fasttrain.train.engine import CompileError
from fasttrain.train.loop import OutOfMemory, Preempted, TrainingDiverged
from fasttrain.workflows.stages import StageFailed


@pytest.fixture
def raising(monkeypatch):
    """A `fasttrain fake` command that raises the exception it is given; counts the releases of
    the process groups."""
    mod = types.ModuleType("fasttrain_fake_command")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(cli.COMMANDS, "fake", (mod.__name__, "main", "raises for the test"))
    released = []
    monkeypatch.setattr(dist, "release_process_groups", lambda: released.append(1))

    def use(exc):
        def main(argv):
            if exc is None:
                return 0
            raise exc
        mod.main = main
        return released
    return use


ERRORS = [
    ConfigError("unknown config key 'optim.lrr'"),
    CheckpointError("teacher checkpoint not found: t.pt"),
    FileNotFoundError("config file not found: c.yaml"),
    TrainingDiverged("loss is NaN at step 7"),
    CompileError("torch.compile failed"),
    ValueError("a bad value"),
    PredictError("no image files under DIR"),  # the stages' input errors are ValueErrors
    LoaderError("no such split"),
    CheckpointWriteError("cannot write last.pt"),
    PackedError("manifest version 9"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    OutOfMemory("out of memory at step 3 with 64 images per device (OutOfMemoryError); lower --data.batch_size"),
]


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: type(e).__name__)
def test_known_errors_are_one_line_and_exit_2(raising, capsys, exc):
    released = raising(exc)
    assert cli.main(["fake", "--x"]) == 2
    assert capsys.readouterr().err == f"fasttrain fake: error: {exc}\n"
    assert released == [1]


@pytest.mark.parametrize("code", [75, 99])
def test_preempted_exits_with_its_own_code(raising, capsys, code):
    exc = Preempted(12, "SIGTERM", "RUN/checkpoints/last.pt", code)
    raising(exc)
    assert cli.main(["fake"]) == code
    err = capsys.readouterr().err
    assert err == f"fasttrain fake: {exc}\n" and "pre-empted at step 12 by SIGTERM" in err


def test_a_failed_stage_exits_1_without_error_prefix(raising, capsys):
    exc = StageFailed("pretrain_teacher", 2, "fasttrain reproduce")
    raising(exc)
    assert cli.main(["fake"]) == 1
    assert capsys.readouterr().err == f"fasttrain fake: {exc}\n"


@pytest.mark.parametrize("exc", [RuntimeError("a decode worker died; out of memory? retry with fewer --workers"),
                                 KeyError("label"), RuntimeError("stage x failed")],
                         ids=["oom-text-not-oom", "KeyError", "stage-text-not-StageFailed"])
def test_other_exceptions_keep_their_traceback(raising, capsys, exc):
    released = raising(exc)
    with pytest.raises(type(exc)) as info:
        cli.main(["fake"])
    assert info.value is exc
    assert capsys.readouterr().err == ""
    assert released == [1]  # released even when the exception propagates


def test_success_returns_0_and_releases(raising):
    released = raising(None)
    assert cli.main(["fake"]) == 0
    assert released == [1]


def test_the_table_imports_nothing():
    """A ValueError from a command that never imported torch: mapped, and torch still not imported
    (the table's torch and trainer rows are skipped, not resolved)."""
    code = ("import sys\n"
            "from fasttrain import cli\n"
            "def boom(argv): raise ValueError('bad input')\n"
            "rc = cli.run_command('convert', boom, [])\n"
            "assert rc == 2, rc\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('fasttrain.train')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert out.stderr == "fasttrain convert: error: bad input\n"
