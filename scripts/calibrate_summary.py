#!/usr/bin/env python3
"""The hard phantoms' calibration figures over seeds, from `scripts/ablate_phantoms.sh OUT calibrate`.

Reads OUT/probe_NAME/probe_test.json (seed 0) and OUT/probe_NAME_sK/probe_test.json (seed K) for the
random encoders, the MAE-only student and the strong teacher, and prints each encoder's test mAUC
per seed and its mean, then the issue-22 figures on the means: the random encoder's probe, MAE's
lift over it (same architecture), and the teacher's margin over the MAE-only student.

Usage: scripts/calibrate_summary.py OUT
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

ENCODERS = {  # folder name -> what it is (configs/demo/*.yaml; the epochs are the script's settings)
    "random_init": "random init, teacher architecture",
    "random_init_student": "random init, student architecture",
    "student_mae": "student, MAE only",
    "teacher_weak": "weak teacher (WEAK_EPOCHS)",
    "teacher_strong": "strong teacher (STRONG_EPOCHS)",
}


def collect(out: Path) -> dict[str, dict[int, float]]:
    """encoder -> {seed: test mAUC}, for every probe folder of the calibration."""
    found: dict[str, dict[int, float]] = {}
    for f in sorted(out.glob("probe_*/probe_test.json")):
        m = re.fullmatch(r"probe_(.+?)(?:_s(\d+))?", f.parent.name)
        if m is None or m.group(1) not in ENCODERS:
            continue
        found.setdefault(m.group(1), {})[int(m.group(2) or 0)] = float(json.loads(f.read_text())["mauc"])
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = Path(argv[0])
    got = collect(out)
    if not got:
        print(f"{out}: no probe_*/probe_test.json of a calibration run", file=sys.stderr)
        return 1
    mean = {k: float(np.mean(list(v.values()))) for k, v in got.items()}
    print(f"SYNTHETIC hard phantoms, {out}: linear-probe test mAUC per seed, and the mean over seeds")
    for k, label in ENCODERS.items():
        if k in got:
            seeds = ", ".join(f"{s}: {v:.3f}" for s, v in sorted(got[k].items()))
            print(f"  {label:<48} {mean[k]:.3f}  ({seeds})")
    figures = [("random-init probe (teacher architecture) <= 0.62", "random_init", None, 0.62, "max"),
               ("MAE lift, teacher over its random init >= 0.10", "teacher_strong", "random_init", 0.10, "min"),
               ("MAE lift, student over its random init", "student_mae", "random_init_student", None, None),
               ("teacher over the MAE-only student >= 0.05", "teacher_strong", "student_mae", 0.05, "min")]
    print("figures on the means (a difference: over the seeds both encoders have):")
    for text, a, b, bound, kind in figures:
        if a not in got or (b is not None and b not in got):
            continue
        if b is None:
            v, note = mean[a], ""
        else:
            seeds = sorted(set(got[a]) & set(got[b]))
            if not seeds:
                print(f"  {text:<52} no seed in common", file=sys.stderr)
                continue
            v = float(np.mean([got[a][s] for s in seeds]) - np.mean([got[b][s] for s in seeds]))
            note = f"  (seeds {', '.join(map(str, seeds))})"
        verdict = "" if bound is None else ("  met" if (v <= bound if kind == "max" else v >= bound) else "  NOT met")
        print(f"  {text:<52} {v:+.3f}{verdict}{note}" if b else f"  {text:<52} {v:.3f}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
