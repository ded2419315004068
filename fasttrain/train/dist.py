"""Distributed data parallel through torchrun: NCCL on GPU, gloo on CPU.

Launch (one node):  torchrun --nproc_per_node=G -m fasttrain.cli pretrain --config ... --out RUN
Multi-node: on every node
    torchrun --nnodes=N --nproc_per_node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
             --rdzv-id=JOB -m fasttrain.cli pretrain ...
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; without them we run single-process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (in place on a copy); a no-op for one process."""
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over the trainable model; a frozen distillation teacher (`teacher.*`) stays outside:
    no gradient buckets and no broadcast of its weights (each rank loads it from its file)."""
    DDP = torch.nn.parallel.DistributedDataParallel
    ignore = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers())
              if n.startswith("teacher.")]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
               broadcast_buffers=False)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
