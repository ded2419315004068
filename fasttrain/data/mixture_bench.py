"""Mixture vs one packed dataset of the same total size, same run: does reading several parts cost?

    python -m fasttrain.data.mixture_bench --parts A B --single C [--loaders raw,ffcv,dali-cpu]
    python -m fasttrain.data.mixture_bench --make DIR --n 4096 --size 256    # SYNTHETIC packs first

For each loader kind, the mixture A+B and the single dataset C are timed in interleaved windows
(fasttrain.bench.interleaved_windows: machine noise hits both alike); the figure is the median
images/s of each and their ratio (mixture / single). `feed` is the host side alone (uint8 batches
for the device), `whole` adds the batched augmentation (on the CPU here). `--make` writes two
SYNTHETIC phantom sources (NIH and CheXpert layouts, n each, packed by their real converters) and
a single NIH-layout source of 2n images packed the same way (raw + ffcv + dali where importable).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from fasttrain.bench import interleaved_windows, median


def make_packs(root: Path, n: int, size: int, workers: int) -> tuple[list[str], str]:
    from fasttrain.converters.chexpert import convert_chexpert
    from fasttrain.converters.nih import convert_nih
    from fasttrain.converters.synthetic import generate_phantoms
    from fasttrain.train.bench import _importable
    formats = tuple(["raw"] + [f for f, m in (("ffcv", "ffcv"), ("dali", "nvidia.dali")) if _importable(m)])
    kw = dict(formats=formats, size=size, progress=False, workers=workers)
    # a CheXpert source of n images holds ~14% lateral views (dropped by the converter) and a valid
    # split: write more so its train split is about n frontal images
    a = convert_nih(generate_phantoms(root / "src_nih", n, seed=1, size=size, workers=workers, test_fraction=0.01,
                                      progress=False), root / "nih", **kw)
    b = convert_chexpert(generate_phantoms(root / "src_cx", int(n * 1.2), seed=2, size=size, workers=workers,
                                           layout="chexpert", test_fraction=0.01, progress=False), root / "cx", **kw)
    from .packed import open_packed
    total = len(open_packed(a, "train")) + len(open_packed(b, "train"))
    # the single dataset: the same number of train images (test_fraction tuned so train ~= total)
    c = convert_nih(generate_phantoms(root / "src_single", int(total / 0.99) + 2, seed=3, size=size, workers=workers,
                                      test_fraction=0.01, progress=False), root / "single", **kw)
    return [str(a), str(b)], str(c)


class _Window:
    def __init__(self, loader, feed: bool, batches: int):
        self.loader, self.feed, self.batches, self.epoch = loader, feed, batches, 0

    def __call__(self) -> int:
        self.loader.set_epoch(self.epoch)  # a fresh epoch per window: nothing prefetched while others run
        self.epoch += 1
        it = self.loader.feed() if self.feed else iter(self.loader)
        n = 0
        try:
            for _ in range(self.batches):
                x, _ = next(it)
                n += x.shape[0]
        finally:
            if hasattr(it, "close"):
                it.close()
        return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasttrain.data.mixture_bench", description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", help="the mixture's packed datasets")
    p.add_argument("--single", help="one packed dataset of the same total size")
    p.add_argument("--make", default=None, help="write SYNTHETIC packs here first (then --parts/--single are set)")
    p.add_argument("--n", type=int, default=4096, help="--make: images per part")
    p.add_argument("--size", type=int, default=256, help="--make: packed size")
    p.add_argument("--loaders", default="raw,ffcv,dali-cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=6, help="batches per window")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from fasttrain.config import DataConfig
    from fasttrain.provenance import provenance

    from .loaders import build_loader
    workers = args.workers or os.cpu_count() or 1
    if args.make:
        args.parts, args.single = make_packs(Path(args.make), args.n, args.size, workers)
    if not args.parts or not args.single:
        p.error("give --parts A B ... and --single C, or --make DIR")
    records = []
    for name in [x for x in args.loaders.split(",") if x]:
        kind = name.split("-")[0]
        lds = {}
        for tag, path in (("mixture", list(args.parts)), ("single", args.single)):
            cfg = DataConfig(path=path, loader=kind, batch_size=args.batch_size, num_workers=workers)
            lds[tag] = build_loader(cfg, "train", True, img_size=args.img_size, in_chans=1, device="cpu",
                                    dtype=torch.bfloat16, need_labels=False)
        fns = {f"{t}/{mode}": _Window(ld, mode == "feed", args.batches)
               for mode in ("feed", "whole") for t, ld in lds.items()}
        rates = interleaved_windows(fns, windows=args.windows, warmup=1)
        for mode in ("feed", "whole"):
            mix, one = median(rates[f"mixture/{mode}"]), median(rates[f"single/{mode}"])
            records.append(dict(loader=name, mode=mode, mixture_images_per_s=mix, single_images_per_s=one,
                                ratio_mixture_vs_single=mix / one, windows={k: v for k, v in rates.items()
                                                                            if k.endswith(mode)},
                                mixture=lds["mixture"].data_parts(), single=lds["single"].data_parts(),
                                batch_size=args.batch_size, batches_per_window=args.batches, workers=workers))
        for ld in lds.values():
            if hasattr(ld, "close"):
                ld.close()
    prov = provenance("cpu")
    for r in records:
        if args.json:
            print(json.dumps({**r, "provenance": prov}))
        else:
            print(f"{r['loader']:<9} {r['mode']:<5} mixture {r['mixture_images_per_s']:>9,.0f} img/s   single "
                  f"{r['single_images_per_s']:>9,.0f} img/s   ratio {r['ratio_mixture_vs_single']:.3f}")
    if not args.json:
        synthetic = any(p.get("synthetic") for r in records for p in r["mixture"] + r["single"])
        print(f"{prov['device']}, {prov['cpu_cores']} cores, git {prov['git_sha']}"
              f"{', SYNTHETIC data' if synthetic else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
