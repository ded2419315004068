"""scripts/gpu_check.sh runs end to end (CPU smoke mode, toy sizes): a broken script would waste
the few minutes of a lent GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, GPU_CHECK_SMOKE="1", PYTHON=sys.executable, OUT=str(tmp_path))
    res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "bench_all.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in records} == {"step", "e2e", "loader", "kernels"}
    collected = (tmp_path / "cuda_tests.txt").read_text()
    assert "tests collected" in collected and "error" not in collected.lower(), collected
    assert "vs baseline" in res.stdout and "gpu_check: done" in res.stdout
