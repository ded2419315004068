"""Where the FFCV loader's host feed goes, against a memcpy of the same bytes (docs/benchmarks.md).

    python scripts/ffcv_feed_profile.py --data PACKED [--batch-size 128] [--rounds 8]
    python scripts/ffcv_feed_profile.py --data SINGLE --parts A B [--batch-size 128]

Interleaved windows (each variant once per round, medians), one packed split, 2 FFCV workers:
  memcpy          whole contiguous batches copied (the `bench loader` ceiling)
  take            np.take of a sorted random batch into one reused buffer (the raw loader's gather)
  raw-feed        the raw loader's feed()
  ffcv-feed       the FFCV loader's feed() (epochs as `bench loader` runs them: each from its start,
                  its first 2 batches untimed)
  ffcv-fresh      the same with FFCV's own per-epoch buffer allocation (the BufferPool bypassed)
  ffcv-bare       FFCV's EpochIterator alone over one long order (no epoch starts, no wrapper)
With --parts: the FFCV mixture A+B against the single set (SINGLE), whole epochs timed:
  mix-direct      the parts' readers decode into our batches (the CPU default)
  mix-assemble    the parts' batches copied into ours (`assemble`, the CUDA / os_cache=false path)
  single          the single set's feed()
Minor page faults per timed batch from getrusage (this process, all threads).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np

from fasttrain.config import DataConfig
from fasttrain.data import build_loader, open_packed
from fasttrain.format.ffcv import keep_torch_threads


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _loader(path, kind: str, b: int, workers: int, split: str):
    return build_loader(DataConfig(path=path, loader=kind, batch_size=b, num_workers=workers), split, True,
                        img_size=224, in_chans=1, need_labels=False, device="cpu")


def _epochs(ld, seconds: float, skip: int, state: dict):
    """Feed whole epochs for `seconds`, the first `skip` batches of each untimed: (images, s, batches)."""
    done, timed, batches = 0, 0.0, 0
    while timed < seconds:
        ld.set_epoch(state["epoch"])
        state["epoch"] += 1
        it = ld.feed()
        for _ in range(skip):
            next(it)
        t0 = time.perf_counter()
        for x, _ in it:
            done += x.shape[0]
            batches += 1
        timed += time.perf_counter() - t0
    return done, timed, batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--parts", nargs="+", help="a mixture of the same total size as --data")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=0.4, help="per variant per round")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with keep_torch_threads():
        from ffcv.loader.epoch_iterator import EpochIterator
    images = open_packed(args.data, args.split, "raw").images  # [N, H, W] uint8
    b, n = args.batch_size, len(images)
    rng = np.random.default_rng(0)
    batches = [np.sort(rng.choice(n, b, replace=False)) for _ in range(64)]
    reused = np.empty((b,) + images.shape[1:], np.uint8)
    st = {"i": 0, "start": 0}

    def memcpy():
        s = st["start"] = (st["start"] + b) % (n - b)
        np.copyto(reused, images[s:s + b])
        return b, 1

    def take():
        st["i"] += 1
        np.take(images, batches[st["i"] % len(batches)], axis=0, out=reused, mode="clip")
        return b, 1

    loaders, epochs = {}, {}
    if args.parts:
        loaders["mix-direct"] = _loader(list(args.parts), "ffcv", b, args.workers, args.split)
        loaders["mix-assemble"] = _loader(list(args.parts), "ffcv", b, args.workers, args.split)
        loaders["mix-assemble"].direct = False
        loaders["single"] = _loader(args.data, "ffcv", b, args.workers, args.split)
        skip = 0
    else:
        loaders["raw-feed"] = _loader(args.data, "raw", b, args.workers, args.split)
        loaders["ffcv-feed"] = _loader(args.data, "ffcv", b, args.workers, args.split)
        fresh = loaders["ffcv-fresh"] = _loader(args.data, "ffcv", b, args.workers, args.split)
        for L, pool in zip(fresh.loaders, fresh.pools):
            L.graph.allocate_memory = pool.allocate  # FFCV's own: fresh buffers every epoch
        skip = 2
    epochs = {k: {"epoch": 0} for k in loaders}
    bare = loaders.get("ffcv-feed")
    long_order = np.concatenate([rng.permutation(n) for _ in range(200)]) if bare else None

    def bare_window(seconds):
        L = bare.loaders[0]
        with keep_torch_threads():
            it = EpochIterator(L, long_order)
        for _ in range(4):  # its slots written once, its queue drained
            next(it)
        done, nb, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            done += next(it)[0].shape[0]
            nb += 1
        dt = time.perf_counter() - t0
        it.close()
        return done, dt, nb

    rates: dict = {}
    faults: dict = {}
    for _ in range(args.rounds):
        if not args.parts:
            for name, fn in (("memcpy", memcpy), ("take", take)):
                done, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds:
                    done += fn()[0]
                rates.setdefault(name, []).append(done / (time.perf_counter() - t0))
        for name, ld in loaders.items():
            f0 = _faults()
            done, dt, nb = _epochs(ld, args.seconds, skip, epochs[name])
            rates.setdefault(name, []).append(done / dt)
            faults.setdefault(name, []).append((_faults() - f0) / max(nb, 1))
        if bare is not None:
            f0 = _faults()
            done, dt, nb = bare_window(args.seconds)
            rates.setdefault("ffcv-bare", []).append(done / dt)
            faults.setdefault("ffcv-bare", []).append((_faults() - f0) / max(nb, 1))
    ref = statistics.median(rates["memcpy"]) if "memcpy" in rates else statistics.median(rates["single"])
    for name, v in rates.items():
        m = statistics.median(v)
        extra = f"  faults/batch {statistics.median(faults[name]):,.0f}" if name in faults else ""
        print(f"{name:>13} {m:>10,.0f} img/s  {m / ref:6.2f}x {'memcpy' if 'memcpy' in rates else 'single'}"
              f"  (windows {min(v):,.0f}-{max(v):,.0f}){extra}")


if __name__ == "__main__":
    main()
