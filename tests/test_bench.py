"""The benchmark commands run on CPU at tiny shapes and print well-formed JSON (no timings asserted)."""
import json

import pytest

from fasttrain.train.bench import all_main, e2e_main, make_synthetic_packed, step_main
from fasttrain.train.flops import etmae_step_flops

TINY = ["--img-size", "32", "--batch-size", "2", "--steps", "1", "--windows", "1", "--no-compile", "--json"]
STEP_KEYS = {"bench", "mode", "images_per_s", "ratio_vs_reference", "flops_per_image", "mfu", "provenance"}


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_bench_step_json(capsys):
    assert step_main(TINY + ["--teacher", "mae_vit_small_patch16"]) == 0
    recs = _records(capsys.readouterr().out)
    assert [r["mode"] for r in recs] == ["reference", "fused", "mae_only"]
    for r in recs:
        assert STEP_KEYS <= r.keys() and r["bench"] == "step"
        # the MFU's scale depends on timing (a measured CPU peak): only its sign is a test here
        assert r["images_per_s"] > 0 and r["mfu"] > 0
        assert {"git_sha", "versions", "device", "cpu_cores"} <= r["provenance"].keys()
    assert recs[0]["ratio_vs_reference"] == 1.0
    assert recs[1]["ratio_vs_reference"] == pytest.approx(recs[1]["images_per_s"] / recs[0]["images_per_s"])
    assert recs[2]["ratio_vs_reference"] is None
    from fasttrain.bench import summarize
    table = summarize(recs).splitlines()
    assert len(table) == 1 + len(recs) + 1 and "x reference" in table[2] and "img/s" in table[1]
    # The distillation step does more work than the student alone, by the teacher's forward.
    assert recs[1]["flops_per_image"] > recs[2]["flops_per_image"]


def test_bench_step_cpu_defaults_eager_with_a_plan(capsys):
    """On the CPU the fused step is timed eager unless --compile (compiling costs minutes on a few
    cores), over 3 windows; the plan is printed first (stderr)."""
    assert step_main(["--img-size", "32", "--batch-size", "2", "--steps", "1", "--teacher", "none",
                      "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("plan: fused x (1 warm-up + 3 windows) x 1 steps of batch 2 at 32 px on cpu")
    assert "fused step eager" in err
    recs = _records(out)
    assert [r["mode"] for r in recs] == ["fused"] and recs[0]["compiled"] is False and len(recs[0]["windows"]) == 3


def test_step_flops_paper_shapes():
    """ViT-T student (+512x2 decoder) and ViT-B teacher to block 8 at 224 px, counted by hand."""
    from fasttrain.models.distill import build_etmae
    m = build_etmae("mae_vit_tiny_patch16", "mae_vit_base_patch16", in_chans=1)
    f = etmae_step_flops(m.student, m.teacher, 0.75, 8, m.proj)
    L, T = 196, 50

    def blk(t, d):
        return 24 * t * d * d + 4 * t * t * d

    patch = 2 * L * 256  # per output channel
    student = (patch * 192 + 12 * blk(T, 192) + 2 * T * 192 * 512 + 2 * blk(L + 1, 512)
               + 2 * (L + 1) * 512 * 256 + 2 * T * 192 * 768)
    teacher = patch * 768 + 9 * blk(T, 768)
    assert f.student_fwd == student and f.teacher_fwd == teacher
    assert f.per_image == 3 * student + teacher


@pytest.mark.slow
def test_bench_e2e_and_all_json(tmp_path, capsys):
    data = make_synthetic_packed(tmp_path, 48, 32)
    assert e2e_main(TINY + ["--teacher", "mae_vit_small_patch16", "--data", str(data)]) == 0
    recs = _records(capsys.readouterr().out)
    assert [r["mode"] for r in recs] == ["step_only", "loader+step"]
    assert recs[1]["ratio_vs_step_only"] > 0 and recs[1]["bound"] in ("compute", "loading")
    assert all_main(TINY + ["--teacher", "none", "--data", str(data), "--skip", "kernels",
                            "--loader-batches", "1"]) == 0
    benches = {r["bench"] for r in _records(capsys.readouterr().out)}
    assert {"step", "e2e"} <= benches and len(benches) >= 3
