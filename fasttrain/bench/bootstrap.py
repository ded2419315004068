"""`fasttrain bench bootstrap`: bootstrap AUC CIs at NIH's test size, the vectorised path against
the sklearn loop (the baseline), same data, same seed, one process."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from fasttrain.bench.timing import add_run_length_args, budgeted_windows, fill_presets, median, print_plan, record
from fasttrain.metrics import bootstrap_auc_matrix, bootstrap_auc_matrix_reference

BOOTSTRAP_BUDGET = 120.0  # s of `bench bootstrap`'s default run


def main(argv: list[str]) -> int:
    """Bootstrap AUC CIs at NIH's test size: the vectorised path against the sklearn loop it
    replaced (baseline), same data, same seed, one process. The loop is timed on fewer resamples
    (--reference-resamples) and scaled to --resamples: its cost is linear in them (reported as such).

    The plan is printed first and a line per timed run (stderr). The vectorised repeats get half
    of a 120 s budget (the loop's single timed run the other half, not stopped): a repeat that
    would overrun that half is not run, and the record notes it. `--full`: no budget."""
    p = argparse.ArgumentParser(prog="fasttrain bench bootstrap", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=25596, help="test images (NIH's official test list: 25,596)")
    p.add_argument("--labels", type=int, default=14)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--reference-resamples", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    add_run_length_args(p, budget=BOOTSTRAP_BUDGET, shared_by="the vectorised repeats (half) and the loop",
                        full="no budget: every repeat runs")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    fill_presets(a, {"budget": BOOTSTRAP_BUDGET}, {"budget": 0.0})
    budget = a.budget
    print_plan(f"vectorised x {a.repeats} repeats, then the sklearn loop x 1 run of {a.reference_resamples} "
               f"resamples (scaled); {a.images:,} images x {a.labels} labels x {a.resamples:,} resamples; "
               + (f"budget {budget:g} s ({budget / 2:.3g} s for the vectorised repeats)" if budget else "no budget"))
    rng = np.random.default_rng(0)
    prev = rng.uniform(0.01, 0.2, size=a.labels)  # NIH-like prevalences
    y = (rng.random((a.images, a.labels)) < prev).astype(np.float64)  # [N, C]
    s = np.round(y * 0.3 + rng.random((a.images, a.labels)), 3)  # [N, C] scores with ties
    labels = list(range(a.labels))
    kept: dict[str, np.ndarray] = {}

    def vectorised() -> int:
        kept["out"] = bootstrap_auc_matrix(y, s, labels, n_boot=a.resamples, seed=0)
        return a.resamples

    rates, stopped = budgeted_windows({"vectorised": vectorised}, a.repeats, warmup=0, budget=budget / 2,
                                      unit="resamples/s")
    fast = [a.resamples / r for r in rates["vectorised"]]
    out = kept["out"]
    t0 = time.perf_counter()
    ref = bootstrap_auc_matrix_reference(y, s, labels, n_boot=a.reference_resamples, seed=0)
    per = (time.perf_counter() - t0) / a.reference_resamples
    print(f"sklearn loop: {a.reference_resamples} resamples in {per * a.reference_resamples:.1f} s",
          file=sys.stderr, flush=True)
    same = bool(np.allclose(out[:a.reference_resamples], ref, atol=1e-12, equal_nan=True))
    rec = record("bootstrap", "vectorised", images=a.images, labels=a.labels, resamples=a.resamples,
                 vectorised_s_median=median(fast), vectorised_s=fast,
                 sklearn_loop_s_scaled=per * a.resamples, sklearn_loop_measured_resamples=a.reference_resamples,
                 speedup=per * a.resamples / median(fast), same_values_as_loop=same,
                 repeats_planned=a.repeats, budget_s=budget or None, note=stopped.get("vectorised"))
    if a.json:
        print(json.dumps(rec, default=str))
    else:
        print(f"bootstrap AUC, {a.images} images x {a.labels} labels x {a.resamples} resamples: vectorised "
              f"{median(fast):.2f} s (median of {len(fast)}); sklearn loop {per * a.resamples:.1f} s "
              f"(timed on {a.reference_resamples} resamples, scaled); {rec['speedup']:.0f}x; same values: {same}"
              + (f"; vectorised {rec['note']}" if rec["note"] else ""))
    return 0
