"""Where the raw loader's host feed goes, against a memcpy of the same bytes (docs/benchmarks.md).

    python scripts/host_feed_profile.py --data PACKED [--batch-size 128] [--rounds 12]

Interleaved windows (each variant once per round, medians), on one packed split:
  memcpy           whole contiguous batches copied (the `bench loader` ceiling)
  take-raise-fresh np.take (numpy's default mode) of a sorted random batch into a fresh buffer
  take-clip-fresh  the same with mode="clip" (no temporary: numpy buffers `out` in "raise" mode)
  take-clip-reused the same into one reused buffer (no page faults)
  feed             the raw loader's feed() (prefetch thread, reused buffers), minor faults per batch
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch

from fasttrain.config import DataConfig
from fasttrain.data import build_loader, open_packed


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seconds", type=float, default=0.25, help="per variant per round")
    args = p.parse_args()
    images = open_packed(args.data, args.split, "raw").images  # [N, H, W] uint8
    b, n = args.batch_size, len(images)
    if n < 2 * b:
        raise SystemExit(f"{args.data}: split '{args.split}' has {n} images, need >= {2 * b}")
    rng = np.random.default_rng(0)
    batches = [np.sort(rng.choice(n, b, replace=False)) for _ in range(64)]
    reused = np.empty((b,) + images.shape[1:], np.uint8)
    state = {"i": 0, "start": 0}

    def nxt() -> np.ndarray:
        state["i"] += 1
        return batches[state["i"] % len(batches)]

    def memcpy() -> int:
        s = state["start"] = (state["start"] + b) % (n - b)
        np.copyto(reused, images[s:s + b])
        return b

    def fresh() -> np.ndarray:
        return torch.empty((b,) + images.shape[1:], dtype=torch.uint8).numpy()

    variants = {
        "memcpy": memcpy,
        "take-raise-fresh": lambda: np.take(images, nxt(), axis=0, out=fresh()).shape[0],
        "take-clip-fresh": lambda: np.take(images, nxt(), axis=0, out=fresh(), mode="clip").shape[0],
        "take-clip-reused": lambda: np.take(images, nxt(), axis=0, out=reused, mode="clip").shape[0],
    }
    loader = build_loader(DataConfig(path=args.data, loader="raw", batch_size=b, num_workers=1), args.split,
                          True, img_size=224, in_chans=1, need_labels=False)
    rates: dict[str, list[float]] = {k: [] for k in list(variants) + ["feed"]}
    faults: list[float] = []
    for r in range(args.rounds):
        for name, fn in variants.items():
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                done += fn()
            rates[name].append(done / (time.perf_counter() - t0))
        loader.set_epoch(r)
        it = iter(loader.feed())
        next(it)  # the epoch's start-up and the prefetch queue filling are not timed
        next(it)
        f0, done, t0 = _faults(), 0, time.perf_counter()
        for x, _ in it:
            done += x.shape[0]
        dt = time.perf_counter() - t0
        if done:
            rates["feed"].append(done / dt)
            faults.append((_faults() - f0) / (done / b))
    for name, v in rates.items():
        extra = f"  minor faults/batch {statistics.median(faults):,.0f}" if name == "feed" and faults else ""
        print(f"{name:>18} {statistics.median(v):>10,.0f} img/s  (windows {min(v):,.0f}-{max(v):,.0f}){extra}")


if __name__ == "__main__":
    main()
