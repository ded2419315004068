"""The training step: the fused (compiled, bf16) step and its plain reference twin.

One call = one micro-batch: forward (student + frozen teacher for distillation), backward, and
every `accum_steps` calls an optimiser step. It returns the loss terms as a detached device
tensor and never reads a value back to the host: the trainer reads them every `log_every` steps.

Modes (`engine.mode`):
- `fused`: torch.compile of the forward (+ AOT backward) at fixed shapes, bf16 autocast, a bf16
  copy of the frozen teacher truncated at its aligned block and run under inference mode,
  the decoder's last block and pixel head on the removed patches only (exact), channels-last
  input, fused AdamW (built by optim.build_optimizer).
- `reference`: the baseline's semantics, the benchmark's baseline and the tests' oracle: eager, the
  teacher's full encoder + decoder on the visible tokens, plain for-loop AdamW, fp32 on CPU and
  fp16 autocast + GradScaler on CUDA.

`make_step(cfg, model, optimizer)` builds either from a Config; `fasttrain bench step` and the
trainers call it the same way.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain.data import gpu_augment
from fasttrain.models.distill import student_of

log = logging.getLogger("fasttrain.train")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
AMP_CHOICES = ("auto", *AMP_DTYPES)


def amp_dtype_for(amp: str, device) -> Optional[torch.dtype]:
    """engine.amp -> the fused step's autocast dtype (None = fp32). auto: bf16 on CUDA and on CPUs
    with native bf16 (AVX512-BF16 / AMX); fp32 on other CPUs, where oneDNN emulates bf16: on an
    AVX2-only EPYC the demo's pre-training ran ~20x slower in bf16 than in fp32."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"config key 'engine.amp': expected one of {AMP_CHOICES}, got '{amp}'")
    if amp == "auto":
        return torch.bfloat16 if torch.device(device).type != "cpu" or gpu_augment.cpu_has_native_bf16() else None
    return AMP_DTYPES[amp]


def step_amp_dtype(mode: str, amp: str, device) -> Optional[torch.dtype]:
    """The autocast dtype the training step of engine.mode runs under (None = fp32): reference is
    the baseline's (fp16 on CUDA, fp32 on CPU), fused follows engine.amp. Validation, the kNN monitor,
    evaluate and predict run under the same, so their scores are the trained model's."""
    if mode == "reference":
        return torch.float16 if torch.device(device).type == "cuda" else None
    return amp_dtype_for(amp, device)


def cfg_amp_dtype(cfg, device) -> Optional[torch.dtype]:
    """step_amp_dtype of a run's Config."""
    return step_amp_dtype(cfg.engine.mode, cfg.engine.amp, device)


