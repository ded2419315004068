"""The training loop shared by pre-training and fine-tuning.

Epochs of micro-batches from a loader through a TrainStep; every `log_every` optimiser steps
the loss terms are read back (the only host sync), checked for NaN/Inf, averaged across ranks,
logged (metrics.jsonl, TensorBoard, tqdm); every `ckpt_every` steps and at the end the state is
written atomically to checkpoints/last.pt. Resume restores model, optimiser, step counters,
grad scaler, every RNG and the loader position (epoch, batch within the epoch), so a run killed
at any point and resumed ends where the uninterrupted run ends (bit-identical on CPU with
run.deterministic=true).

Resume onto another world size (a requeue onto a node with another GPU count): the checkpoint
records its layout (world size, per-rank batch, accum_steps, global batch, samples of the epoch
consumed). Every optimiser step reads the next `global batch` positions of the epoch's global
order (rank r takes positions r, r + W, ... of it), so a resume that keeps the global batch
continues the epoch, the lr schedule and the step count exactly in samples: `resume_layout`
changes accum_steps (or, with run.resume_rebatch, the per-rank batch) to keep it, and refuses,
before any work, when no layout on the new world size gives it. The per-rank RNG states of the
old ranks do not map onto the new ones, so they are re-derived from (seed, step, rank).

Clusters (README "Clusters"): `run.resume: auto` resumes when last.pt exists and starts fresh
otherwise, so one command line serves the first launch, every requeue and every torchrun restart.
A pre-emption signal (run.preempt_signals) only sets a flag; at the next optimiser-step boundary
the ranks agree on it (one tiny all-reduce, so no rank is left waiting in a collective), write
last.pt atomically, log "pre-empted at step N" and raise Preempted, which the CLI turns into
run.preempt_exit_code. A second signal during that save changes nothing (the flag is already set,
and the write is temp file + fsync + rename). Every checkpoint carries a checksum of its tensors;
a corrupt last.pt is named, and the newest kept step checkpoint that verifies is offered (or used,
with a warning, under resume=auto).
"""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from fasttrain import kernels
from fasttrain.config import ConfigError
from fasttrain.data.sampler import mix_seed
from fasttrain.train import checkpoint as ckpt_io
from fasttrain.train.dist import (DistInfo, all_reduce_mean, any_rank, broadcast_object, init_distributed,
                                  wrap_ddp)
from fasttrain.train.engine import make_step, unwrap
from fasttrain.train.optim import Schedule, absolute_lr, build_optimizer
from fasttrain.train.runlog import RunLog, setup_logging

log = logging.getLogger("fasttrain.train")

LOSS_NAMES = {"pretrain": ("loss", "loss_mae", "loss_dist"), "finetune": ("loss",)}


class TrainingDiverged(RuntimeError):
    """A NaN/Inf loss: names the step and the last good checkpoint."""


class OutOfMemory(RuntimeError):
    """The step ran out of device (or host) memory: names the step, the per-device batch and how
    to fit (the CLI prints it as one line and exits 2)."""


class Preempted(Exception):
    """A pre-emption signal stopped the run at a step boundary after last.pt was written; the CLI
    exits with `exit_code` (run.preempt_exit_code) so a job script can tell it apart and requeue."""

    def __init__(self, step: int, signame: str, path: str, exit_code: int):
        super().__init__(f"pre-empted at step {step} by {signame}: {path} written; "
                         f"resume with --resume auto (exit code {exit_code})")
        self.step, self.signame, self.path, self.exit_code = step, signame, path, exit_code


def resume_mode(cfg, resume=None):
    """--resume / run.resume -> False | True | "auto" (the CLI flag wins over the config)."""
    mode = cfg.run.resume if resume in (None, False) else resume
    if isinstance(mode, str):
        mode = {"auto": "auto", "true": True, "false": False, "never": False}.get(mode.lower(), mode)
    if mode not in (False, True, "auto"):
        raise ConfigError(f"config key 'run.resume': expected true, false or auto, got {mode!r}")
    return mode


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """['SIGTERM', 'USR1', '10'] -> signal numbers; the error names the unknown one."""
    out = []
    for n in names:
        key = str(n).upper()
        try:
            sig = signal.Signals(int(key)) if key.isdigit() else signal.Signals[key if key.startswith("SIG") else "SIG" + key]
        except (KeyError, ValueError):
            raise ConfigError(f"config key 'run.preempt_signals': unknown signal {n!r} (e.g. SIGTERM, SIGUSR1)") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"config key 'run.preempt_signals': {sig.name} cannot be caught")
        out.append(sig)
    return out


