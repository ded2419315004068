"""What cluster safety costs (issue #13), each against its plain baseline in the same run.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_cluster.py ckpt
        checkpoint of the paper's student (ETMAE ViT-T/16 MAE, 224 px, + 2 AdamW moments):
        save_atomic without checksum (the old save) vs with checksum + step link, the checksum
        alone, and load + verify
    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 scripts/bench_cluster.py flag
        the per-step pre-emption agreement (dist.any_rank: one 1-element gloo all-reduce)
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time


def bench_ckpt(reps: int = 5) -> None:
    import torch
    from fasttrain.config import build_config
    from fasttrain.train import checkpoint as c
    from fasttrain.train.builders import build_pretrain_model
    torch.set_num_threads(1)
    sd = build_pretrain_model(build_config(None, ["--model.in_chans=1"])).state_dict()
    moments = {k: {"exp_avg": v.clone().float(), "exp_avg_sq": v.clone().float()}
               for k, v in sd.items() if v.is_floating_point()}
    state = {"model": sd, "optimizer": {"state": moments}, "step": {"opt_step": 1}}
    mib = 3 * sum(v.numel() * v.element_size() for v in sd.values()) / 2**20
    d = tempfile.mkdtemp(prefix="issue13-bench-")
    runs: dict[str, list[float]] = {k: [] for k in ("save, no checksum (baseline)", "save + checksum + step link",
                                                    "checksum alone", "load + verify")}
    try:
        for _ in range(reps):
            for name, fn in (("save, no checksum (baseline)",
                              lambda: c.save_atomic(state, os.path.join(d, "plain.pt"), checksum=False)),
                             ("save + checksum + step link",
                              lambda: c.save_atomic(state, os.path.join(d, "last.pt"), also=os.path.join(d, "s.pt"))),
                             ("checksum alone", lambda: c.tensor_checksum(state)),
                             ("load + verify", lambda: c.load_checkpoint(os.path.join(d, "last.pt")))):
                t = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t)
    finally:
        shutil.rmtree(d)
    print(f"{mib:.1f} MiB of tensors; medians of {reps}:")
    base = statistics.median(runs["save, no checksum (baseline)"])
    for name, ts in runs.items():
        m = statistics.median(ts)
        print(f"  {name:32s} {m * 1e3:8.1f} ms   {m / base:5.2f}x baseline")


def bench_flag(calls: int = 1000, reps: int = 5) -> None:
    import torch.distributed as dist
    from fasttrain.train.dist import any_rank, init_distributed
    info = init_distributed("cpu")
    ts = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(calls):
            any_rank(False, info)
        ts.append((time.perf_counter() - t) / calls)
    if info.rank == 0:
        print(f"any_rank on {info.world_size} gloo ranks: median {statistics.median(ts) * 1e6:.0f} us per call "
              f"({reps} x {calls} calls)")
    dist.destroy_process_group()


if __name__ == "__main__":
    {"ckpt": bench_ckpt, "flag": bench_flag}[sys.argv[1] if len(sys.argv) > 1 else "ckpt"]()
