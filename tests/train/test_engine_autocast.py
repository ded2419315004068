"""engine.autocast: the one autocast context of the step, validation, kNN, evaluate and predict."""
from __future__ import annotations

import torch

from fasttrain.train.engine import autocast


def test_bf16_region_on_cpu_by_device_or_name():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    for device in ("cpu", torch.device("cpu")):
        with autocast(device, torch.bfloat16):
            assert torch.is_autocast_enabled("cpu")
            assert (a @ b).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_none_is_fp32_and_leaves_an_enclosing_region_alone():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu", None):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast("cpu", None):  # not autocast(enabled=False): the outer region still holds
            assert (a @ b).dtype == torch.bfloat16
