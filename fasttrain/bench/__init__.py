"""`fasttrain bench`: throughput against a named baseline measured in the same run.

Each stage keeps its own benchmark beside its code (fasttrain/bench/loader.py for loaders,
fasttrain/bench/kernels.py for the Triton ops, fasttrain/bench/step.py for the step and end to end);
this file dispatches and holds the shared timing and reporting helpers. Benchmarks never run
in the test suite as timings: tests only check that they run and print well-formed JSON.
"""
from __future__ import annotations

import importlib
import json
import math
import statistics
import sys
import time
from typing import Callable

SUBCOMMANDS = {
    "loader": ("fasttrain.bench.loader", "main"),
    "kernels": ("fasttrain.bench.kernels", "main"),
    "step": ("fasttrain.bench.step", "step_main"),
    "e2e": ("fasttrain.bench.step", "e2e_main"),
    "all": ("fasttrain.bench.step", "all_main"),
    "convert": ("fasttrain.bench.convert", "main"),
    "summary": ("fasttrain.bench", "summary_main"),
    "bootstrap": ("fasttrain.bench", "bootstrap_main"),
}


def budgeted_windows(fns: dict[str, Callable[[], int | tuple[int, float]]], windows: int, warmup: int = 1,
                     budget: float = 0.0, sync: Callable[[], None] | None = None, unit: str = "items/s",
                     log=None) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Interleaved timing windows (machine noise hits every fn alike), a line per window on `log`
    (stderr by default), under an optional wall-clock budget.

    Each fn runs one window and returns the items it processed (timed over its whole call) or
    (items, timed seconds) when it times only part of its call (a loader leaving its epoch
    start-up untimed). The first `warmup` windows are not kept. With a budget, each fn may spend
    budget / len(fns) wall seconds (warm-up included); one whose next window, estimated by its
    longest so far, would overrun that share stops there, after one kept window at least, so that
    every fn (the baseline above all) has a figure. Returns ({name: items/s per kept window},
    {name: why it stopped early})."""
    log = log or sys.stderr
    rates: dict[str, list[float]] = {k: [] for k in fns}
    spent = dict.fromkeys(fns, 0.0)
    longest = dict.fromkeys(fns, 0.0)
    stopped: dict[str, str] = {}
    share = budget / len(fns) if budget else math.inf
    width = max(len(k) for k in fns)
    for w in range(warmup + windows):
        for name, fn in fns.items():
            if name in stopped:
                continue
            if rates[name] and spent[name] + longest[name] > share:
                stopped[name] = (f"stopped after {len(rates[name])} of {windows} windows: one takes "
                                 f"~{longest[name]:.3g} s, over its {share:.3g} s share of the {budget:g} s "
                                 f"budget (--budget, --full)")
                print(f"  {name:<{width}}  {stopped[name]}", file=log, flush=True)
                continue
            if sync:
                sync()
            t0 = time.perf_counter()
            out = fn()
            if sync:
                sync()
            wall = time.perf_counter() - t0
            n, dt = out if isinstance(out, tuple) else (out, wall)
            spent[name] += wall
            longest[name] = max(longest[name], wall)
            label = f"window {w - warmup + 1}/{windows}" if w >= warmup else "warm-up   "
            print(f"{label}  {name:<{width}}  {_fmt(n / dt):>10} {unit}  ({n} in {dt:.2f} s timed, "
                  f"{wall:.1f} s wall)", file=log, flush=True)
            if w >= warmup:
                rates[name].append(n / dt)
    return rates, stopped


def print_plan(text: str) -> None:
    """The plan of a benchmark run (what it times, how often, how long at most), on stderr before
    any timing, so that a long run says so at once."""
    print(f"plan: {text}", file=sys.stderr, flush=True)


def budget_text(budget: float, parts: int) -> str:
    """How the plan line states a budget shared by `parts` timings."""
    return f"budget {budget:g} s ({budget / parts:.3g} s per timing)" if budget else "no budget"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def record(bench: str, mode: str, **fields) -> dict:
    """One JSON-able measurement with the provenance of the run that made it."""
    from fasttrain.provenance import provenance
    return {"bench": bench, "mode": mode, **fields, "provenance": provenance(fields.get("device"))}


def print_records(records: list[dict], as_json: bool, columns: list[str]) -> None:
    """JSON lines (one object per measurement) or a plain table of `columns`."""
    if as_json:
        for r in records:
            print(json.dumps(r))
        return
    rows = [[_fmt(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def summarize(records: list[dict]) -> str:
    """A short table of JSON records from any benchmark: one line each, the headline figure, its
    ratio to the baseline of that benchmark, and MFU (step) or % of copy bandwidth (kernels)."""
    lines = [f"{'bench':<8}{'what':<30}{'figure':>16}  {'vs baseline':<22}{'MFU/%copy':>10}"]
    for r in records:
        b = r.get("bench", "?")
        if b == "kernels":
            what = f"{r.get('op')} {r.get('pass')} D={r.get('D')} {r.get('impl')}"
            fig = f"{r.get('ms', float('nan')):.3f} ms"
            vs = f"{r['vs_eager']:.2f}x eager" if r.get("vs_eager") else "-"
            eff = f"{r['pct_of_copy']:.0f}%" if r.get("pct_of_copy") is not None else "-"
        else:
            what = str(r.get("mode"))
            ips = r.get("images_per_s")
            fig = f"{ips:,.1f} img/s" if ips is not None else "stopped"
            if r.get("ratio_vs_step_only") is not None:
                vs = f"{r['ratio_vs_step_only']:.2f}x step-only"
            elif r.get("ratio_vs_reference") is not None:
                vs = f"{r['ratio_vs_reference']:.2f}x reference"
            else:
                vs = "-"
            if b == "loader" and r.get("feed_images_per_s") is not None:
                what += f" (feed {r['feed_images_per_s']:,.0f}/s)"
            eff = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"{b:<8}{what[:29]:<30}{fig:>16}  {vs:<22}{eff:>10}")
    devices = sorted({str(r.get("provenance", {}).get("device")) for r in records})
    lines.append(f"device: {', '.join(devices)}")
    return "\n".join(lines)


def summary_main(argv: list[str]) -> int:
    """`fasttrain bench summary FILE.jsonl...`: the short table of saved --json output."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fasttrain bench summary FILE.jsonl [...]")
        return 0 if argv else 2
    records = []
    for path in argv:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.startswith("{")]
    print(summarize(records))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fasttrain bench {" + "|".join(SUBCOMMANDS) + "} [args]  (each takes --help)")
        return 0
    sub, rest = argv[0], argv[1:]
    if sub not in SUBCOMMANDS:
        print(f"fasttrain bench: unknown benchmark '{sub}'; choose one of {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    module, func = SUBCOMMANDS[sub]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        print(f"fasttrain bench {sub}: not available in this build ({e})", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


BOOTSTRAP_BUDGET = 120.0  # s of `bench bootstrap`'s default run


def bootstrap_main(argv: list[str]) -> int:
    """Bootstrap AUC CIs at NIH's test size: the vectorised path against the sklearn loop it
    replaced (baseline), same data, same seed, one process. The loop is timed on fewer resamples
    (--reference-resamples) and scaled to --resamples: its cost is linear in them (reported as such).

    The plan is printed first and a line per timed run (stderr). The vectorised repeats get half
    of a 120 s budget (the loop's single timed run the other half, not stopped): a repeat that
    would overrun that half is not run, and the record notes it. `--full`: no budget."""
    import argparse
    import numpy as np
    from fasttrain.metrics import bootstrap_auc_matrix, bootstrap_auc_matrix_reference
    p = argparse.ArgumentParser(prog="fasttrain bench bootstrap", description=bootstrap_main.__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=25596, help="test images (NIH's official test list: 25,596)")
    p.add_argument("--labels", type=int, default=14)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--reference-resamples", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; the vectorised repeats may take half (default 120; --full: 0 = no budget)")
    p.add_argument("--full", action="store_true", help="no budget: every repeat runs")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    budget = a.budget if a.budget is not None else (0.0 if a.full else BOOTSTRAP_BUDGET)
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
