"""Analytic FLOPs of the ETMAE pre-training step, and the device peak they are compared with.

Counted as matmul FLOPs (2*M*N*K per matmul), which is what MFU is defined on; layer norms,
softmax, GELU and the optimizer are left out (a few percent). Backward = 2x forward for the
trainable parts (the usual 6*N*tokens rule); the frozen teacher runs forward only, and only to its
aligned block. The counts use module shapes read off the models, so they follow any override.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


def block_flops(tokens: int, dim: int, mlp_hidden: int) -> int:
    """Forward FLOPs of one pre-norm ViT block on `tokens` tokens of width `dim`:
    qkv 2*T*D*3D + scores 2*T*T*D + attn@V 2*T*T*D + proj 2*T*D*D + fc1 2*T*D*H + fc2 2*T*H*D."""
    T, D, H = tokens, dim, mlp_hidden
    return 8 * T * D * D + 4 * T * T * D + 4 * T * D * H


@dataclass
class StepFlops:
    student_fwd: int  # patch embed + encoder on visible tokens + decoder on all tokens (+ proj head)
    teacher_fwd: int  # patch embed + blocks 0..k on the visible tokens
    per_image: int  # 3 * student_fwd + teacher_fwd

    def as_dict(self) -> dict:
        return {"student_fwd": self.student_fwd, "teacher_fwd": self.teacher_fwd, "per_image": self.per_image}


def _mlp_hidden(block: nn.Module) -> int:
    return block.mlp.fc1.out_features


def _patch_embed_flops(model: nn.Module, num_patches: int) -> int:
    w = model.patch_embed.proj.weight  # [D, C, p, p]
    return 2 * num_patches * w[0].numel() * w.shape[0]


def encoder_flops(model: nn.Module, tokens: int, blocks: int) -> int:
    """Patch embedding of every patch (it runs before masking) + `blocks` blocks on `tokens` tokens."""
    b0 = model.blocks[0]
    dim = model.pos_embed.shape[-1]
    return _patch_embed_flops(model, model.patch_embed.num_patches) + blocks * block_flops(tokens, dim, _mlp_hidden(b0))


def mae_fwd_flops(mae: nn.Module, mask_ratio: float) -> int:
    """Forward FLOPs per image of a MaskedAutoencoderViT: encoder on 1+K tokens, decoder on 1+L."""
    L = mae.patch_embed.num_patches
    K = int(L * (1 - mask_ratio))
    enc = encoder_flops(mae, 1 + K, len(mae.blocks))
    d_enc = mae.pos_embed.shape[-1]
    d_dec = mae.decoder_embed.out_features
    dec = 2 * (1 + K) * d_enc * d_dec  # decoder_embed on the visible tokens
    dec += len(mae.decoder_blocks) * block_flops(1 + L, d_dec, _mlp_hidden(mae.decoder_blocks[0]))
    dec += 2 * (1 + L) * d_dec * mae.decoder_pred.out_features
    return enc + dec


def etmae_step_flops(student: nn.Module, teacher: nn.Module | None, mask_ratio: float,
                     teacher_block: int = 8, proj: nn.Module | None = None) -> StepFlops:
    """FLOPs per image of one fused pre-training step (student fwd+bwd, teacher fwd to its block)."""
    L = student.patch_embed.num_patches
    T = 1 + int(L * (1 - mask_ratio))
    s = mae_fwd_flops(student, mask_ratio)
    if proj is not None:
        s += sum(2 * T * m.in_features * m.out_features for m in proj.modules() if isinstance(m, nn.Linear))
    t = encoder_flops(teacher, T, teacher_block + 1) if teacher is not None else 0
    return StepFlops(student_fwd=s, teacher_fwd=t, per_image=3 * s + t)


# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), matched by substring of the name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def known_peak(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return peak
    return None


def measured_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                         reps: int = 5) -> float:
    """Best FLOP/s of a square matmul over `reps`: the practical peak where no datasheet figure is
    known (CPUs). The best, not the median: on a shared machine other jobs only ever slow a rep down,
    and a depressed peak inflates every MFU computed from it."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    rates = []
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b  # synchronous on CPU; synchronised below on CUDA
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # first is warm-up
            rates.append(2 * n ** 3 / (time.perf_counter() - t0))
    return max(rates)
