"""`fasttrain demo` end to end at toy size: every stage runs through the real code, the table is
labelled SYNTHETIC, and the checkpoints, results and plots it names exist."""
from __future__ import annotations

import json
import re

import pytest

from fasttrain.cli import main


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "160", "--src-size", "64", "--max-steps", "2",
                 "--bootstrap", "20", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC" in text and "mAUC" in text
    # the probes side by side with the fine-tuned student: random init, MAE only, distilled, teacher
    for label in ("random init (student architecture)", "student, MAE only", "student, distilled (ETMAE)",
                  "teacher (MAE)"):
        assert re.search(rf"^{re.escape(label)}\s+[\d.]+\s+\[[\d.]+, [\d.]+\]\s+\(linear probe\)", text, re.M), label
    assert re.search(r"^student, distilled, fine-tuned\s+[\d.]+\s+\[[\d.]+, [\d.]+\]\s+\(whole encoder", text, re.M)
    for stage in ("generate phantoms", "convert (raw+ffcv)", "pretrain teacher (MAE)", "distil student (ETMAE)",
                  "student MAE only", "fine-tune student", "evaluate (test)"):
        assert re.search(rf"^{re.escape(stage)}\s+[\d,]+\s", text, re.M), stage
    for rel in ("teacher/checkpoints/last.pt", "student/checkpoints/last.pt", "finetune/checkpoints/last.pt",
                "finetune/eval/results_test.json", "finetune/eval/roc_test.png", "plots/losses.png",
                "plots/auc_bars.png", "packed/ffcv", "packed/raw", "plots/recon_teacher.png",
                "plots/recon_student.png", "student/probe/probe_test.json", "student_mae/probe/probe_test.json",
                "teacher/probe/probe_test.json", "probe_random_init/probe_test.json",
                "phantoms_src/README.txt"):
        assert (out / rel).exists(), rel
    # pre-training read the two-source mixture, each part packed by its own converter
    for stage in ("teacher", "student", "student_mae"):
        parts = json.loads((out / stage / "provenance.json").read_text())["data"]
        assert [p["dataset"] for p in parts] == ["nih-chestxray14-synthetic", "chexpert-synthetic"], stage
        assert [p["weight"] for p in parts] == [3.0, 1.0]
    assert (out / "packed_chexpert" / "raw").is_dir()
    res = json.loads((out / "finetune" / "eval" / "results_test.json").read_text())
    assert res["synthetic"] is True
    # the subgroup and calibration tables, from the phantoms' packed metadata
    assert "calibration (15 equal-width bins)" in text and re.search(r"^worst sex: [MF] ", text, re.M)
    assert set(res["subgroups"]["groups"]) == {"sex", "age", "view"} and res["calibration"]["temperature"]
    assert (out / "finetune" / "eval" / "reliability_test.png").exists()
    student = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loss_dist", 0) > 0 for r in student)  # the student really was distilled
    control = [json.loads(x) for x in (out / "student_mae" / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("loss_dist", 0) > 0 for r in control)  # and the control was not
    assert max(r.get("step", 0) for r in control) == max(r.get("step", 0) for r in student)  # equal steps
    # the hard family by default: its signs, and no deliberate subgroup effect
    assert "meniscus" in (out / "phantoms_src" / "README.txt").read_text()
    assert "deliberate effect: none" in text
    # a second demo into the same folder starts clean; a foreign folder is never deleted
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="not a demo folder"):
        main(["demo", "--out", str(tmp_path / "mine"), "--n", "160", "--quiet"])
