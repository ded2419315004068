"""`fasttrain pretrain | finetune | evaluate | plot`: argument parsing and clean error reporting.

Dotted overrides follow the named flags: `fasttrain pretrain --config C --out RUN --optim.blr=1e-4`.
Errors are raised; `fasttrain.cli` turns the known ones (config, checkpoint, dataset, divergence, a
failed checkpoint write, a pre-emption) into one line and an exit code (cli.EXIT_CODES).
"""
from __future__ import annotations

import argparse
import json
import os

from fasttrain.config import build_config, parse_overrides


def _print_main(obj: dict) -> None:
    """The closing JSON line, once per job (rank 0 under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(obj, default=str))


def _split_overrides(parser: argparse.ArgumentParser, argv: list[str]):
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --section.key=value)")
    # '--optim.lr 1e-4' (space-separated) is not supported: say so instead of misreading it
    for a in rest:
        if "=" not in a:
            parser.error(f"override '{a}' needs '=': write {a}=VALUE")
    return args, parse_overrides(rest)


def _train_parser(prog: str, init: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fasttrain {prog}", description=(
        "Dotted config overrides may follow, e.g. --optim.blr=1e-4 --data.batch_size=64."))
    p.add_argument("--config", required=True, help="YAML file in configs/ (overrides the defaults)")
    p.add_argument("--out", required=True, help="run directory (config, provenance, metrics, checkpoints)")
    p.add_argument("--resume", nargs="?", const=True, default=None, choices=[True, "auto"],
                   help="continue from OUT/checkpoints/last.pt; '--resume auto': resume if it exists, else "
                        "start fresh (one command line for the first launch and every requeue/restart)")
    if init:
        p.add_argument("--init", help="pre-trained student checkpoint (ours, or an exported .safetensors)")
    else:
        p.add_argument("--teacher", help="teacher checkpoint: enables distillation (sets distill.teacher_ckpt)")
    return p


def pretrain_main(argv: list[str]) -> int:
    args, over = _split_overrides(_train_parser("pretrain", init=False), argv)

    from fasttrain.train.pretrain import run_pretrain
    cfg = build_config(args.config, over)
    cfg.run.out = args.out
    if args.teacher:
        cfg.distill.teacher_ckpt = args.teacher
    summary = run_pretrain(cfg, resume=args.resume)
    _print_main({k: summary[k] for k in ("steps", "images_per_s", "last", "final")})
    return 0


def finetune_main(argv: list[str]) -> int:
    args, over = _split_overrides(_train_parser("finetune", init=True), argv)

    from fasttrain.train.finetune import run_finetune
    cfg = build_config(args.config, over)
    cfg.run.out = args.out
    if args.init:
        cfg.model.init = args.init
    summary = run_finetune(cfg, resume=args.resume)
    _print_main({k: summary[k] for k in ("steps", "images_per_s", "last", "best", "best_val_mauc")})
    return 0


def evaluate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fasttrain evaluate", description=(
        "Per-label AUC and mAUC with 95% bootstrap CIs (seeded resampling of the test images), calibration "
        "(ECE, Brier, reliability diagram), subgroups (--by) and other datasets' shared labels."))
    p.add_argument("--ckpt", required=True, help="fine-tuned checkpoint (RUN/checkpoints/best.pt)")
    p.add_argument("--data", required=True, help="packed dataset folder")
    p.add_argument("--split", default="test", help="split to evaluate (NIH: official test list; CheXpert: valid.csv)")
    p.add_argument("--out", help="folder for results_<split>.json, roc_<split>.png, reliability_<split>.png and "
                                 "scores_<split>.npy (default RUN/eval)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--by", default=None, metavar="COL[,COL...]",
                   help="subgroup table over these metadata columns (sex, age, view, ...): per-group AUC and mAUC "
                        "with CIs, worst group, gap, underdiagnosis rate")
    p.add_argument("--age-bins", default="0,40,60,80", help="edges of the age groups for --by age (years)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit one temperature per label on --val-split, store it beside the checkpoint "
                        "(CKPT.temperature.json) and report the ECE after it")
    p.add_argument("--val-split", default="val",
                   help="split that picks the underdiagnosis thresholds and fits --calibrate (default val)")
    p.add_argument("--label-map", default=None, metavar="NAME=CANONICAL[,...]",
                   help="extra spellings for the canonical label vocabulary when the data's labels differ from the "
                        "model's (README: Label vocabulary)")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    args = p.parse_args(argv)

    from fasttrain.labelmap import parse_label_map
    from fasttrain.train.finetune import evaluate_checkpoint
    from fasttrain.eval.evaluate import format_table
    from fasttrain.eval.calibration import format_calibration
    from fasttrain.eval.subgroups import format_subgroups
    by = [c.strip() for c in args.by.split(",") if c.strip()] if args.by else None
    res = evaluate_checkpoint(args.ckpt, args.data, args.split, args.out, n_boot=args.bootstrap, seed=args.seed,
                              batch_size=args.batch_size, device=args.device, by=by, age_bins=args.age_bins,
                              calibrate=args.calibrate, val_split=args.val_split,
                              label_map=parse_label_map(args.label_map))
    if args.json:
        print(json.dumps(res, default=str))
    else:
        tag = "SYNTHETIC phantoms: " if res["synthetic"] else ""
        print(format_table(res, f"{tag}{res['dataset']} {args.split}, {res['n_images']} images, "
                                f"95% CI from {args.bootstrap} bootstrap resamples"))
        lm = res["label_map"]
        if not lm["identical"]:
            print(f"label map: scored {len(lm['shared'])} shared labels "
                  + ", ".join(f"{k} (model {v['model']!r} = data {v['data']!r})" for k, v in lm["shared"].items())
                  + f"; cannot score the model's {lm['not_scored_model_labels']} (not in the data) "
                    f"nor the data's {lm['not_scored_data_labels']} (no model output)")
        print("\n" + format_calibration(res["calibration"]))
        if "subgroups" in res:
            src = res["subgroups"]["thresholds_from"]
            print(f"\nsubgroups (underdiagnosis: a positive study with every label below its "
                  + (f"Youden threshold on '{src}')" if src else "threshold: no validation split, not computed)"))
            print(format_subgroups(res["subgroups"]))
        print(f"results: {res['paths']['results']}\nROC curves: {res['paths']['roc']}\n"
              f"reliability diagram: {res['paths']['reliability']}")
    return 0


def plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fasttrain plot", description="Loss curves and per-label AUC bars as PNGs.")
    p.add_argument("runs", nargs="+", help="run directories (several are overlaid)")
    p.add_argument("--out", help="output folder (default FIRST_RUN/plots)")
    args = p.parse_args(argv)

    from fasttrain.eval.plots import plot_runs
    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0
