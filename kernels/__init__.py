"""Fused ops for the pre-training step, each beside its pure-torch reference.

The model and loss code call the functions exported here and never know which backend ran:
Triton for CUDA tensors (`auto`), the torch reference elsewhere. `set_backend("torch")` or
`set_backend("triton")` forces one (tests run Triton on CPU tensors under TRITON_INTERPRET=1).
"""
from __future__ import annotations

_BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


def set_backend(name: str) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend '{name}'; choose one of {', '.join(_BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


from .masked_gather import masked_gather, unshuffle_with_mask_token  # noqa: E402
from .l1_align import l1_align  # noqa: E402

__all__ = ["set_backend", "get_backend", "masked_gather", "unshuffle_with_mask_token", "l1_align"]
