"""The workflows' stage runner: a finished stage is skipped, a killed one resumes and counts every
attempt's wall time, a failed command raises StageFailed and records nothing."""
from __future__ import annotations

import json
import sys
import time

import pytest

from fasttrain.workflows.stages import StageFailed, StageRunner, run_fasttrain


class Killed(BaseException):
    """Stands in for a SIGKILL: nothing in the runner catches it."""


def test_a_stage_done_earlier_is_skipped(tmp_path):
    said, calls = [], []
    runner = StageRunner(tmp_path / "stages", say=said.append)
    rec = runner.run("convert", lambda: calls.append(1) or {"images_per_s": 5.0})
    assert rec["stage"] == "convert" and rec["images_per_s"] == 5.0 and rec["resumed"] is False
    assert len(rec["attempts_wall_s"]) == 1 and rec["wall_s"] == pytest.approx(rec["attempts_wall_s"][0])
    assert json.loads((tmp_path / "stages" / "convert.json").read_text()) == rec
    assert not (tmp_path / "stages" / "convert.running.json").exists()
    assert runner.is_done("convert") and runner.record("convert") == rec
    again = StageRunner(tmp_path / "stages", say=said.append).run("convert", lambda: calls.append(2) or {})
    assert calls == [1] and again == rec
    assert said == ["convert", "convert: done earlier, skipped"]


def test_a_killed_stage_resumes_and_counts_both_attempts(tmp_path):
    run = tmp_path / "run"
    said = []
    runner = StageRunner(tmp_path / "stages", say=said.append)

    def first():  # trains a while, logs, checkpoints, then is killed
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.pt").write_bytes(b"ckpt")
        time.sleep(0.2)
        with open(run / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 1, "time": time.time()}) + "\n")
            f.write('{"step": 2, "ti')  # a line cut by the kill
        raise Killed

    with pytest.raises(Killed):
        runner.run("pretrain", first, run_dir=run)
    assert not runner.is_done("pretrain") and runner.running_path("pretrain").is_file()

    rec = runner.run("pretrain", lambda: {"steps": 4}, run_dir=run, what="fasttrain pretrain")
    assert said == ["pretrain", "pretrain (resuming): fasttrain pretrain"]
    assert rec["resumed"] is True and rec["steps"] == 4
    first_s, second_s = rec["attempts_wall_s"]
    assert 0.2 <= first_s < 30 and rec["wall_s"] == pytest.approx(first_s + second_s)
    assert not runner.running_path("pretrain").exists()


def test_a_failed_command_raises_stage_failed_and_leaves_no_done_marker(tmp_path):
    runner = StageRunner(tmp_path / "stages", say=lambda line: None)
    exit3 = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with pytest.raises(StageFailed, match=r"stage finetune_s_nih failed \(exit 3\); fix the cause and re-run the "
                                          r"same `fasttrain reproduce` command") as e:
        runner.run("finetune_s_nih", lambda: run_fasttrain("finetune_s_nih", ["finetune"], "fasttrain reproduce",
                                                           prefix=exit3))
    assert e.value.exit_code == 3 and isinstance(e.value, RuntimeError)
    assert not runner.is_done("finetune_s_nih") and not (tmp_path / "stages" / "finetune_s_nih.json").exists()
    # in this process: the `fasttrain` command's own exit code (2: an unknown command)
    with pytest.raises(StageFailed, match=r"exit 2"):
        runner.run("bad", lambda: run_fasttrain("bad", ["no-such-command"], "fasttrain ablate"))
    assert not runner.is_done("bad")
    # fixed, the same stage then runs and is recorded
    assert runner.run("bad", lambda: run_fasttrain("bad", ["--version"], "fasttrain ablate")) is not None
    assert runner.is_done("bad")

