"""FFCV changes torch's thread count behind the caller's back: importing
`ffcv.pipeline.compiler` calls `torch.set_num_threads(1)`, and each FFCV epoch iterator sets it to
the loader's worker count. A process that converts or reads FFCV and then trains would silently
run its matmuls on one core. Everything in fasttrain that imports FFCV does it inside
`keep_torch_threads()`."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def keep_torch_threads():
    """Restore torch's intra-op thread count on exit, whatever FFCV set meanwhile."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
