#!/usr/bin/env python
"""Gather-only: RawLoader._take for the mixture vs the single set, same batches, interleaved windows.

Needs the packs of `python -m fasttrain.bench.mixture --make /tmp/issue10-bench --n 1500 --size 256`
(docs/benchmarks.md, "Mixture vs one packed set"); no threads, so a loaded machine disturbs it less."""
import statistics
import time

import numpy as np

from fasttrain.config import DataConfig
from fasttrain.data import build_loader
lds = {t: build_loader(DataConfig(path=p, loader="raw", batch_size=256), "train", True, img_size=224, in_chans=1,
                       need_labels=False)
       for t, p in (("mixture", ["/tmp/issue10-bench/nih", "/tmp/issue10-bench/cx"]), ("single", "/tmp/issue10-bench/single"))}
rates = {t: [] for t in lds}
for w in range(12):
    for t, ld in lds.items():
        ld.set_epoch(w)
        bufs = np.empty((256, *ld.packed.image_size), np.uint8)  # [B, H, W]
        t0, n, batches = time.perf_counter(), 0, 0
        for step, idx in ld.sampler.batches():
            idx = np.sort(idx)
            ld._take(idx, bufs[:len(idx)])
            n += len(idx)
            batches += 1
        if w:
            rates[t].append(n / (time.perf_counter() - t0))
m, s = statistics.median(rates["mixture"]), statistics.median(rates["single"])
print(f"gather only, {len(rates['mixture'])} windows of one epoch each ({batches} batches of 256): mixture {m:,.0f} img/s, single {s:,.0f} img/s, ratio {m/s:.3f}")
print({k: [round(x) for x in v] for k, v in rates.items()})