def autocast(device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """torch.autocast on `device` (a torch.device or its name) in `dtype`; with dtype None (fp32)
    a context that changes nothing, so an enclosing autocast region stays as it is."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


MODES = ("fused", "reference")


class CompileError(RuntimeError):
    """torch.compile could not build the step (names the way out: engine.compile=false)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def has_teacher(model: nn.Module) -> bool:
    return getattr(unwrap(model), "teacher", None) is not None


# ----------------------------------------------------------------------------- loss functions
# Each returns a 1-d tensor of loss terms; element 0 is what is back-propagated.

def pretrain_terms(model: nn.Module, images: torch.Tensor, noise: torch.Tensor,
                   teacher_mode: str, decoder: str = "full") -> torch.Tensor:
    """images [B, C, H, W], noise [B, L] -> [3] = (L, L_MAE, L_dist); L_dist = 0 for plain MAE.
    decoder="masked" runs the decoder's last block and pixel head on the removed patches only:
    the same loss and gradients, fewer FLOPs (see MaskedAutoencoderViT.forward_decoder_masked)."""
    if has_teacher(model):
        out = model(images, noise=noise, teacher_mode=teacher_mode, decoder=decoder)
        return torch.stack([out.loss, out.loss_mae, out.loss_dist]).float()  # [3]
    loss, _pred, _mask = model(images, noise=noise, decoder=decoder)
    return torch.stack([loss, loss, torch.zeros_like(loss)]).float()  # [3]


def bce_masked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE with logits; NaN labels (uncertain/ignored) are left out of the mean.

    logits, labels [B, C] -> scalar = sum_{valid} bce / max(#valid, 1)."""
    valid = ~torch.isnan(labels)  # [B, C]
    target = torch.where(valid, labels, torch.zeros_like(labels))  # [B, C]
    per = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")  # [B, C]
    per = per * valid
    return per.sum() / valid.sum().clamp_min(1)


def finetune_terms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """images [B, C, H, W], labels [B, K] -> [1] = (BCE,)."""
    return bce_masked(model(images), labels).reshape(1)  # [1]


# ----------------------------------------------------------------------------- the step

class TrainStep:
    """Forward/backward of one micro-batch and, every `accum_steps` calls, the optimiser step.

    `kind="pretrain"`: step(images, noise=None) -> [3] (L, L_MAE, L_dist). The mask noise is
    drawn outside the compiled graph from a generator re-seeded from (seed, rank, micro-step),
    so masks are reproducible across eager/compiled/reference and across resume.
    `kind="finetune"`: step(images, labels) -> [1] (BCE,).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, kind: str = "pretrain",
                 mode: str = "fused", amp: str = "bf16", compile: bool = False, channels_last: bool = True,
                 accum_steps: int = 1, clip_grad: Optional[float] = None, teacher_mode: str = "auto",
                 schedule=None, seed: int = 0, rank: int = 0, ddp: Optional[nn.Module] = None,
                 device: torch.device | str | None = None):
        if mode not in MODES:
            raise ValueError(f"config key 'engine.mode': expected one of {MODES}, got '{mode}'")
        if amp not in AMP_CHOICES:
            raise ValueError(f"config key 'engine.amp': expected one of {AMP_CHOICES}, got '{amp}'")
        if teacher_mode not in ("auto", "truncated", "full"):
            raise ValueError(f"config key 'engine.teacher_mode': expected auto|truncated|full, got '{teacher_mode}'")
        if accum_steps < 1:
            raise ValueError(f"config key 'optim.accum_steps' must be >= 1, got {accum_steps}")
        self.kind, self.mode = kind, mode
        self.model = model  # the bare model (checkpoints, eval)
        self.ddp = ddp  # the DDP wrapper when distributed (forward goes through it)
        self.optimizer = optimizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.accum_steps, self.clip_grad = accum_steps, clip_grad
        self.schedule = schedule
        self.seed, self.rank = seed, rank
        self.micro_step = 0  # calls so far (checkpointed): seeds the masks
        self.opt_step = 0  # optimiser steps so far (checkpointed): drives the lr schedule
        self.last_lr = 0.0
        self.amp_dtype = step_amp_dtype(mode, amp, self.device)
        if mode == "reference":
            # The baseline: fp32 on CPU, fp16 autocast + loss scaling on CUDA; eager; full teacher.
            self.channels_last, self.compiled = False, False
            self.teacher_mode = "full" if teacher_mode == "auto" else teacher_mode
            self.decoder = "full"  # the baseline's decoder: every token through every layer
        else:
            self.channels_last, self.compiled = channels_last, compile
            self.teacher_mode = "truncated" if teacher_mode == "auto" else teacher_mode
            self.decoder = "masked"  # exact: only removed patches enter the loss
        if self.amp_dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError("engine.amp=fp16 needs CUDA; use bf16 or fp32 on CPU")
        # Loss scaling only for fp16 (bf16 has fp32's range).
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        if mode == "fused" and self.amp_dtype is not None and has_teacher(model):
            # The teacher is frozen: keep it in the autocast dtype once instead of casting its
            # weights on every forward (half the memory traffic of the teacher's matmuls).
            unwrap(model).teacher.to(dtype=self.amp_dtype)
        if self.channels_last and ddp is None:
            # NHWC conv weights to match the NHWC input (the trainer does this before wrapping DDP,
            # whose gradient buckets are laid out at construction).
            model.to(memory_format=torch.channels_last)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._gen = torch.Generator(device=self.device)
        fwd = self._forward_pretrain if kind == "pretrain" else self._forward_finetune
        self._fwd: Callable = torch.compile(fwd, dynamic=False) if self.compiled else fwd
        self._compiled_ok = False

    # -- stages ------------------------------------------------------------------------------

    def _net(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model

    def _forward_pretrain(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return pretrain_terms(self._net(), images, noise, self.teacher_mode, self.decoder)  # [3]

    def _forward_finetune(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return finetune_terms(self._net(), images, labels)  # [1]

    def mask_noise(self, batch: int) -> torch.Tensor:
        """[B, L] uniform noise for this micro-step, reproducible from (seed, rank, micro_step)."""
        m = unwrap(self.model)
        L = student_of(m).num_patches
        self._gen.manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.micro_step)
        return torch.rand(batch, L, generator=self._gen, device=self.device)  # [B, L]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)  # [B, C, H, W] NHWC storage
        return images

    def _run_forward(self, *args) -> torch.Tensor:
        if not self.compiled or self._compiled_ok:
            return self._fwd(*args)
        try:  # first call compiles: turn a compiler failure into an actionable message
            out = self._fwd(*args)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError,
                torch._dynamo.exc.Unsupported) as e:
            raise CompileError(f"torch.compile failed to build the {self.kind} step "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                               "rerun with --engine.compile=false to train eagerly") from e
        self._compiled_ok = True
        return out

    def __call__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        images = self.prepare(images)
        boundary = (self.micro_step + 1) % self.accum_steps == 0
        sync = contextlib.nullcontext()
        if self.ddp is not None and not boundary:
            sync = self.ddp.no_sync()  # accumulate locally; all-reduce only on the last micro-batch
        with sync:
            if self.kind == "pretrain":
                if noise is None:
                    noise = self.mask_noise(images.shape[0])
                terms = self._run_forward(images, noise)  # [3]
            else:
                terms = self._run_forward(images, labels.to(self.device, non_blocking=True))  # [1]
            loss = terms[0] / self.accum_steps
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        self.micro_step += 1
        if boundary:
            self.optimizer_step()
        return terms.detach()

    def optimizer_step(self) -> None:
        if self.schedule is not None:
            self.last_lr = self.schedule.apply(self.opt_step)
        if self.scaler is not None:
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.clip_grad:
                # returns a device tensor: no host sync
                torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad, foreach=True)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.opt_step += 1

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step, "opt_step": self.opt_step,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = int(state["micro_step"])
        self.opt_step = int(state["opt_step"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def make_step(cfg, model: nn.Module, optimizer: torch.optim.Optimizer, *, kind: str = "pretrain",
              schedule=None, rank: int = 0, ddp: Optional[nn.Module] = None,
              device: torch.device | str | None = None) -> TrainStep:
    """Build the step a Config asks for: step(images) -> [3] loss terms (pre-training) or
    step(images, labels) -> [1] (fine-tuning). Used by the trainers and `fasttrain bench step`."""
    e = cfg.engine
    return TrainStep(model, optimizer, kind=kind, mode=e.mode, amp=e.amp, compile=e.compile,
                     channels_last=e.channels_last, accum_steps=cfg.optim.accum_steps,
                     clip_grad=cfg.optim.clip_grad, teacher_mode=e.teacher_mode, schedule=schedule,
                     seed=cfg.run.seed, rank=rank, ddp=ddp, device=device)
