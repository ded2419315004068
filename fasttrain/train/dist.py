"""Distributed data parallel through torchrun: NCCL on GPU, gloo on CPU.

Launch (one node):  torchrun --nproc_per_node=G -m fasttrain.cli pretrain --config ... --out RUN
Multi-node: on every node
    torchrun --nnodes=N --nproc_per_node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
             --rdzv-id=JOB -m fasttrain.cli pretrain ...
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; without them we run single-process.

Elastic restarts (`torchrun --max-restarts=K`): torchrun keeps ONE TCPStore server (its agent's, at
MASTER_ADDR:MASTER_PORT) for every restart of the worker group, and torch's env:// rendezvous
puts the process group's keys in it under the same names each time. After a restart the new
workers could read the dead workers' gloo addresses ("Gloo connectFullMesh failed ... Connection
refused") and the store-based barrier counts left over from the old group, and hang. So under
torchrun we connect to that store ourselves and give the keys a per-restart prefix
(run id + TORCHELASTIC_RESTART_COUNT): every group starts from a clean namespace. Every
collective also has a bounded timeout (run.dist_timeout_s), so a rank whose peer is gone fails
and exits (and torchrun restarts the group) instead of waiting torch's default 30 minutes.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    cpu_group: Optional[object] = None  # a gloo group for small host-side agreements (pre-emption flag)

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


def elastic_store(world: int, timeout: timedelta):
    """Under torchrun's shared agent store: a client of it whose keys carry this restart's prefix
    (see the module docstring); None when not launched by torchrun with an agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"fasttrain/{run_id}/restart{restart}", store)


def init_distributed(device_name: str = "auto", timeout_s: float = 600) -> DistInfo:
    """Join the torchrun process group if launched by torchrun, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    cpu_group = None
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        store = elastic_store(world, timeout)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout,
                                **({"store": store} if store is not None else {}))
    if world > 1:
        # host-side flags go through gloo on CPU tensors: no device sync; under NCCL a small group of its own
        cpu_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, cpu_group=cpu_group)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is True on any rank (one tiny gloo all-reduce): the ranks agree
    on a decision, e.g. to stop at this step, so none of them waits in a collective alone."""
    if not info.enabled:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.cpu_group)
    return bool(t.item())


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


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    """Destroy the process groups (release_process_groups then frees their C++ side)."""
    info.cpu_group = None
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def release_process_groups() -> None:
    """Free the destroyed process groups' objects now, so that their threads (gloo's two worker run
    loops and its tcp loop per group) are joined while the interpreter is whole.
    destroy_process_group only unregisters a group: its threads live on while any Python object
    refers to it (the DDP wrapper, in the trainer <-> kNN monitor reference cycle, or in a
    traceback), which can be into interpreter teardown, where a thread that needs the GIL is
    killed mid-C++ and aborts the process after the run has finished. Call it once the trainer
    and any exception holding it are gone."""
    gc.collect()
