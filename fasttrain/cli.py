"""The `fasttrain` command: convert | pretrain | finetune | evaluate | predict | export | probe | ablate | plot | bench |
demo | reproduce.

Each sub-command lives with the stage it drives and parses its own arguments; this file only
dispatches, importing the stage lazily so `fasttrain convert` never imports the trainer.
"""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "convert": ("fasttrain.converters.cli", "main", "pack a dataset (nih, chexpert, mimic-jpg, dicom, images, synthetic) into raw/ffcv/dali"),
    "pretrain": ("fasttrain.commands", "pretrain_main", "MAE pre-training, with distillation when a teacher is given"),
    "finetune": ("fasttrain.commands", "finetune_main", "fine-tune a pre-trained encoder for multi-label classification"),
    "evaluate": ("fasttrain.commands", "evaluate_main", "per-label AUC and mAUC with bootstrap CIs, calibration, subgroups"),
    "predict": ("fasttrain.serve.predict", "main", "probabilities per label for new image files (PNG/JPEG/DICOM) -> CSV"),
    "export": ("fasttrain.serve.export", "main", "a checkpoint as timm safetensors or ONNX (checked with ONNX Runtime)"),
    "probe": ("fasttrain.eval.probe", "main", "linear probe of a frozen encoder on cached features (mAUC + CIs)"),
    "ablate": ("fasttrain.workflows.ablate", "main", "grid x seeds through chosen stages; mean/std and paired CIs"),
    "plot": ("fasttrain.commands", "plot_main", "loss curves and AUC figures of one or more runs"),
    "bench": ("fasttrain.bench", "main", "throughput benchmarks against the reference path"),
    "demo": ("fasttrain.workflows.demo", "main", "the whole pipeline on synthetic phantoms (make demo)"),
    "reproduce": ("fasttrain.workflows.reproduce", "main", "the paper's four experiments end to end, ending in its Table 2"),
}


def usage() -> str:
    lines = ["usage: fasttrain <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-V", "--version"):
        from fasttrain import __version__
        print(__version__)
        return 0
    if cmd not in COMMANDS:
        print(f"fasttrain: unknown command '{cmd}'\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        print(f"fasttrain {cmd}: not available in this build ({e})", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


if __name__ == "__main__":
    rc = main()
    if rc not in (0, 1, 2) and os.environ.get("TORCHELASTIC_RUN_ID"):
        # a pre-empted rank under torchrun (run.preempt_exit_code): its checkpoint and logs are
        # closed and its process groups destroyed, yet a pre-empted rank's interpreter teardown
        # still aborted now and then ("terminate called without an active exception": exit -6,
        # not the code the job script requeues on). Leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