def require_run_and_data(cfg) -> None:
    """Both trainers need a run directory and a packed dataset: say which is missing, before any work."""
    if cfg.run.out is None:
        raise ConfigError("no run directory: pass --out RUN")
    if cfg.data.path is None:
        raise ConfigError("no dataset: set data.path (a packed dataset folder) in the config or --data.path=DIR")


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed)  # the same model init on every rank; seed_rank splits the ranks after it


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank python, numpy and torch (CPU and CUDA) streams, once the model is built and DDP has
    broadcast rank 0's weights: drop path and every other random op in the model then draw
    differently on each rank instead of repeating one mask across the global batch."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


class ResumeLayoutError(ValueError):
    """A checkpoint whose global batch no layout on this world size reproduces."""


@dataclass
class Layout:
    """How a global batch is split: world_size ranks x batch_size images x accum_steps micro-batches."""
    world_size: int
    batch_size: int
    accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accum_steps

    def __str__(self) -> str:
        return (f"{self.world_size} rank(s) x {self.batch_size} images x accum {self.accum_steps} "
                f"= global batch {self.global_batch}")


def saved_layout(ck: dict) -> Layout:
    """The layout a checkpoint was written with (from its resolved config and its per-rank RNG
    list where it has no "layout" record)."""
    rec = ck.get("layout")
    if rec is not None:
        return Layout(int(rec["world_size"]), int(rec["batch_size"]), int(rec["accum_steps"]))
    c = ck.get("config", {})
    return Layout(len(ck.get("rng") or [None]), int(c.get("data", {}).get("batch_size", 0)),
                  int(c.get("optim", {}).get("accum_steps", 1)))


