"""Provenance written with every run and every benchmark: git SHA, versions, device, cores."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

_PACKAGES = ("torch", "torchvision", "timm", "triton", "numpy", "ffcv", "nvidia-dali-cuda130",
             "nvidia-dali-cuda120", "fasttrain")


def git_sha() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device_name(device: str | None = None) -> str:
    import torch  # only when called: `fasttrain bench convert` imports this module before its forked pools
    if (device is None or str(device).startswith("cuda")) and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def provenance(device: str | None = None, data: list | None = None) -> dict:
    """Everything needed to tell which code, libraries and hardware produced a number; `data`: the
    packed datasets read (every part of a mixture: path, split, count, manifest hash, weight)."""
    import torch  # only when called (see device_name)
    out = {
        "git_sha": git_sha(),
        "versions": versions(),
        "device": device_name(device),
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
    }
    if data is not None:
        out["data"] = data
    return out
