"""Shared by every benchmark: interleaved timing windows under a wall-clock budget, the plan
line, the --budget/--full flags and their presets, and JSON records with provenance."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from typing import Callable

from fasttrain.provenance import provenance


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
            print(f"{label}  {name:<{width}}  {fmt(n / dt):>10} {unit}  ({n} in {dt:.2f} s timed, "
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
    return {"bench": bench, "mode": mode, **fields, "provenance": provenance(fields.get("device"))}


def print_records(records: list[dict], as_json: bool, columns: list[str]) -> None:
    """JSON lines (one object per measurement) or a plain table of `columns`."""
    if as_json:
        for r in records:
            print(json.dumps(r))
        return
    rows = [[fmt(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def add_run_length_args(p: argparse.ArgumentParser, *, budget: float, shared_by: str, full: str) -> None:
    """--budget (wall seconds for the timed windows, shared equally by `shared_by`; default
    `budget`, 0 under --full) and --full (`full`: the long run docs/benchmarks.md quotes)."""
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the timing windows, shared equally by {shared_by}; one whose next window "
                        f"would overrun its share stops with a note (default {budget:g}; --full: 0 = no budget)")
    p.add_argument("--full", action="store_true", help=full)


def fill_presets(args: argparse.Namespace, quick: dict, full: dict) -> None:
    """Flags left unset take the quick run's value, or the long run's under --full: explicit flags win."""
    for key, value in (full if args.full else quick).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def writable_formats() -> tuple[str, ...]:
    """The packed formats this install can write: raw always, FFCV and DALI where importable (a
    benchmark packs what it can and names what it skipped)."""
    return ("raw",) + tuple(fmt for fmt, mod in (("ffcv", "ffcv"), ("dali", "nvidia.dali")) if _importable(mod))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # parent package missing
        return False
