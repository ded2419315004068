"""`fasttrain bench step | e2e | all`: the pre-training step against the baseline step.

- step: images/s of the reference step (the baseline: eager, full teacher + decoder, fp32 on
  CPU / fp16 on CUDA, for-loop AdamW) and the fused step (compiled, bf16, truncated bf16 teacher,
  channels-last, fused AdamW), same models, same run, interleaved timing windows, median. Also a
  student-only MAE step for context. Synthetic device tensors: compute only, no loading.
- e2e: the real loader feeding the fused step, against the step alone at the same batch, in the
  same run: a ratio near 1 means compute bounds the run, well below 1 means loading does.
- all: loader, kernels, step and e2e in one go (makes a small synthetic packed set if no --data).

Run time: each prints its plan first and a line per window (stderr); the windows share a 120 s
budget equally between the modes, and a mode whose next window would overrun its share stops with
a note in its row. `--full`: 5 windows (of 2 steps on the CPU), no budget.

MFU = images/s x analytic FLOPs per image (fasttrain.bench.flops) / device peak (datasheet bf16
peak for known GPUs, else a measured bf16 matmul rate, named in the output).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from fasttrain.bench.flops import etmae_step_flops, known_peak, measured_matmul_peak
from fasttrain.bench.kernels import main as kernels_main
from fasttrain.bench.loader import main as loader_main
from fasttrain.bench.timing import (add_run_length_args, budget_text, budgeted_windows, fill_presets, median,
                                    print_plan, print_records, record, writable_formats)
from fasttrain.config import build_config
from fasttrain.converters.nih import convert_nih
from fasttrain.converters.synthetic import generate_phantoms
from fasttrain.data import build_loader
from fasttrain.models import create_model, student_of
from fasttrain.models.distill import build_etmae
from fasttrain.provenance import device_name
from fasttrain.train.engine import make_step
from fasttrain.train.optim import build_optimizer, param_groups_weight_decay

COLUMNS = ["bench", "mode", "images_per_s", "ratio_vs_reference", "gflops_per_image", "mfu", "batch_size",
           "device", "note"]
# seconds of timing windows in the default (quick) run, shared by the modes; --full has none
QUICK_BUDGET = 120.0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def _peak(device: torch.device) -> tuple[float, str]:
    name = device_name(str(device))
    peak = known_peak(name) if device.type == "cuda" else None
    if peak is not None:
        return peak, f"datasheet bf16 dense peak of {name}"
    return measured_matmul_peak(device), f"measured bf16 matmul rate on {name}"


def build_bench_step(mode: str, args, device: torch.device, teacher: str | None):
    """A fresh model + optimizer + step for one mode (the fused step converts its teacher in place)."""

    overrides = {
        "model": {"name": args.student, "img_size": args.img_size, "in_chans": args.in_chans},
        "engine": {"mode": mode, "compile": mode == "fused" and not args.no_compile},
        "optim": {"accum_steps": 1},
    }
    cfg = build_config(overrides=overrides)
    torch.manual_seed(0)
    kw = dict(img_size=args.img_size, in_chans=args.in_chans)
    if teacher is None:
        model = create_model(args.student, **kw)
    else:
        model = build_etmae(args.student, teacher, student_blocks=[args.kd_block], teacher_blocks=[args.kd_block], **kw)
    model = model.to(device).train()
    opt = build_optimizer(param_groups_weight_decay(model, 0.05), 1e-4, cfg.optim,
                          reference=(mode == "reference"), device=device)
    return make_step(cfg, model, opt, device=device), model


def step_flops(model, args) -> int:
    student = student_of(model)
    teacher = getattr(model, "teacher", None)
    proj = getattr(model, "proj", None)
    return etmae_step_flops(student, teacher, args.mask_ratio, args.kd_block, proj).per_image


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", default="mae_vit_tiny_patch16")
    p.add_argument("--teacher", default="mae_vit_base_patch16", help="registry name, or 'none' for MAE only")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timing window (default: 10 CUDA, 1 CPU; --full on the CPU: 2)")
    p.add_argument("--windows", type=int, default=None,
                   help="timed windows per mode, interleaved, after 1 warm-up window (default 3; --full: 5)")
    add_run_length_args(p, budget=QUICK_BUDGET, shared_by="the modes",
                        full="the long run docs/benchmarks.md quotes: 5 windows (of 2 steps on the CPU), no budget")
    p.add_argument("--kd-block", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--no-compile", action="store_true", help="fused mode without torch.compile (the CPU default)")
    p.add_argument("--compile", action="store_true",
                   help="fused mode with torch.compile on the CPU too (minutes of compiling on a few cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")


def _defaults(args, device: torch.device) -> None:
    """The quick run (within 3 minutes on 2 busy cores at 224 px) unless --full; explicit flags win."""
    cuda = device.type == "cuda"
    if args.batch_size is None:
        args.batch_size = 256 if cuda else 16
    if args.steps is None:
        args.steps = 10 if cuda else (2 if args.full else 1)
    if args.windows is None:
        args.windows = 5 if args.full else 3
    fill_presets(args, {"budget": QUICK_BUDGET}, {"budget": 0.0})
    # compiling the fused step costs 1.5-3 minutes on a 2-core CPU, and eager measured faster
    # there (docs/benchmarks.md): compiled by default on CUDA only
    args.no_compile = args.no_compile or (device.type != "cuda" and not getattr(args, "compile", False))
    args.teacher = None if str(args.teacher).lower() == "none" else args.teacher


def _runner(step, images: torch.Tensor, steps: int):
    def run() -> int:
        for _ in range(steps):
            step(images)
        return steps * images.shape[0]
    return run


def run_step_bench(args) -> list[dict]:
    device = _device(args.device)
    _defaults(args, device)
    shape = (args.batch_size, args.in_chans, args.img_size, args.img_size)
    images = torch.randn(shape, device=device)
    modes = {"reference": "reference", "fused": "fused"} if args.teacher else {"fused": "fused"}
    extra = ["mae_only"] if args.teacher and not args.skip_mae else []
    names = list(modes) + extra
    print_plan(f"{', '.join(names)} x (1 warm-up + {args.windows} windows) x {args.steps} steps of batch "
               f"{args.batch_size} at {args.img_size} px on {device}; fused step "
               f"{'eager' if args.no_compile else 'compiled'}; {budget_text(args.budget, len(names))}")
    fns, flops = {}, {}
    for label, mode in modes.items():
        step, model = build_bench_step(mode, args, device, args.teacher)
        step(images)  # warm-up; compiles the fused step (excluded from timing)
        fns[label] = _runner(step, images, args.steps)
        flops[label] = step_flops(model, args)
    if args.teacher and not args.skip_mae:
        step, model = build_bench_step("fused", args, device, None)
        step(images)
        fns["mae_only"] = _runner(step, images, args.steps)
        flops["mae_only"] = step_flops(model, args)
    rates, stopped = budgeted_windows(fns, args.windows, warmup=1, budget=args.budget, sync=_sync(device),
                                      unit="img/s")
    peak, peak_src = _peak(device)
    ref = median(rates["reference"]) if "reference" in rates else None
    records = []
    for label, rs in rates.items():
        ips = median(rs)
        records.append(record(
            "step", label, images_per_s=ips,
            ratio_vs_reference=(ips / ref) if ref and label != "mae_only" else None,
            flops_per_image=flops[label], gflops_per_image=flops[label] / 1e9,
            mfu=ips * flops[label] / peak, peak_flops=peak, peak_source=peak_src,
            windows=[round(r, 3) for r in rs], batch_size=args.batch_size, img_size=args.img_size,
            student=args.student, teacher=args.teacher if label != "mae_only" else None,
            compiled=(label != "reference" and not args.no_compile), windows_planned=args.windows,
            budget_s=args.budget or None, note=stopped.get(label), device=str(device)))
    return records


def step_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fasttrain bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--skip-mae", action="store_true", help="skip the student-only MAE row")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print_records(run_step_bench(args), args.json, COLUMNS)
    return 0


def run_e2e_bench(args) -> list[dict]:

    device = _device(args.device)
    _defaults(args, device)
    step, model = build_bench_step("fused", args, device, args.teacher)
    cfg = build_config(overrides={"data": {"path": str(args.data), "loader": args.loader,
                                           "batch_size": args.batch_size}})
    loader = build_loader(cfg.data, args.split, True, img_size=args.img_size, in_chans=args.in_chans,
                          device=str(device), dtype=step.amp_dtype or torch.float32)
    if len(loader) < 1:
        raise SystemExit(f"bench e2e: {args.data} split '{args.split}' has fewer than one batch of {args.batch_size}")
    state = {"epoch": 0, "it": None}

    def next_batch():
        while True:
            if state["it"] is None:
                loader.set_epoch(state["epoch"])
                state["it"] = iter(loader)
            try:
                return next(state["it"])[0]
            except StopIteration:
                state["it"], state["epoch"] = None, state["epoch"] + 1

    images = next_batch()
    step(images)  # warm-up / compile at the loader's exact shape and dtype
    fixed = images.clone()

    def e2e() -> int:
        n = 0
        for _ in range(args.steps):
            batch = next_batch()
            step(batch)
            n += batch.shape[0]
        return n

    print_plan(f"step_only, e2e x (1 warm-up + {args.windows} windows) x {args.steps} steps of batch "
               f"{args.batch_size} at {args.img_size} px on {device}; {type(loader).__name__} over {args.data} "
               f"split {args.split} ({len(loader)} batches/epoch); fused step "
               f"{'eager' if args.no_compile else 'compiled'}; {budget_text(args.budget, 2)}")
    rates, stopped = budgeted_windows({"step_only": _runner(step, fixed, args.steps), "e2e": e2e}, args.windows,
                                      warmup=1, budget=args.budget, sync=_sync(device), unit="img/s")
    flops = step_flops(model, args)
    peak, peak_src = _peak(device)
    s, e = median(rates["step_only"]), median(rates["e2e"])
    common = dict(flops_per_image=flops, gflops_per_image=flops / 1e9, peak_flops=peak, peak_source=peak_src,
                  batch_size=args.batch_size, img_size=args.img_size, student=args.student, teacher=args.teacher,
                  loader=type(loader).__name__, data=str(args.data), windows_planned=args.windows,
                  budget_s=args.budget or None, device=str(device))
    return [
        record("e2e", "step_only", images_per_s=s, ratio_vs_reference=None, mfu=s * flops / peak,
               windows=[round(r, 3) for r in rates["step_only"]], note=stopped.get("step_only"), **common),
        record("e2e", "loader+step", images_per_s=e, ratio_vs_step_only=e / s, ratio_vs_reference=None,
               mfu=e * flops / peak, windows=[round(r, 3) for r in rates["e2e"]], note=stopped.get("e2e"),
               bound="compute" if e / s >= 0.9 else "loading", **common),
    ]


def e2e_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fasttrain bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--data", required=True, help="packed dataset folder")
    p.add_argument("--split", default="train")
    p.add_argument("--loader", default="auto", help="auto | raw | ffcv | dali | reference")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print_records(run_e2e_bench(args), args.json, COLUMNS + ["ratio_vs_step_only"])
    return 0


def make_synthetic_packed(root: Path, n: int, size: int) -> Path:
    """Phantoms -> NIH converter into every format this machine can write (SYNTHETIC data)."""

    src, out = root / "phantoms_src", root / "phantoms_packed"
    generate_phantoms(src, n, seed=0, size=size, progress=False)
    formats = list(writable_formats())
    convert_nih(src, out, formats=tuple(formats), size=size, progress=False)
    return out


def all_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fasttrain bench all",
                                description="loader, kernels, step and e2e benchmarks in one run; the default "
                                            "run shares --budget equally between loader, step and e2e")
    _add_common(p)
    p.add_argument("--data", default=None, help="packed dataset (default: make a synthetic one in a temp dir)")
    p.add_argument("--n-images", type=int, default=None,
                   help="size of the synthetic set when --data is absent (default 512; --full: 2048)")
    p.add_argument("--loader-batches", type=int, default=4)
    p.add_argument("--skip", default="", help="comma-separated subset of loader,kernels,step,e2e to skip")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    logging.basicConfig(level=logging.WARNING)
    device = _device(args.device)
    _defaults(args, device)
    if args.n_images is None:
        args.n_images = 2048 if args.full else 512
    parts = [b for b in ("loader", "step", "e2e") if b not in skip]
    total = args.budget
    args.budget = total / max(1, len(parts))  # each part's windows get an equal share
    print_plan(f"{', '.join(b for b in ('loader', 'kernels', 'step', 'e2e') if b not in skip)} in turn on "
               f"{device}; data {args.data or f'{args.n_images} synthetic images at 256 px'}; "
               + (f"budget {total:g} s ({args.budget:.3g} s each for {', '.join(parts)})" if total else "no budget")
               + "; each part prints its own plan")
    with tempfile.TemporaryDirectory(prefix="fasttrain-bench-") as tmp:
        data = Path(args.data) if args.data else make_synthetic_packed(Path(tmp), args.n_images, 256)
        if "loader" not in skip:
            loader_main(["--data", str(data), "--batch-size", str(args.batch_size), "--img-size",
                         str(args.img_size), "--batches", str(args.loader_batches), "--windows", str(args.windows),
                         "--budget", str(args.budget)] + (["--json"] if args.json else []))
        if "kernels" not in skip:
            kernels_main((["--full"] if args.full else []) + (["--json"] if args.json else []))
        if "step" not in skip:
            args.skip_mae = False
            print_records(run_step_bench(args), args.json, COLUMNS)
        if "e2e" not in skip:
            args.data, args.split, args.loader = data, "train", "auto"
            print_records(run_e2e_bench(args), args.json, COLUMNS + ["ratio_vs_step_only"])
    return 0
