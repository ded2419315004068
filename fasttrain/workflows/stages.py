"""One resumable stage runner for the workflows (`reproduce`, `ablate`).

A workflow is a list of named stages, each run at most once to completion. The runner keeps its
records in one folder:

  NAME.json          the stage finished: its facts (wall time, images/s, ...); skipped next time
  NAME.running.json  an attempt started and has not finished (killed, pre-empted or failed)

So the same command is simply re-run after any failure or pre-emption: finished stages are
skipped, an interrupted training stage resumes from its RUN/checkpoints/last.pt (the stage's work
runs its trainer with `--resume auto` / resume="auto"), and its wall time counts every earlier
attempt, each from its start to the last record it logged in RUN/metrics.jsonl (a killed process
says nothing when it dies; its metrics log does). Records are written atomically.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from fasttrain import cli
from fasttrain.io import write_json_atomic


class StageFailed(RuntimeError):
    """A stage's command exited non-zero: nothing is recorded, so re-running resumes it."""

    def __init__(self, stage: str, exit_code: int, rerun: str):
        super().__init__(f"stage {stage} failed (exit {exit_code}); fix the cause and re-run the same `{rerun}` "
                         f"command: finished stages are skipped, this one resumes")
        self.stage, self.exit_code = stage, exit_code


def run_fasttrain(stage: str, argv: Sequence[str], rerun: str, prefix: Sequence[str] = ()) -> None:
    """Run `fasttrain ARGV` in this process, or as a subprocess after `prefix` (a torchrun launcher);
    raise StageFailed naming `stage` and the command to re-run (`rerun`) when it exits non-zero."""
    rc = subprocess.call([*prefix, *argv]) if prefix else cli.main(list(argv))
    if rc != 0:
        raise StageFailed(stage, rc, rerun)


class StageRunner:
    """Runs stages once each, recording the finished ones under `folder`.

    say: where the runner reports a skipped stage or a started attempt (one line each)."""

    def __init__(self, folder: str | Path, say: Callable[[str], None] = print):
        self.folder = Path(folder)
        self.say = say

    def done_path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def running_path(self, name: str) -> Path:
        return self.folder / f"{name}.running.json"

    def record(self, name: str) -> Optional[dict]:
        """The finished stage's record, or None while it has not finished."""
        f = self.done_path(name)
        return json.loads(f.read_text()) if f.is_file() else None

    def is_done(self, name: str) -> bool:
        return self.done_path(name).is_file()

    def run(self, name: str, work: Callable[[], Optional[dict]], *, run_dir: Optional[Path] = None,
            what: str = "") -> dict:
        """Run `work()` unless `name` finished earlier; return the stage's record.

        run_dir: a training stage's run folder (its checkpoints/last.pt means this attempt resumes;
        its metrics.jsonl times the interrupted attempts). `work` returns the stage's facts (merged
        into the record) and raises on failure (StageFailed for a command's exit code): no record
        is written then, and the attempt counts when the stage is run again."""
        rec = self.record(name)
        if rec is not None:
            self.say(f"{name}: done earlier, skipped")
            return rec
        resumed = run_dir is not None and (Path(run_dir) / "checkpoints" / "last.pt").is_file()
        self.say(f"{name}{' (resuming)' if resumed else ''}{': ' + what if what else ''}")
        attempts = self.earlier_attempts(name, run_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.running_path(name), {"start": time.time(), "attempts": attempts})
        t0 = time.perf_counter()
        facts = work() or {}
        wall = time.perf_counter() - t0
        rec = {"stage": name, **facts, "wall_s": wall + sum(attempts), "attempts_wall_s": attempts + [wall],
               "resumed": resumed, "finished": time.time()}
        write_json_atomic(self.done_path(name), rec)
        self.running_path(name).unlink(missing_ok=True)
        return rec

    def earlier_attempts(self, name: str, run_dir: Optional[Path]) -> list[float]:
        """Wall seconds of the interrupted attempts of this stage: each from its start to the last
        record it logged in run_dir/metrics.jsonl (an attempt that logged nothing is not counted)."""
        f = self.running_path(name)
        if not f.is_file():
            return []
        prev = json.loads(f.read_text())
        attempts = list(prev.get("attempts", []))
        last = None
        log = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        if log is not None and log.is_file():
            for line in log.read_text().splitlines():
                try:
                    last = json.loads(line).get("time", last)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
        if last is not None and last > prev["start"]:
            attempts.append(last - prev["start"])
        return attempts
