"""`fasttrain reproduce`: the ETMAE paper's four experiments end to end, ending in its Table 2.

    fasttrain reproduce --nih NIH_DIR --chexpert CHEXPERT_DIR --teacher-s vit-s_CXR_0.3M_mae.pth \
        --teacher-b vit-b_CXR_0.5M_mae.pth --out DIR [--experiments 1,2] [--gpus N] [--dry-run] [--with-teachers]

Experiments (paper Table 2): 1 = ViT-T distilled from ViT-S, fine-tuned on NIH; 2 = the same
student on CheXpert; 3 / 4 = ViT-T distilled from ViT-B on NIH / CheXpert. The stages, each a normal
`fasttrain` command (in this process, or under torchrun when --gpus > 1) with dotted overrides:

  convert_nih, convert_chexpert     each source packed once into DIR/packed/ (reused when packed)
  pretrain_s, pretrain_b            configs/paper/pretrain_vit{s,b}_to_vitt.yaml on NIH + CheXpert train
  finetune_{s,b}_{nih,chexpert}     configs/paper/finetune_{nih,chexpert}.yaml from the student
  evaluate_*                        NIH's official test list / CheXpert's valid.csv, bootstrap CIs
  transfer_*                        each fine-tune scored on the other dataset's test split, on the
                                    labels both name (fasttrain.labelmap): NIH -> CheXpert and back
  (+ finetune_teacher_{s,b}_* and their evaluations with --with-teachers)

Every stage is resumable: a finished stage leaves DIR/stages/NAME.json and is skipped; an
interrupted training stage resumes from its RUN/checkpoints/last.pt (`--resume auto` semantics);
an interrupted conversion restarts clean (the converter writes atomically). So the same command
is simply re-run after any failure or pre-emption. Before any work: every input is checked
(teacher checkpoints loaded strictly, dataset releases, free disk), and a plan lists each stage
with its images, steps and a wall time estimated from a short measured step on this machine.
At the end: DIR/table2.md + table2.json beside the paper's numbers, per-label AUC tables, figures.

This module runs the stages; the plan and its checks are in reproduce_plan, the wall-time
estimates in reproduce_estimate, Table 2 and the figures in reproduce_report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fasttrain.converters.decode import RESIZE_MODES
from fasttrain.io import write_atomic
from fasttrain.workflows.reproduce_estimate import estimate
from fasttrain.workflows.reproduce_plan import (EXPERIMENTS, PACK_SIZE, Plan, Stage, check_disk, check_teachers,
                                                format_plan, inspect_chexpert, inspect_nih, stage_gpus,
                                                torchrun_prefix)
from fasttrain.workflows.reproduce_report import write_table
from fasttrain.workflows.stages import run_fasttrain

RERUN = "fasttrain reproduce"  # the command a failed stage's message says to re-run


def run_stage(plan: Plan, st: Stage) -> dict:
    """Run one stage as a `fasttrain` command through the plan's stage runner (skipped when it
    finished earlier); a training stage resumes from its last.pt. Raises StageFailed."""
    argv = list(st.argv)
    if st.trains:
        # an interrupted stage continues from its newest checkpoint that verifies (a corrupt
        # last.pt falls back to a kept step checkpoint); a new one starts fresh
        argv += ["--resume", "auto"]
    if st.kind == "evaluate":
        best = st.run_dir / "checkpoints" / "best.pt"
        if not best.is_file():  # no val split: the last checkpoint (never chosen on the test set)
            argv[argv.index("--ckpt") + 1] = str(st.run_dir / "checkpoints" / "last.pt")

    def work() -> dict:
        prefix = torchrun_prefix(plan.gpus) if st.distributed and st.trains else ()
        run_fasttrain(st.name, argv, RERUN, prefix)
        return {"kind": st.kind, "argv": argv, "gpus": stage_gpus(plan, st), **stage_facts(plan, st, argv)}
    return plan.runner.run(st.name, work, run_dir=st.run_dir if st.trains else None,
                           what=f"fasttrain {' '.join(argv)}")


def stage_facts(plan: Plan, st: Stage, argv: list[str]) -> dict:
    """What a finished stage left behind: images/s, and the steps (training) or mAUC (evaluation)."""
    if st.trains:
        summary = json.loads((st.run_dir / "summary.json").read_text())
        return {"images_per_s": summary.get("images_per_s"), "steps": summary.get("steps"),
                "best_val_mauc": summary.get("best_val_mauc")}
    if st.kind == "evaluate":
        res = json.loads((Path(argv[argv.index("--out") + 1]) / "results_test.json").read_text())
        return {"images_per_s": res.get("images_per_s"), "mauc": res.get("mauc"), "checkpoint": res.get("checkpoint")}
    m = json.loads((plan.packed[st.name.split("_", 1)[1]] / "manifest.json").read_text())
    return {"images_per_s": m["conversion"].get("images_per_s")}


# ----------------------------------------------------------------------------- main

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasttrain reproduce", description=(
        "The ETMAE paper's experiments end to end (convert, pre-train, fine-tune, evaluate) ending in "
        "DIR/table2.md. Re-run the same command after any interruption: finished stages are skipped, "
        "an interrupted one resumes. Dotted overrides may follow, for every training stage "
        "(--model.img_size=64) or for the stages matching a glob (--finetune_*:optim.epochs=10)."))
    p.add_argument("--nih", required=True, help="NIH ChestX-ray14 folder (Data_Entry_2017*.csv, images*/) or a packed one")
    p.add_argument("--chexpert", required=True, help="CheXpert-v1.0-small folder (train.csv, valid.csv) or a packed one")
    p.add_argument("--teacher-s", help="Xiao et al.'s vit-s_CXR_0.3M_mae.pth (experiments 1, 2)")
    p.add_argument("--teacher-b", help="Xiao et al.'s vit-b_CXR_0.5M_mae.pth (experiments 3, 4)")
    p.add_argument("--out", required=True, help="reproduction folder: packed/, runs/, stages/, table2.md")
    p.add_argument("--experiments", default="1,2,3,4",
                   help="1 = S->T NIH, 2 = S->T CheXpert, 3 = B->T NIH, 4 = B->T CheXpert (default all)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per training stage (torchrun when > 1)")
    p.add_argument("--with-teachers", action="store_true",
                   help="also fine-tune and evaluate each teacher (the paper's comparison rows)")
    p.add_argument("--dry-run", action="store_true", help="check the inputs, print the plan, do nothing else")
    p.add_argument("--nih-split-dir", help="Xiao et al.'s train/val/test_official.txt (default: a 13%% val carve)")
    p.add_argument("--formats", nargs="+", default=["raw"], help="packed formats (default raw: the fastest loader)")
    p.add_argument("--pack-size", type=int, default=PACK_SIZE, help="packed image size (default 256 as the paper; tests shrink it)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                   help="fitting each frame to the square when packing (convert --resize): crop (default) keeps "
                        "CheXpert's portrait frames undistorted, as Xiao et al.'s Resize + CenterCrop; NIH's are square")
    p.add_argument("--bench-steps", type=int, default=2,
                   help="measured steps per training stage for the plan's estimates (0: FLOPs at an assumed MFU)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str]):
    p = parser()
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--") or "=" not in a]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (overrides look like --section.key=value)")
    args.overrides = rest
    try:
        args.experiments = sorted({int(x) for x in args.experiments.split(",") if x.strip()})
    except ValueError:
        p.error(f"--experiments {args.experiments!r}: a comma-separated list of 1-4")
    if not args.experiments or any(e not in EXPERIMENTS for e in args.experiments):
        p.error(f"--experiments {args.experiments}: choose from 1,2,3,4")
    args.experiments_text = ",".join(map(str, args.experiments))
    if args.gpus < 1:
        p.error("--gpus must be >= 1")
    return args


def reproduce(args) -> int:
    out = Path(args.out)
    sources = {"nih": inspect_nih(Path(args.nih), Path(args.nih_split_dir) if args.nih_split_dir else None),
               "chexpert": inspect_chexpert(Path(args.chexpert))}
    for s in sources.values():
        s.pack_size = args.pack_size
    plan = Plan(args, sources)
    models = check_teachers(plan)
    check_disk(list(sources.values()), out)
    info = estimate(plan, models, args.bench_steps)
    del models  # the teachers' memory, before the stages build their own
    text = format_plan(plan, info)
    print(text, flush=True)
    if args.dry_run:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "plan.txt", text + "\n")
    for st in plan.stages:
        run_stage(plan, st)
    doc = write_table(plan)
    print(f"\n{(out / 'table2.md').read_text()}")
    print(f"table: {out / 'table2.md'} (+ table2.json); figures: {', '.join(doc['figures'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Bad input raises ReproduceError / ConfigError (exit 2), a failed stage StageFailed (exit 1):
    the `fasttrain` command's exception table turns them into the exit code."""
    return reproduce(parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    from fasttrain import cli  # the exception table; cli imports this module lazily
    sys.exit(cli.main(["reproduce", *sys.argv[1:]]))
