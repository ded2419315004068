"""`fasttrain pretrain | finetune`: argument parsing, the resolved config, the closing JSON line.

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


def _train_command(prog: str, argv: list[str], keys: tuple[str, ...]) -> int:
    """Parse, build the config (flags over YAML over defaults), run the stage, print its summary.
    The trainer (torch, timm: seconds) is imported after the flags parsed, so --help and a wrong flag
    answer at once."""
    init = prog == "finetune"
    args, over = _split_overrides(_train_parser(prog, init=init), argv)
    if init:
        from fasttrain.train.finetune import run_finetune as run
    else:
        from fasttrain.train.pretrain import run_pretrain as run
    cfg = build_config(args.config, over)
    cfg.run.out = args.out
    if init and args.init:
        cfg.model.init = args.init
    if not init and args.teacher:
        cfg.distill.teacher_ckpt = args.teacher
    summary = run(cfg, resume=args.resume)
    _print_main({k: summary[k] for k in keys})
    return 0


def pretrain_main(argv: list[str]) -> int:
    return _train_command("pretrain", argv, ("steps", "images_per_s", "last", "final"))


def finetune_main(argv: list[str]) -> int:
    return _train_command("finetune", argv, ("steps", "images_per_s", "last", "best", "best_val_mauc"))
