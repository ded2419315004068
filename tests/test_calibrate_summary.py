"""scripts/calibrate_summary.py: the hard phantoms' calibration figures on the means over seeds."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "calibrate_summary.py"


def _load():
    spec = importlib.util.spec_from_file_location("calibrate_summary", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _probe(out: Path, name: str, mauc: float) -> None:
    (out / f"probe_{name}").mkdir(parents=True)
    (out / f"probe_{name}" / "probe_test.json").write_text(json.dumps({"mauc": mauc, "labels": {}}))


def test_means_over_seeds_and_the_figures(tmp_path, capsys):
    cs = _load()
    for name, values in {"random_init": [0.56, 0.58, 0.61], "teacher_strong": [0.65, 0.63, 0.66],
                         "random_init_student": [0.57, 0.58, 0.54], "student_mae": [0.58, 0.58, 0.58]}.items():
        for seed, v in enumerate(values):
            _probe(tmp_path, name + (f"_s{seed}" if seed else ""), v)
    _probe(tmp_path, "teacher_weak", 0.615)
    _probe(tmp_path, "something_else", 0.99)  # not an encoder of the calibration: ignored
    got = cs.collect(tmp_path)
    assert got["random_init"] == {0: 0.56, 1: 0.58, 2: 0.61} and "something_else" not in got
    assert cs.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.583  (0: 0.560, 1: 0.580, 2: 0.610)" in out  # the random encoder's mean and seeds
    lines = {ln.split("  ")[1].strip(): ln for ln in out.splitlines() if ln.startswith("  ") and ">=" in ln}
    assert lines["MAE lift, teacher over its random init >= 0.10"].endswith("+0.063  NOT met  (seeds 0, 1, 2)")
    assert lines["teacher over the MAE-only student >= 0.05"].endswith("+0.067  met  (seeds 0, 1, 2)")
    assert "0.583  met" in out  # random-init probe <= 0.62


def test_a_difference_uses_the_seeds_both_encoders_have(tmp_path, capsys):
    """A teacher left at one seed against three random encoders: the lift pairs seed 0 with seed 0,
    not the teacher's one value with the random encoders' mean."""
    cs = _load()
    for seed, v in enumerate([0.56, 0.60, 0.64]):
        _probe(tmp_path, "random_init" + (f"_s{seed}" if seed else ""), v)
    _probe(tmp_path, "teacher_strong", 0.67)
    assert cs.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.600  met" in out  # the random encoders' own mean, over all their seeds
    assert "+0.110  met  (seeds 0)" in out  # 0.67 - 0.56, not 0.67 - 0.60


def test_no_calibration_run_is_an_error(tmp_path, capsys):
    assert _load().main([str(tmp_path)]) == 1
    assert "no probe_*/probe_test.json" in capsys.readouterr().err
