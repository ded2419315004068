"""The `fasttrain` command: convert | pretrain | finetune | evaluate | predict | export | probe | ablate | plot | bench |
demo | reproduce.

Each sub-command lives with the stage it drives and parses its own arguments and raises; this file
dispatches, importing the stage lazily so `fasttrain convert` never imports the trainer, and turns
the exceptions a user can act on into one line on stderr and an exit code (EXIT_CODES). Any other
exception keeps its traceback.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import NamedTuple

from fasttrain import __version__

COMMANDS = {
    "convert": ("fasttrain.converters.cli", "main", "pack a dataset (nih, chexpert, mimic-jpg, dicom, images, synthetic) into raw/ffcv/dali"),
    "pretrain": ("fasttrain.commands", "pretrain_main", "MAE pre-training, with distillation when a teacher is given"),
    "finetune": ("fasttrain.commands", "finetune_main", "fine-tune a pre-trained encoder for multi-label classification"),
    "evaluate": ("fasttrain.eval.evaluate", "main", "per-label AUC and mAUC with bootstrap CIs, calibration, subgroups"),
    "predict": ("fasttrain.serve.predict", "main", "probabilities per label for new image files (PNG/JPEG/DICOM) -> CSV"),
    "export": ("fasttrain.serve.export", "main", "a checkpoint as timm safetensors or ONNX (checked with ONNX Runtime)"),
    "probe": ("fasttrain.eval.probe", "main", "linear probe of a frozen encoder on cached features (mAUC + CIs)"),
    "ablate": ("fasttrain.workflows.ablate", "main", "grid x seeds through chosen stages; mean/std and paired CIs"),
    "plot": ("fasttrain.eval.plots", "main", "loss curves and AUC figures of one or more runs"),
    "bench": ("fasttrain.bench", "main", "throughput benchmarks against the reference path"),
    "demo": ("fasttrain.workflows.demo", "main", "the whole pipeline on synthetic phantoms (make demo)"),
    "reproduce": ("fasttrain.workflows.reproduce", "main", "the paper's four experiments end to end, ending in its Table 2"),
}


class ExitCode(NamedTuple):
    """How the CLI reports an exception of class `module.name`: `code` (None: the exception's own
    `exit_code`) and the stderr line, formatted with `cmd` and `msg`."""
    module: str
    name: str
    code: int | None
    line: str


ERROR = "fasttrain {cmd}: error: {msg}"
# First match wins. An entry is looked at only when its module is already imported (an exception of
# that class implies its module was), so this table never imports torch or the trainer.
EXIT_CODES: tuple[ExitCode, ...] = (
    # a pre-empted run wrote last.pt; its exit code (run.preempt_exit_code, 75 by default) tells
    # the job script to requeue
    ExitCode("fasttrain.train.loop", "Preempted", None, "fasttrain {cmd}: {msg}"),
    # a workflow stage (a `fasttrain` command of its own) failed and already reported why
    ExitCode("fasttrain.workflows.stages", "StageFailed", 1, "fasttrain {cmd}: {msg}"),
    ExitCode("fasttrain.config", "ConfigError", 2, ERROR),
    ExitCode("fasttrain.models.checkpoints", "CheckpointError", 2, ERROR),
    ExitCode("fasttrain.train.checkpoint", "CheckpointWriteError", 2, ERROR),
    ExitCode("fasttrain.train.loop", "TrainingDiverged", 2, ERROR),
    ExitCode("fasttrain.train.engine", "CompileError", 2, ERROR),
    ExitCode("fasttrain.format.packed", "PackedError", 2, ERROR),
    ExitCode("fasttrain.train.loop", "OutOfMemory", 2, ERROR),  # the trainer's OOM, with how to fit
    ExitCode("torch", "OutOfMemoryError", 2, ERROR),
    ExitCode("builtins", "FileNotFoundError", 2, ERROR),
    # the input errors of every stage derive from it (ConvertError, LoaderError, PredictError, ...)
    ExitCode("builtins", "ValueError", 2, ERROR),
)


def exit_code_for(exc: BaseException) -> ExitCode | None:
    """The first EXIT_CODES entry whose class `exc` is an instance of; None for any other exception."""
    for entry in EXIT_CODES:
        module = sys.modules.get(entry.module)
        cls = getattr(module, entry.name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            return entry
    return None


def run_command(cmd: str, fn, argv: list[str]) -> int:
    """`fn(argv)` -> its exit code; an exception in EXIT_CODES -> its line on stderr and its code."""
    try:
        return int(fn(argv) or 0)
    except Exception as e:
        entry = exit_code_for(e)
        if entry is None:
            raise
        print(entry.line.format(cmd=cmd, msg=e), file=sys.stderr)
        return e.exit_code if entry.code is None else entry.code
    finally:  # after the handlers: the exception (and the trainer its traceback holds) is gone
        dist = sys.modules.get("fasttrain.train.dist")  # not imported: no process group to release
        if dist is not None:
            dist.release_process_groups()


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
    return run_command(cmd, fn, rest)


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
