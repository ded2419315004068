"""The benchmark commands run on CPU at tiny shapes and print well-formed JSON (no timings asserted)."""
import json

import pytest

from fasttrain.bench.timing import budgeted_windows
from fasttrain.bench.step import all_main, e2e_main, make_synthetic_packed, step_main
from fasttrain.bench.flops import etmae_step_flops

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
    from fasttrain.bench.summary import summarize
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
    assert "budget 120 s (120 s per timing)" in err
    assert "fused step eager" in err
    recs = _records(out)
    assert [r["mode"] for r in recs] == ["fused"] and recs[0]["compiled"] is False and len(recs[0]["windows"]) == 3


def test_budgeted_windows_stop_a_timing_that_would_overrun_its_share(monkeypatch):
    """Each fn gets budget / len(fns) wall seconds (warm-up included); one whose next window,
    judged by its longest so far, would overrun that share stops after one kept window at least,
    with a note; a fn returning (items, timed s) is rated on its timed seconds. A fake clock makes
    the window lengths exact."""
    import io

    import fasttrain.bench.timing as fb
    clock = [0.0]
    monkeypatch.setattr(fb.time, "perf_counter", lambda: clock[0])

    def takes(seconds, items=10, timed=None):
        def fn():
            clock[0] += seconds
            return (items, timed) if timed else items
        return fn

    log = io.StringIO()
    rates, stopped = budgeted_windows({"slow": takes(4.0), "fast": takes(1.0, timed=0.5)}, windows=3,
                                      warmup=1, budget=12.0, log=log)
    # share 6 s: slow spends 4 (warm-up) + 4 (window 1), then 8 + 4 > 6 stops it; fast runs all 4
    assert rates == {"slow": [2.5], "fast": [20.0, 20.0, 20.0]}
    assert list(stopped) == ["slow"] and stopped["slow"].startswith("stopped after 1 of 3 windows: one takes ~4 s")
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("warm-up") and "window 3/3  fast" in lines[-1]
    assert any("slow  stopped after 1 of 3" in ln for ln in lines)
    # a share smaller than one window still keeps one window; no budget keeps them all
    rates, stopped = budgeted_windows({"slow": takes(4.0)}, windows=3, budget=1.0, log=io.StringIO())
    assert rates == {"slow": [2.5]} and "slow" in stopped
    rates, stopped = budgeted_windows({"slow": takes(4.0)}, windows=3, budget=0.0, log=io.StringIO())
    assert rates == {"slow": [2.5] * 3} and stopped == {}


def test_bench_step_budget_note_and_full(capsys):
    """A budget too small for a second window stops each mode after one with a note in its row;
    --full keeps every window (no budget) and plans 5 of them."""
    base = ["--img-size", "32", "--batch-size", "2", "--teacher", "none", "--device", "cpu", "--json"]
    assert step_main(base + ["--windows", "2", "--budget", "1e-9"]) == 0
    out, err = capsys.readouterr()
    assert "1 steps of batch 2" in err and "budget 1e-09 s" in err and "window 1/2  fused" in err
    rec = _records(out)[0]
    assert len(rec["windows"]) == 1 and rec["note"].startswith("stopped after 1 of 2 windows")
    assert step_main(base + ["--full"]) == 0
    out, err = capsys.readouterr()
    assert "(1 warm-up + 5 windows) x 2 steps" in err and "no budget" in err
    rec = _records(out)[0]
    assert len(rec["windows"]) == 5 and rec["note"] is None and rec["budget_s"] is None


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


def test_bench_bootstrap_plan_and_budget(capsys):
    """bench bootstrap prints its plan and a line per repeat; a budget too small for a second
    repeat keeps one, with a note; the vectorised values still match the loop's."""
    from fasttrain.bench import main
    base = ["bootstrap", "--images", "200", "--labels", "3", "--resamples", "20", "--reference-resamples", "2",
            "--repeats", "3", "--json"]
    assert main(base + ["--budget", "1e-9"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("plan: vectorised x 3 repeats, then the sklearn loop x 1 run of 2 resamples")
    assert "window 1/3  vectorised" in err and "sklearn loop: 2 resamples" in err
    rec = _records(out)[0]
    assert len(rec["vectorised_s"]) == 1 and rec["note"].startswith("stopped after 1 of 3 windows")
    assert rec["same_values_as_loop"] is True
    assert main(base + ["--full"]) == 0
    rec = _records(capsys.readouterr().out)[0]
    assert len(rec["vectorised_s"]) == 3 and rec["note"] is None and rec["budget_s"] is None
