"""The run directory: resolved config, provenance, metrics.jsonl, TensorBoard, progress bar.

RUN/
  config.yaml        the resolved Config (defaults <- YAML <- overrides)
  provenance.json    git SHA, library versions, device, cores
  metrics.jsonl      one JSON object per logged step / validation / epoch
  tb/                TensorBoard events
  checkpoints/       last.pt (atomic, every run.ckpt_every steps and at the end), best.pt
Only rank 0 writes; other ranks get a RunLog that does nothing.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from fasttrain.io import write_atomic, write_atomic_with, write_json_atomic
from fasttrain.provenance import provenance

log = logging.getLogger("fasttrain.train")


def setup_logging(is_main: bool = True) -> None:
    if not logging.getLogger("fasttrain").handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logging.getLogger("fasttrain").addHandler(h)
    logging.getLogger("fasttrain").setLevel(logging.INFO if is_main else logging.WARNING)


class RunLog:
    def __init__(self, out: str | Path | None, *, enabled: bool, cfg=None, device: str | None = None,
                 tensorboard: bool = True, resume: bool = False, data: list | None = None):
        self.enabled = enabled and out is not None
        self.dir = Path(out) if out is not None else None
        self.ckpt_dir = self.dir / "checkpoints" if self.dir is not None else None
        self._tb = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        if cfg is not None:
            cfg.save(self.dir / "config.yaml")
        write_json_atomic(self.dir / "provenance.json", provenance(device, data=data))
        self._metrics = open(self.dir / "metrics.jsonl", "a" if resume else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # heavy: only when run.tensorboard
                self._tb = SummaryWriter(str(self.dir / "tb"))
            except ImportError as e:  # tensorboard is a dependency, but never fail a run over logs
                log.warning("TensorBoard disabled: %s", e)

    def metrics(self, record: dict) -> None:
        """Append one record to metrics.jsonl and mirror its numbers to TensorBoard."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None and "step" in record:
            tag = record.get("phase", "train")
            for k, v in record.items():
                if k in ("step", "time", "phase", "epoch") or not isinstance(v, (int, float)):
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    continue
                self._tb.add_scalar(f"{tag}/{k}", v, record["step"])

    def truncate_after(self, step: int) -> None:
        """On resume: drop the records a killed run wrote after its last checkpoint (they will be
        written again), so metrics.jsonl reads as one uninterrupted run."""
        if not self.enabled:
            return
        self._metrics.close()
        path = self.dir / "metrics.jsonl"
        keep = [r for r in read_metrics(self.dir) if r.get("step", 0) <= step and not
                (r.get("step") == step and r.get("phase") == "val")]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
        self._metrics = open(path, "a")

    def write_json(self, name: str, obj) -> Path | None:
        if not self.enabled:
            return None
        path = self.dir / name
        write_json_atomic(path, obj)
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl (is this a fasttrain run directory?)")
    out = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                continue  # a run killed mid-write leaves a partial last line
            raise ValueError(f"{path}:{i}: not valid JSON") from None
    return out


def save_figure(fig, path) -> Path:
    """A matplotlib figure written atomically (PNG unless the suffix names another format: a
    killed run leaves no half image) and closed."""
    import matplotlib.pyplot as plt  # optional, heavy: only to close the figure
    path = Path(path)
    try:
        write_atomic_with(path, lambda f: fig.savefig(f, dpi=110, format=path.suffix[1:] or "png"))
    finally:
        plt.close(fig)
    return path
