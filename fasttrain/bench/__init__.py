"""`fasttrain bench`: throughput against a named baseline measured in the same run.

One module per benchmark (loader, mixture, kernels, step and e2e, convert, bootstrap), apart from
the code each measures; timing.py holds the shared timing windows, budgets and records, summary.py
the table of saved results. Benchmarks never run in the test suite as timings: tests only check
that they run and print well-formed JSON.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "loader": ("fasttrain.bench.loader", "main"),
    "kernels": ("fasttrain.bench.kernels", "main"),
    "step": ("fasttrain.bench.step", "step_main"),
    "e2e": ("fasttrain.bench.step", "e2e_main"),
    "all": ("fasttrain.bench.step", "all_main"),
    "convert": ("fasttrain.bench.convert", "main"),
    "summary": ("fasttrain.bench.summary", "main"),
    "bootstrap": ("fasttrain.bench.bootstrap", "main"),
}


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
