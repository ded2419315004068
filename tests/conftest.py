import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests are small: keep the two cores for the tests, not for oversubscribed thread pools.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (compile, multi-process, end to end)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (run by scripts/gpu_check.sh)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh runs these on a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
