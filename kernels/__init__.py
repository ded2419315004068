"""Fused ops for the pre-training step, each beside its pure-torch reference.

The model and loss code call the functions exported here and never know which backend ran:
Triton for CUDA tensors (`auto`), the torch reference elsewhere. `set_backend("torch")` or
`set_backend("triton")` forces one (tests run Triton on CPU tensors under TRITON_INTERPRET=1).

Each op file (masked_gather.py, l1_align.py) holds: the `@triton.jit` kernels, a launcher that
validates its inputs, the launchers registered as torch custom ops (so `torch.compile` keeps them
in its graph without a graph break; see `register_op`), an `autograd.Function` over those ops,
the pure-torch reference and the dispatching entry point.
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import is_fake  # compile traces ops with data-less tensors

try:  # Triton is optional: without it every op runs its torch reference.
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    HAS_TRITON = False

_BACKENDS = ("auto", "torch", "triton")

# "auto" runs the Triton kernels on CUDA tensors and the reference everywhere else. It stays so
# until a GPU measurement (`fasttrain bench kernels`, recorded in docs/benchmarks.md) shows that
# torch.compile of the reference beats the kernels on the card we train on; then flip it here.
# No GPU has measured them yet.
DEFAULT_BACKEND = "auto"
_backend = DEFAULT_BACKEND


def set_backend(name: str) -> None:
    """Pick the backend of every op: "auto" (Triton on CUDA, torch elsewhere), "torch", "triton"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend '{name}'; choose one of {', '.join(_BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily switch the backend (tests, benchmarks)."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _interpreting(kernel) -> bool:
    """True when `kernel` was built by the Triton interpreter (TRITON_INTERPRET=1 at import time:
    triton.jit reads the variable when it decorates, so the kernel object is what counts)."""
    return type(kernel).__name__ == "InterpretedFunction"


def use_triton(op: str, kernel, *tensors: torch.Tensor) -> bool:
    """Whether `op` runs its Triton kernel on these tensors under the current backend.

    auto:   Triton when it is installed and every tensor is on CUDA, else the reference.
    torch:  always the reference.
    triton: always Triton; a clear error when it cannot run (not installed, or CPU tensors
            without the interpreter).
    """
    backend = get_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: kernel backend 'triton' was forced but triton is not installed "
                           "(pip install triton, or set_backend('auto'|'torch'))")
    if not on_cuda and not _interpreting(kernel):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"{op}: kernel backend 'triton' was forced on {'/'.join(devices)} tensors; "
                           "Triton runs on CPU only under the interpreter: set TRITON_INTERPRET=1 "
                           "before importing fasttrain.kernels, move the tensors to CUDA, or use "
                           "set_backend('auto'|'torch')")
    return True


# Test hook: with poisoning on, every buffer a launcher allocates (outputs, gradients, partial
# sums) starts filled with NaN instead of being left uninitialised, so any element a kernel fails
# to write shows up in the comparison with the reference.
_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for kernel outputs (NaN-filled under `poison_outputs`)."""
    if _poison and not torch.compiler.is_compiling():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_layout(op: str, tensors: dict[str, torch.Tensor], strided: tuple[str, ...] = ()) -> None:
    """One device for all inputs. Tensors named in `strided` may have any strides except along
    their last dim, which must be dense (the kernels take the other strides as arguments, so
    slices such as x[:, 1:] need no copy); the others must be contiguous."""
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"{op}: inputs must be on one device, got {where}")
    for name, t in tensors.items():
        if name in strided:
            if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
                raise ValueError(f"{op}: {name} must be dense along its last dim (shape "
                                 f"{tuple(t.shape)}, stride {t.stride()}); call .contiguous() first")
        elif not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (shape {tuple(t.shape)}, stride "
                             f"{t.stride()}); call .contiguous() first")


def dense_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim is dense (what the kernels need), else a contiguous copy."""
    return t if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def block_d(D: int) -> int:
    """Channel tile: the largest of 256/128/64 dividing D (no masked lanes), else a power of two
    covering D up to 256."""
    for b in (256, 128, 64):
        if D % b == 0:
            return b
    return min(256, 1 << max(D - 1, 0).bit_length())


def launch(kernel, grid, *args, **meta) -> None:
    """Launch a Triton kernel from a launcher. The launchers double as the custom ops' fake
    (shape-only) implementations that torch.compile traces with data-less tensors: then only the
    output allocation matters and the kernel is skipped."""
    if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        return
    kernel[grid](*args, **meta)


def register_op(name: str, launcher) -> None:
    """Register `launcher` as the opaque custom op torch.ops.fasttrain.<name> with itself as the
    fake implementation, so torch.compile keeps it in the graph (no graph break) and calls it as
    one extern kernel.

    Why custom_op and not torch.library.triton_op (which lets Inductor see inside): under the
    interpreter a triton_op cannot be traced (the kernel would be dropped from the graph), and one
    registration path that the CPU tests exercise beats two. Idempotent, so importing this package
    twice under two names (`kernels`, `fasttrain.kernels`) does not fail."""
    if hasattr(torch.ops.fasttrain, name):
        return
    op = torch.library.custom_op(f"fasttrain::{name}", mutates_args=())(launcher)
    op.register_fake(launcher)


def can_check_values(t: torch.Tensor) -> bool:
    """Index tensors are checked for range/distinctness only on CPU: on CUDA the check would cost
    a host sync every step (torch.gather likewise only device-asserts there), and tensors without
    data (meta, or fake ones while torch.compile traces) have no values to check."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return not is_fake(t)


from .masked_gather import masked_gather, unshuffle_with_mask_token  # noqa: E402
from .l1_align import l1_align  # noqa: E402

__all__ = ["set_backend", "get_backend", "use_backend", "DEFAULT_BACKEND", "HAS_TRITON",
           "masked_gather", "unshuffle_with_mask_token", "l1_align"]