def resume_layout(old: Layout, world_size: int, batch_size: int, accum_steps: int, *, rebatch: bool,
                  path: str | Path = "checkpoint") -> Layout:
    """The layout on `world_size` ranks that keeps `old`'s global batch: the configured one when it
    already does, else the configured per-rank batch with another accum_steps, else (`rebatch`) the
    largest per-rank batch <= the configured one that divides global / world. Raises
    ResumeLayoutError (naming both world sizes and the ways out) when none does."""
    g = old.global_batch
    if world_size * batch_size * accum_steps == g:
        return Layout(world_size, batch_size, accum_steps)
    if g % (world_size * batch_size) == 0:
        return Layout(world_size, batch_size, g // (world_size * batch_size))
    if rebatch and g % world_size == 0:
        per_rank = g // world_size
        b = max(d for d in range(1, min(batch_size, per_rank) + 1) if per_rank % d == 0)
        return Layout(world_size, b, per_rank // b)
    fits = [w for w in range(1, g + 1) if g % (w * batch_size) == 0]
    ways = [f"run on {' or '.join(map(str, fits))} rank(s)" if fits else None,
            f"set --data.batch_size to a divisor of {g // world_size}" if g % world_size == 0 else None,
            "pass --run.resume_rebatch=true to let fasttrain pick that per-rank batch" if g % world_size == 0
            and not rebatch else None,
            "or start a new run (another --out, or --resume false)"]
    raise ResumeLayoutError(
        f"{path} was written by {old}; on {world_size} rank(s) with data.batch_size={batch_size} no "
        f"accum_steps gives a global batch of {g}, so the run cannot continue exactly (same samples, "
        f"steps and lr). Ways out: " + "; ".join(w for w in ways if w))


def fit_checkpoint_layout(cfg, info: DistInfo, ck: dict, path: str | Path, *,
                          loader_batch: Optional[int] = None) -> Layout:
    """Set cfg.optim.accum_steps (and cfg.data.batch_size under run.resume_rebatch) so that this
    world size continues `ck`'s global batch; logs what changed. `loader_batch`: the per-rank
    batch of a loader already built, which can no longer change."""
    old = saved_layout(ck)
    new = resume_layout(old, info.world_size, cfg.data.batch_size, cfg.optim.accum_steps,
                        rebatch=cfg.run.resume_rebatch and loader_batch is None, path=path)
    if loader_batch is not None and new.batch_size != loader_batch:
        raise ResumeLayoutError(f"{path}: the loader was built with {loader_batch} images per rank, "
                                f"resuming needs {new.batch_size}")
    if (new.batch_size, new.accum_steps) != (cfg.data.batch_size, cfg.optim.accum_steps):
        log.warning("resume: %s was written by %s; continuing on %s (data.batch_size %d -> %d, "
                    "optim.accum_steps %d -> %d) so samples, steps and lr continue exactly",
                    path, old, new, cfg.data.batch_size, new.batch_size, cfg.optim.accum_steps, new.accum_steps)
        cfg.data.batch_size, cfg.optim.accum_steps = new.batch_size, new.accum_steps
    return new


@dataclass
class ResumePoint:
    """The checkpoint a run continues from (path and loaded dict), or none: a decision taken once,
    before the loaders are built (a resume may change the per-rank batch)."""
    path: Optional[Path] = None
    ck: Optional[dict] = None


def pick_resume(cfg, resume=None) -> ResumePoint:
    """Which checkpoint to resume from (ResumePoint() to start fresh), saying which and why."""
    mode = resume_mode(cfg, resume)
    if mode is False:
        return ResumePoint()
    last = Path(cfg.run.out) / "checkpoints" / "last.pt"
    flag = "--resume auto" if mode == "auto" else "--resume"
    path, ck, problems = ckpt_io.find_resumable(last)
    if path is None and not problems:
        if mode == "auto":
            log.info("%s: no %s yet; starting fresh", flag, last)
        else:
            log.warning("--resume: no %s yet; starting from scratch", last)
        return ResumePoint()
    if path is None:
        raise ckpt_io.CheckpointCorrupt(f"{flag}: no checkpoint in {last.parent} verifies: " + "; ".join(problems))
    if path != last:
        why = problems[0] if problems else f"{last}: missing"
        if mode != "auto":
            raise ckpt_io.CheckpointCorrupt(
                f"{why}. The previous kept checkpoint {path} (step {ck['step']['opt_step']}) verifies: "
                f"resume from it with --resume auto, or copy it over {last}")
        log.warning("--resume auto: %s; resuming from the previous kept checkpoint %s (step %d) instead",
                    why, path, ck["step"]["opt_step"])
    else:
        log.info("%s: resuming from %s", flag, path)
    return ResumePoint(path, ck)


def plan_resume(cfg, info: DistInfo, resume=None) -> ResumePoint:
    """pick_resume, then fit cfg's per-rank batch / accum_steps to the checkpoint's global batch:
    what the trainers call before building their loaders."""
    point = pick_resume(cfg, resume)
    if point.ck is not None:
        fit_checkpoint_layout(cfg, info, point.ck, point.path)
    return point


def setup(cfg) -> DistInfo:
    """Process group, logging, seeds, determinism, kernel backend: before any model is built."""
    info = init_distributed(cfg.run.device, timeout_s=cfg.run.dist_timeout_s)
    setup_logging(info.is_main)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    kernels.set_backend(cfg.engine.kernels)
    seed_everything(cfg.run.seed, info.rank)
    return info


def oom_message(exc: BaseException, batch: int, step: int) -> str:
    return (f"out of memory at step {step} with {batch} images per device ({type(exc).__name__}); "
            "lower --data.batch_size (keep the effective batch with --optim.accum_steps), keep "
            "--engine.amp=bf16, or use a smaller --model.img_size / model")


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "DefaultCPUAllocator" in msg)


class Trainer:
    def __init__(self, cfg, kind: str, model: nn.Module, loader, info: DistInfo, *, groups: list[dict],
                 resume=None, validate: Optional[Callable[[nn.Module], dict]] = None,
                 extra_state: Optional[dict] = None):
        """`resume`: a ResumePoint (plan_resume, before the loader was built) or a resume mode
        (None, False, True, "auto"), picked here."""
        self.cfg, self.kind, self.info = cfg, kind, info
        self.model, self.loader, self.validate = model, loader, validate
        self.extra_state = extra_state or {}
        point = resume if isinstance(resume, ResumePoint) else pick_resume(cfg, resume)
        if point.ck is not None:  # accum_steps (never the loader's batch) may still change here
            fit_checkpoint_layout(cfg, info, point.ck, point.path,
                                  loader_batch=getattr(loader, "batch_size", cfg.data.batch_size))
        o, d = cfg.optim, cfg.data
        self.accum = o.accum_steps
        self.batches_per_epoch = len(loader)
        self.steps_per_epoch = self.batches_per_epoch // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training split gives {self.batches_per_epoch} batches of {d.batch_size} per rank, "
                             f"fewer than optim.accum_steps={self.accum}: lower data.batch_size or accum_steps")
        self.total_steps = o.epochs * self.steps_per_epoch
        if cfg.run.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.run.max_steps)
        schedule_steps = o.epochs * self.steps_per_epoch  # the lr curve ignores max_steps (an early stop)
        self.eff_batch = d.batch_size * self.accum * info.world_size
        lr = absolute_lr(o, self.eff_batch)
        reference = cfg.engine.mode == "reference"
        self.optimizer = build_optimizer(groups, lr, o, reference=reference, device=info.device)
        self.schedule = Schedule(self.optimizer, base_lr=lr, min_lr=o.min_lr,
                                 warmup_steps=round(o.warmup_epochs * self.steps_per_epoch),
                                 total_steps=schedule_steps)
        self.ddp = None
        if cfg.engine.channels_last and cfg.engine.mode == "fused":
            # NHWC conv weights to match the NHWC input: their gradients then have the layout DDP's
            # buckets were built with (and oneDNN/cuDNN pick their NHWC kernels).
            model.to(memory_format=torch.channels_last)
        if info.enabled:
            self.ddp = wrap_ddp(model, info)  # the frozen teacher stays outside DDP
        self.step = make_step(cfg, model, self.optimizer, kind=kind, schedule=self.schedule, rank=info.rank,
                              ddp=self.ddp, device=info.device)
        seed_rank(cfg.run.seed, info.rank)  # after the init every rank shares (resume restores per rank)
        self.last_path = Path(cfg.run.out) / "checkpoints" / "last.pt"
        self.best_path = Path(cfg.run.out) / "checkpoints" / "best.pt"
        self.preempt_signals = parse_signals(cfg.run.preempt_signals)
        self._signal: Optional[int] = None  # set by the handler; read at step boundaries
        self._preempted = False
        resume_from = (point.path, point.ck) if point.ck is not None else None
        data_parts = loader.data_parts() if hasattr(loader, "data_parts") else None  # every dataset read
        self.run = RunLog(cfg.run.out, enabled=info.is_main, cfg=cfg, device=str(info.device),
                          tensorboard=cfg.run.tensorboard, resume=resume_from is not None, data=data_parts)
        self.epoch, self.epoch_step = 0, 0
        self.best: Optional[float] = None
        self.last_good: Optional[tuple[str, int]] = None
        self._buf: list[torch.Tensor] = []
        self._buf_start = 0  # micro_step of the first buffered entry
        self._t_window = time.perf_counter()
        self._images_window = 0
        self._t_start: Optional[float] = None
        self._images_timed = 0
        self.history: list[dict] = []
        self.bar = None
        self.bar_extra: dict = {}  # monitors' latest values shown on the progress line (kNN mAUC)
        log.info("%s: %d steps (%d epochs x %d steps, accum %d), effective batch %d (%d/device x %d x %d), "
                 "lr %.3g (blr %.3g), engine %s%s, device %s", kind, self.total_steps, o.epochs, self.steps_per_epoch,
                 self.accum, self.eff_batch, d.batch_size, self.accum, info.world_size, lr, o.blr,
                 cfg.engine.mode, " (compiled)" if self.step.compiled else "", info.device)
        if resume_from is not None:
            self._resume(*resume_from)

    # -- checkpoints -------------------------------------------------------------------------

    def state(self) -> dict:
        rngs = [ckpt_io.capture_rng()]
        if self.info.enabled:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, ckpt_io.capture_rng())
        return {"kind": self.kind, "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step.state_dict(),
                "epoch": self.epoch, "epoch_step": self.epoch_step, "rng": rngs, "best": self.best,
                "layout": {"world_size": self.info.world_size, "batch_size": self.cfg.data.batch_size,
                           "accum_steps": self.accum, "global_batch": self.eff_batch,
                           # global position: samples of `epoch`'s order consumed, of the whole run
                           "epoch_samples": self.epoch_step // self.accum * self.eff_batch,
                           "samples": self.step.opt_step * self.eff_batch},
                "config": self.cfg.to_dict(), **self.extra_state}

    def save(self, path: Path, metrics: Optional[dict] = None) -> None:
        """last.pt (with the kept step copies) or, given the val `metrics`, best.pt. Every rank
        calls it and every rank raises if the write failed (no rank left waiting in a barrier)."""
        state = self.state()  # every rank (RNG gather is collective)
        err = None
        if self.info.is_main:
            if metrics is not None:
                state["metrics"] = metrics
            keep = self.cfg.run.keep_checkpoints
            also = ckpt_io.step_path(path.parent, self.step.opt_step) if path == self.last_path and keep > 0 else None
            try:
                ckpt_io.save_atomic(state, path, also=also)
                if path == self.last_path:
                    self.last_good = (str(path), self.step.opt_step)
                    ckpt_io.prune_step_checkpoints(path.parent, keep)
            except ckpt_io.CheckpointWriteError as e:
                err = str(e)
        # the result goes to every rank (instead of a bare barrier): all of them stop on a failed write
        err = broadcast_object(err, self.info)
        if err is not None:
            raise ckpt_io.CheckpointWriteError(err)

    def _resume(self, path: Path, ck: dict) -> None:
        if ck.get("kind") != self.kind:
            raise ValueError(f"{path}: a {ck.get('kind')} checkpoint, cannot resume a {self.kind} run")
        unwrap(self.model).load_state_dict(ck["model"], strict=True)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.step.load_state_dict(ck["step"])
        self.epoch, self.epoch_step, self.best = ck["epoch"], ck["epoch_step"], ck.get("best")
        old = saved_layout(ck)
        if (old.batch_size, old.accum_steps) != (self.cfg.data.batch_size, self.accum):
            # positions in micro-batches of the new layout; the optimiser step and the samples of
            # the epoch consumed (epoch_step / accum x global batch) are unchanged
            if self.epoch_step % old.accum_steps:
                raise ResumeLayoutError(f"{path}: written mid-accumulation (batch {self.epoch_step} of the epoch, "
                                        f"accum {old.accum_steps}); resume it with its own layout ({old})")
            self.epoch_step = self.epoch_step // old.accum_steps * self.accum
            self.step.micro_step = self.step.opt_step * self.accum
        rngs = ck["rng"]
        if len(rngs) == self.info.world_size:
            ckpt_io.restore_rng(rngs[self.info.rank])
        else:
            # the old ranks' streams have no counterpart here: fresh per-rank ones, a function of
            # (seed, step, rank), so the resumed run is still reproducible
            seed_rank(mix_seed(self.cfg.run.seed, self.step.opt_step) % 2**32, self.info.rank)
            log.warning("resume: %s holds the RNG states of %d rank(s), this run has %d: every rank's "
                        "python/numpy/torch RNG re-derived from (seed %d, step %d, rank)", path, len(rngs),
                        self.info.world_size, self.cfg.run.seed, self.step.opt_step)
        self.last_good = (str(path), self.step.opt_step)
        self.run.truncate_after(self.step.opt_step)
        log.info("resumed from %s: step %d, epoch %d, batch %d of the epoch (%d samples of its order consumed)",
                 path, self.step.opt_step, self.epoch, self.epoch_step, self.epoch_step // self.accum * self.eff_batch)

    # -- logging -----------------------------------------------------------------------------

    def flush(self) -> Optional[dict]:
        """Read the buffered loss terms back (host sync), check them, log their mean."""
        if not self._buf:
            return None
        vals = torch.stack(self._buf).float()  # [n, T]
        vals = all_reduce_mean(vals, self.info).cpu()
        start = self._buf_start
        self._buf = []
        bad = ~torch.isfinite(vals).all(dim=1)
        if bad.any():
            i = int(bad.nonzero()[0])
            micro = start + i
            names = LOSS_NAMES[self.kind]
            terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, vals[i].tolist()))
            good = (f"{self.last_good[0]} (step {self.last_good[1]})" if self.last_good
                    else "none (no checkpoint written yet)")
            raise TrainingDiverged(f"non-finite loss at step {micro // self.accum} (micro-batch {micro}, epoch "
                                   f"{self.epoch}): {terms}; stopped. Last good checkpoint: {good}. "
                                   "Lower the lr (--optim.blr) or enable clipping (--optim.clip_grad=1.0)")
        now = time.perf_counter()
        dt = max(now - self._t_window, 1e-9)
        ips = self._images_window / dt
        self._t_window, self._images_window = now, 0
        mean = vals.mean(dim=0).tolist()
        rec = {"phase": "train", "step": self.step.opt_step, "epoch": self.epoch,
               **dict(zip(LOSS_NAMES[self.kind], mean)), "lr": self.step.last_lr, "images_per_s": ips}
        self.run.metrics(rec)
        self.history.append(rec)
        self._bar_postfix(rec)
        return rec

    def _bar_postfix(self, rec: dict) -> None:
        if self.bar is None:
            return
        post = {"step": rec["step"], "img/s": f"{rec['images_per_s']:.0f}"}
        if self.kind == "pretrain":
            post.update(L_mae=f"{rec['loss_mae']:.4f}", L_dist=f"{rec['loss_dist']:.4f}")
        else:
            post.update(bce=f"{rec['loss']:.4f}")
        post["lr"] = f"{rec['lr']:.2e}"
        post.update(self.bar_extra)
        self.bar.set_postfix(post, refresh=False)

    # -- the loop ----------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg = self.cfg
        total_micro = self.total_steps * self.accum
        show = self.info.is_main and cfg.run.progress
        self.bar = tqdm(total=total_micro, initial=self.step.micro_step, disable=not show, unit="batch",
                        dynamic_ncols=True, mininterval=1.0, desc=self.kind) if show else None
        log_micro = max(1, cfg.run.log_every) * self.accum
        batch = cfg.data.batch_size
        self.model.train()
        t_run = time.perf_counter()
        previous = self._install_signal_handlers()
        try:
            while self.step.opt_step < self.total_steps and self.epoch < cfg.optim.epochs:
                self._run_epoch(batch, log_micro)
                if self._preempted:
                    break
                if self.step.opt_step >= self.total_steps or self.epoch_step >= self.steps_per_epoch * self.accum:
                    self._end_epoch()
            self.flush()
            self.save(self.last_path)
            if self._preempted:
                name = signal.Signals(self._signal).name if self._signal else "a signal on another rank"
                log.warning("pre-empted at step %d (%s): %s written; exiting with code %d", self.step.opt_step,
                            name, self.last_path, cfg.run.preempt_exit_code)
                raise Preempted(self.step.opt_step, name, str(self.last_path), cfg.run.preempt_exit_code)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.bar is not None:
                self.bar.close()
            self.run.close()
        wall = time.perf_counter() - t_run
        ips = (self._images_timed / (time.perf_counter() - self._t_start)) if self._t_start and self._images_timed else None
        summary = {"kind": self.kind, "steps": self.step.opt_step, "epochs": self.epoch, "wall_s": wall,
                   "images_per_s": ips, "last": str(self.last_path), "best": str(self.best_path) if self.best is not None else None,
                   "best_val_mauc": self.best, "final": self._last("train"), "final_val": self._last("val")}
        if self.info.is_main:
            self.run.write_json("summary.json", summary)
        return summary

    def _install_signal_handlers(self) -> dict:
        """The handler only records the first signal; the loop acts on it at a step boundary (a
        handler that saved would run in the middle of a step or of a collective)."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # Python delivers signals to the main thread only

        def on_signal(signum, frame):
            if self._signal is None:
                self._signal = signum
        return {sig: signal.signal(sig, on_signal) for sig in self.preempt_signals}

    def _last(self, phase: str) -> Optional[dict]:
        return next((r for r in reversed(self.history) if r.get("phase") == phase), None)

    def _run_epoch(self, batch: int, log_micro: int) -> None:
        n_micro = self.steps_per_epoch * self.accum
        if self.epoch_step >= n_micro:
            return
        self.loader.set_epoch(self.epoch, start_step=self.epoch_step)
        it = iter(self.loader)
        try:
            self._consume(it, n_micro, batch, log_micro)
        finally:
            # the epoch may end before the loader does (accum, max_steps, pre-emption, an error):
            # closing stops and joins its prefetch thread now, not at garbage collection
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _consume(self, it, n_micro: int, batch: int, log_micro: int) -> None:
        while self.epoch_step < n_micro and self.step.opt_step < self.total_steps:
            try:
                images, labels = next(it)
            except StopIteration:
                raise RuntimeError(f"the loader ended after {self.epoch_step} of {n_micro} batches in epoch "
                                   f"{self.epoch}: len(loader) disagrees with what it yields") from None
            if not self._buf:
                self._buf_start = self.step.micro_step
            try:
                terms = self.step(images, labels) if self.kind == "finetune" else self.step(images)
            except Exception as e:
                if _is_oom(e):
                    raise OutOfMemory(oom_message(e, batch, self.step.opt_step)) from e
                raise
            self._buf.append(terms)
            self.epoch_step += 1
            if self._t_start is None:  # first step: compile / warm-up, excluded from the throughput
                if self.info.device.type == "cuda":
                    torch.cuda.synchronize()
                self._t_start = self._t_window = time.perf_counter()
            else:
                self._images_timed += batch * self.info.world_size
                self._images_window += batch * self.info.world_size
            if self.bar is not None:
                self.bar.update(1)
            boundary = self.step.micro_step % self.accum == 0
            if boundary and self.step.micro_step % log_micro == 0:
                self.flush()
            if boundary and self.cfg.run.ckpt_every > 0 and self.step.opt_step % self.cfg.run.ckpt_every == 0 \
                    and self.step.opt_step < self.total_steps:
                self.flush()  # never checkpoint weights that a NaN already reached
                self.save(self.last_path)
            if boundary and self.preempt_signals and self.step.opt_step % max(1, self.cfg.run.preempt_check_every) == 0 \
                    and any_rank(self._signal is not None, self.info):  # (no signals caught: no all-reduce)
                self._preempted = True  # every rank leaves here, at the same step
                return

    def _end_epoch(self) -> None:
        """After the last batch of an epoch (or the last step): validation, best.pt, next epoch."""
        self.flush()
        last = self.step.opt_step >= self.total_steps
        if self.validate is not None and ((self.epoch + 1) % max(1, self.cfg.run.eval_every) == 0 or last):
            res = self.validate(self.model)
            self.model.train()
            rec = {"phase": "val", "step": self.step.opt_step, "epoch": self.epoch, **res}
            self.run.metrics(rec)
            self.history.append(rec)
            m = res.get("mauc")
            if self.kind == "finetune":
                log.info("epoch %d: val mAUC %s", self.epoch, f"{m:.4f}" if m is not None else "undefined")
            else:
                log.info("epoch %d: val %s", self.epoch, ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                                                                    if isinstance(v, (int, float)) and "/" not in k))
            if m is not None and (self.best is None or m > self.best):
                self.best = m
                self.save(self.best_path, metrics=res)
        if not last:
            self.epoch += 1
            self.epoch_step = 0

