"""`fasttrain bench kernels`: each fused op against eager torch and torch.compile of its reference.

For masked_gather, unshuffle_with_mask_token and l1_align, times the forward (under no_grad) and
forward+backward of three implementations on the same inputs in the same run:
  eager     the pure-torch reference (the baseline every row's `vs_eager` is relative to)
  compiled  torch.compile of that reference (what the trainer's compiled step would do anyway)
  triton    the kernels through their entry points (CUDA only)
and reports ms (median) and GB/s, where GB/s counts the bytes the op must move at minimum
(inputs read once, outputs written once; see `_bytes`), next to the device's measured copy
bandwidth (read + write of a large tensor), the practical ceiling for these memory-bound ops.
(At `--shapes small` on a CPU the operands fit in cache, so GB/s can exceed that ceiling.)

CUDA: medians of triton.testing.do_bench. CPU: Triton is skipped (the interpreter checks
correctness, it is not a speed path) and eager vs compiled are timed with interleaved
time.perf_counter windows (fasttrain.bench.timing.budgeted_windows). Kernel default on CUDA:
kernels.DEFAULT_BACKEND (see its comment).

Run time: the plan is printed first and a line per op and pass as it goes (stderr). On CUDA the
default is the paper's shapes, compiled references included. On the CPU the default is
`--shapes small` without torch.compile (compiling the references costs minutes on a few cores),
20 windows per implementation under a 60 s budget shared by the ops (an implementation whose next
window would overrun its share stops with a note): seconds. `--full`: the paper's shapes with the
compiled references and no budget (minutes on a CPU).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from typing import Callable

import torch

from fasttrain.bench.timing import budget_text, budgeted_windows, median, print_plan, print_records, record
from fasttrain.kernels import HAS_TRITON, use_backend
from fasttrain.kernels.l1_align import l1_align, l1_align_reference
from fasttrain.kernels.masked_gather import (masked_gather, masked_gather_reference, unshuffle_with_mask_token,
                                             unshuffle_with_mask_token_reference)

SHAPES = {
    # The paper's pre-training: batch 256, 224 px / 16 = 196 patches, 75% masked -> 49 kept;
    # widths of ViT-T/S/B (student 192, teachers 384 and 768).
    "paper": dict(N=256, L=196, K=49, dims=(192, 384, 768)),
    # CPU smoke test: the paper's token counts, a small batch, one width.
    "small": dict(N=8, L=196, K=49, dims=(192,)),
}
OPS = ("masked_gather", "unshuffle_with_mask_token", "l1_align")
COLUMNS = ["op", "pass", "D", "impl", "ms", "gb_per_s", "pct_of_copy", "vs_eager", "note"]
# the CPU's default (quick) run: shapes, whether to compile, budget s of timing windows (0: none)
QUICK_CPU = dict(shapes="small", compile=False, budget=60.0)
FULL = dict(shapes="paper", compile=True, budget=0.0)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fasttrain bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")
    p.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                   help="default: paper on CUDA and with --full, small on the CPU")
    p.add_argument("--dims", type=str, default=None,
                   help="comma-separated widths (default: those of --shapes)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="token dtype (default bf16 on CUDA, as under autocast; fp32 on CPU)")
    p.add_argument("--ops", type=str, default=",".join(OPS),
                   help="comma-separated subset of " + ", ".join(OPS))
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    p.add_argument("--reps", type=int, default=20, help="timing windows on CPU")
    p.add_argument("--budget", type=float, default=None,
                   help="CPU: seconds for the timing windows, shared equally by every op, pass and width "
                        "(default 60; --full or CUDA: 0 = no budget)")
    p.add_argument("--full", action="store_true",
                   help="the paper's shapes with compiled references and no budget (the long run on a CPU)")
    args = p.parse_args(argv)
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        p.error(f"unknown op(s) {', '.join(sorted(unknown))}; choose from {', '.join(OPS)}")
    return args


# ----------------------------------------------------------------------------------------------
# Problems: inputs, the three implementations, and the minimal bytes each pass moves
# ----------------------------------------------------------------------------------------------

class Problem:
    """One op at one shape, with inputs laid out as the model passes them (slices included):
    `runner(fn, pass_)` returns a closure running the forward (no_grad) or forward+backward."""

    def __init__(self, op: str, N: int, L: int, K: int, D: int, dtype: torch.dtype, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        es = torch.empty((), dtype=dtype).element_size()

        def rand(*shape, dt=dtype, grad=True):
            return torch.randn(*shape, generator=g).to(device, dt).requires_grad_(grad)

        ids_shuffle = torch.rand(N, L, generator=g).argsort(dim=1).to(device)  # [N, L]
        ids_keep = ids_shuffle[:, :K]  # [N, K] a strided slice, as MAE's random_masking returns
        ids_restore = ids_shuffle.argsort(dim=1)  # [N, L]
        if op == "masked_gather":
            # patch tokens (bf16 under autocast) + MAE's fixed fp32 sin-cos pos-embed (no grad):
            # the sum, hence the output and its grad, is fp32 by type promotion.
            x, pos = rand(N, L, D), rand(1, L, D, dt=torch.float32, grad=False)
            self.args, self.leaves = (x, ids_keep, pos), [x]
            self.fns = (masked_gather_reference, masked_gather)
            fwd = N * K * (D * es + 8) + L * D * 4 + N * K * D * 4  # read rows, ids, pos; write
            bwd = N * K * (D * 4 + 8) + N * L * D * es  # read grad, ids; write grad_x
        elif op == "unshuffle_with_mask_token":
            # decoder tokens after decoder_embed, CLS dropped by a slice; learned fp32 mask token
            latent, tok = rand(N, 1 + K, D), rand(D, dt=torch.float32)
            self.args, self.leaves = (latent[:, 1:], tok, ids_restore), [latent, tok]
            self.fns = (unshuffle_with_mask_token_reference, unshuffle_with_mask_token)
            fwd = N * K * D * es + D * 4 + N * L * 8 + N * L * D * es
            bwd = N * L * D * es + N * L * 8 + N * K * D * es + D * 4
        else:  # l1_align over the visible tokens + CLS, as the distillation aligns them
            T = K + 1
            s, t = rand(N, T, D), rand(N, T, D, grad=False)
            self.args, self.leaves = (s, t), [s]
            self.fns = (l1_align_reference, l1_align)
            fwd = 2 * N * T * D * es  # read s, t
            bwd = 3 * N * T * D * es  # read s, t; write grad_s
        self.bytes = {"fwd": fwd, "fwd+bwd": fwd + bwd}
        out = self.fns[0](*self.args)
        self.grad = torch.randn(out.shape, generator=g).to(device, out.dtype)

    def runner(self, fn: Callable, pass_: str) -> Callable[[], None]:
        if pass_ == "fwd":
            def run():
                with torch.no_grad():
                    fn(*self.args)
        else:
            def run():
                fn(*self.args).backward(self.grad)
        return run


def _copy_gb_per_s(device: str) -> float:
    """Read + write bandwidth of a large tensor copy: the ceiling for memory-bound kernels."""
    n = (256 if device == "cuda" else 64) * 2**20 // 4  # well beyond any cache
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    else:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append((time.perf_counter() - t0) * 1e3)
        ms = median(times)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def _time_cuda(fns: dict[str, Callable[[], None]], leaves: list[torch.Tensor]) -> dict[str, float]:
    import triton.testing
    for fn in fns.values():  # compile / autotune first: do_bench sizes its loop on the first calls
        fn()
        fn()
    torch.cuda.synchronize()
    return {name: triton.testing.do_bench(fn, grad_to_none=leaves, return_mode="median")
            for name, fn in fns.items()}


def _time_cpu(fns: dict[str, Callable[[], None]], reps: int, budget: float) -> tuple[dict[str, float], dict[str, str]]:
    """(ms per call, median of `reps` windows after 2 warm-ups; {impl: why it stopped early}).
    The per-window lines are not printed (hundreds of sub-millisecond windows): the caller prints
    one line per op and pass."""
    def once(fn):
        def window() -> int:
            fn()
            return 1
        return window
    rates, stopped = budgeted_windows({k: once(f) for k, f in fns.items()}, reps, warmup=2, budget=budget,
                                      log=io.StringIO())
    return {k: 1e3 / median(r) for k, r in rates.items()}, stopped


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu_quick = device != "cuda" and not args.full
    shapes = args.shapes or ("small" if cpu_quick else "paper")
    compile_refs = not args.no_compile and not cpu_quick
    budget = args.budget if args.budget is not None else (QUICK_CPU["budget"] if cpu_quick else 0.0)
    shape = SHAPES[shapes]
    dims = tuple(int(d) for d in args.dims.split(",")) if args.dims else shape["dims"]
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    use_triton_impl = device == "cuda" and HAS_TRITON
    note = sys.stderr if args.json else sys.stdout
    if not use_triton_impl:
        why = "no CUDA device" if device != "cuda" else "triton is not installed"
        print(f"[bench kernels] Triton skipped ({why}): timing eager vs compiled references only",
              file=note)
    if not compile_refs:
        why = "--no-compile" if args.no_compile else "the CPU's quick run; --full compiles"
        print(f"[bench kernels] torch.compile skipped ({why})", file=note)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    copy_bw = _copy_gb_per_s(device)
    print(f"[bench kernels] device copy bandwidth {copy_bw:,.1f} GB/s; N={shape['N']} L={shape['L']} "
          f"K={shape['K']} dtype={dtype_name}", file=note)

    ops = args.ops.split(",")
    impls = ["eager"] + (["compiled"] if compile_refs else []) + (["triton"] if use_triton_impl else [])
    groups = len(dims) * len(ops) * 2
    print_plan(f"{len(ops)} ops x {len(dims)} widths ({','.join(map(str, dims))}) x fwd, fwd+bwd x "
               f"{', '.join(impls)} on {device}; N={shape['N']} L={shape['L']} K={shape['K']} {dtype_name}; "
               + ("triton.testing.do_bench medians" if device == "cuda" else
                  f"2 warm-up + {args.reps} windows per implementation; "
                  f"{budget_text(budget, groups * len(impls))}"))
    records = []
    for D in dims:
        for op in ops:
            prob = Problem(op, shape["N"], shape["L"], shape["K"], D, dtype, device)
            ref, entry = prob.fns
            for pass_ in ("fwd", "fwd+bwd"):
                fns = {"eager": prob.runner(ref, pass_)}
                if compile_refs:
                    fns["compiled"] = prob.runner(torch.compile(ref, dynamic=False), pass_)
                if use_triton_impl:
                    fns["triton"] = prob.runner(entry, pass_)
                with use_backend("triton" if use_triton_impl else "torch"):
                    if device == "cuda":
                        ms, stopped = _time_cuda(fns, prob.leaves), {}
                    else:
                        ms, stopped = _time_cpu(fns, args.reps, budget / groups)
                print(f"{op} {pass_} D={D}: " + ", ".join(f"{k} {v:.3g} ms" for k, v in ms.items())
                      + "".join(f"; {k} {v}" for k, v in stopped.items()), file=sys.stderr, flush=True)
                for impl, t in ms.items():
                    gbs = prob.bytes[pass_] / (t * 1e-3) / 1e9
                    records.append(record(
                        "kernels", impl, op=op, impl=impl, **{"pass": pass_}, D=D, N=shape["N"],
                        note=stopped.get(impl), shapes=shapes, budget_s=budget or None,
                        L=shape["L"], K=shape["K"], dtype=dtype_name,
                        ms=t, bytes=prob.bytes[pass_], gb_per_s=gbs, copy_gb_per_s=copy_bw,
                        pct_of_copy=100.0 * gbs / copy_bw, vs_eager=ms["eager"] / t, device=device))
    print_records(records, args.json, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
