"""Mixture vs one packed dataset of the same total size, same run: does reading several parts cost?

    python -m fasttrain.bench.mixture --parts A B --single C [--loaders raw,ffcv,dali-cpu]
    python -m fasttrain.bench.mixture --make DIR --n 4096 --size 256    # SYNTHETIC packs first
    python -m fasttrain.bench.mixture tile --src PACKED --out BIG --copies 100   # bigger than memory
    python -m fasttrain.bench.mixture cold --data BIG [BIG2]    # root: cold page cache feed rates

For each loader kind, the mixture A+B and the single dataset C are timed in interleaved windows
(fasttrain.bench.timing.budgeted_windows: machine noise hits both alike); the figure is the median
images/s of each and their ratio (mixture / single). `feed` is the host side alone (uint8 batches
for the device), `whole` adds the batched augmentation (on the CPU here). `--make` writes two
SYNTHETIC phantom sources (NIH and CheXpert layouts, n each, packed by their real converters) and
a single NIH-layout source of 2n images packed the same way (raw + ffcv + dali where importable).

Run time: the plan is printed first and a line per window as it goes (stderr). The default
(batch 128, 1 warm-up + 3 windows of 4 batches) shares a 120 s budget equally between the
timings of every loader (mixture and single, per mode): a timing whose next window would overrun
its share stops after one window, with a note in its record. `--full`: batch 256, 5 windows of
6 batches, no budget. `--make` (writing the packs) is outside the budget.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fasttrain.bench.timing import (add_run_length_args, budget_text, budgeted_windows, fill_presets, median,
                                    print_plan, writable_formats)
from fasttrain.config import DataConfig
from fasttrain.converters.chexpert import convert_chexpert
from fasttrain.converters.common import AtomicDir
from fasttrain.converters.nih import convert_nih
from fasttrain.converters.synthetic import generate_phantoms
from fasttrain.data.loaders import build_loader
from fasttrain.format.packed import open_packed, read_manifest
from fasttrain.provenance import provenance

# (batch size, batches per window, windows, budget s) of the default run and of --full; budget 0: none
QUICK = dict(batch_size=128, batches=4, windows=3, budget=120.0)
FULL = dict(batch_size=256, batches=6, windows=5, budget=0.0)


def make_packs(root: Path, n: int, size: int, workers: int) -> tuple[list[str], str]:
    formats = writable_formats()
    kw = dict(formats=formats, size=size, progress=False, workers=workers)
    # a CheXpert source of n images holds ~14% lateral views (dropped by the converter) and a valid
    # split: write more so its train split is about n frontal images
    a = convert_nih(generate_phantoms(root / "src_nih", n, seed=1, size=size, workers=workers, test_fraction=0.01,
                                      progress=False), root / "nih", **kw)
    b = convert_chexpert(generate_phantoms(root / "src_cx", int(n * 1.2), seed=2, size=size, workers=workers,
                                           layout="chexpert", test_fraction=0.01, progress=False), root / "cx", **kw)
    total = len(open_packed(a, "train")) + len(open_packed(b, "train"))
    # the single dataset: the same number of train images (test_fraction tuned so train ~= total)
    c = convert_nih(generate_phantoms(root / "src_single", int(total / 0.99) + 2, seed=3, size=size, workers=workers,
                                      test_fraction=0.01, progress=False), root / "single", **kw)
    return [str(a), str(b)], str(c)


def tile_raw(src, out, copies: int, split: str = "train") -> Path:
    """A raw-only packed dataset whose `split` is `copies` back-to-back copies of src's split (ids
    suffixed '#k'): a set bigger than memory in the minutes it takes to write the bytes, for cold
    page-cache measurements. Its images repeat; the page cache cannot tell. Written atomically."""

    p = open_packed(src, split, "raw")
    m = read_manifest(src)
    with AtomicDir(Path(out)) as tmp:
        (tmp / "raw").mkdir()
        (tmp / "splits").mkdir()
        chunk = 1 << 26  # 64 MB sequential writes
        data = np.asarray(p.images).reshape(-1)
        with open(tmp / "raw" / f"{split}.u8", "wb") as f:
            for _ in range(copies):
                for a in range(0, len(data), chunk):
                    f.write(data[a:a + chunk].tobytes())
        np.save(tmp / "splits" / f"{split}.labels.npy", np.tile(p.labels, (copies, 1)))
        (tmp / "splits" / f"{split}.ids.txt").write_text("".join(f"{i}#{k}\n" for k in range(copies) for i in p.ids))
        meta = dict(m["splits"][split], count=len(p) * copies, ids=f"splits/{split}.ids.txt",
                    labels=f"splits/{split}.labels.npy")
        meta.pop("files", None)
        m.update(splits={split: meta}, formats=["raw"], format_details={"raw": dict(m["format_details"]["raw"],
                                                                                   files={split: f"raw/{split}.u8"})},
                 dataset=f"{m['dataset']}-tiled-x{copies}", synthetic=bool(m.get("synthetic")),
                 note=f"{m.get('note') or ''} tiled x{copies} from {src} by fasttrain.bench.mixture.tile_raw".strip())
        (tmp / "manifest.json").write_text(json.dumps(m, indent=1))
    return Path(out).absolute()


def _read_bytes() -> int:
    """Bytes this process caused to be read from storage (page faults and readahead included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")  # root only: page cache dropped


def cold_main(argv: list[str]) -> int:
    """Raw loader feed rate on a cold page cache for each (madvise, block_shuffle) variant, then the
    same batches again (cached): kernel default readahead, MADV_RANDOM, page-aware blocks."""
    p = argparse.ArgumentParser(prog="python -m fasttrain.bench.mixture cold")
    p.add_argument("--data", nargs="+", required=True, help="packed dataset(s) (several: a mixture)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--variants", default="normal:0,random:0,random:64,normal:64,sequential:64",
                   help="ADVICE:BLOCK pairs (data.raw_advice : data.block_shuffle)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    fill_presets(args, QUICK, FULL)

    path = args.data if len(args.data) > 1 else args.data[0]
    records = []
    variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",") if v]
    for advice, block in variants:
        cfg = DataConfig(path=path, loader="raw", batch_size=args.batch_size, raw_advice=advice, block_shuffle=block,
                         prefetch=2)
        ld = build_loader(cfg, "train", True, img_size=224, in_chans=1, need_labels=False)
        rec = dict(advice=advice, block_shuffle=block, batch_size=args.batch_size, batches=args.batches,
                   images=len(ld.packed), image_bytes=int(np.prod(ld.image_size)))
        for state in ("cold", "cached"):
            if state == "cold":
                _drop_caches()
            ld.set_epoch(0)  # the same batches both times
            b0, t0, n = _read_bytes(), time.perf_counter(), 0
            it = ld.feed()
            for _ in range(args.batches):
                x, _ = next(it)
                n += x.shape[0]
            it.close()
            dt = time.perf_counter() - t0
            rec[f"{state}_images_per_s"] = n / dt
            rec[f"{state}_read_mb"] = (_read_bytes() - b0) / 1e6
            rec["payload_mb"] = n * rec["image_bytes"] / 1e6
        records.append(rec)
        if not args.json:
            print(f"madvise {advice:<7} block {block:>4}: cold {rec['cold_images_per_s']:>8,.0f} img/s, "
                  f"read {rec['cold_read_mb']:>8,.1f} MB for {rec['payload_mb']:.1f} MB of images; "
                  f"cached {rec['cached_images_per_s']:>9,.0f} img/s", flush=True)
    prov = provenance("cpu")
    if args.json:
        for r in records:
            print(json.dumps({**r, "data": ld.data_parts(), "provenance": prov}))
    return 0


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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cold"]:
        return cold_main(argv[1:])
    if argv[:1] == ["tile"]:
        a = argparse.ArgumentParser(prog="python -m fasttrain.bench.mixture tile")
        a.add_argument("--src", required=True)
        a.add_argument("--out", required=True)
        a.add_argument("--copies", type=int, required=True)
        t = a.parse_args(argv[1:])
        print(tile_raw(t.src, t.out, t.copies))
        return 0
    p = argparse.ArgumentParser(prog="python -m fasttrain.bench.mixture", description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", help="the mixture's packed datasets")
    p.add_argument("--single", help="one packed dataset of the same total size")
    p.add_argument("--make", default=None, help="write SYNTHETIC packs here first (then --parts/--single are set)")
    p.add_argument("--n", type=int, default=4096, help="--make: images per part")
    p.add_argument("--size", type=int, default=256, help="--make: packed size")
    p.add_argument("--loaders", default="raw,ffcv,dali-cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (--full: 256)")
    p.add_argument("--batches", type=int, default=None, help="batches per window (default 4; --full: 6)")
    p.add_argument("--windows", type=int, default=None, help="timed windows after 1 warm-up (default 3; --full: 5)")
    add_run_length_args(p, budget=QUICK["budget"], shared_by="the timings", full="batch 256, 5 windows of 6 batches, no budget")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--modes", default="feed,whole", help="feed (host side) and/or whole (with augmentation)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    fill_presets(args, QUICK, FULL)

    modes = [m for m in args.modes.split(",") if m]
    workers = args.workers or os.cpu_count() or 1
    if args.make:
        args.parts, args.single = make_packs(Path(args.make), args.n, args.size, workers)
    if not args.parts or not args.single:
        p.error("give --parts A B ... and --single C, or --make DIR")
    loaders = [x for x in args.loaders.split(",") if x]
    timings = 2 * len(modes) * len(loaders)
    print_plan(f"{len(loaders)} loaders ({', '.join(loaders)}) x mixture, single x {', '.join(modes)} = {timings} "
               f"timings x (1 warm-up + {args.windows} windows) x {args.batches} batches of {args.batch_size}; "
               f"mixture {' + '.join(map(str, args.parts))}, single {args.single}; {budget_text(args.budget, timings)}")
    records = []
    for name in loaders:
        kind = name.split("-")[0]
        lds = {}
        for tag, path in (("mixture", list(args.parts)), ("single", args.single)):
            cfg = DataConfig(path=path, loader=kind, batch_size=args.batch_size, num_workers=workers)
            lds[tag] = build_loader(cfg, "train", True, img_size=args.img_size, in_chans=1, device="cpu",
                                    dtype=torch.bfloat16, need_labels=False)
        fns = {f"{t}/{mode}": _Window(ld, mode == "feed", args.batches)
               for mode in modes for t, ld in lds.items()}
        rates, stopped = budgeted_windows(fns, args.windows, warmup=1, budget=args.budget / len(loaders),
                                          unit="img/s")
        for mode in modes:
            mix, one = median(rates[f"mixture/{mode}"]), median(rates[f"single/{mode}"])
            records.append(dict(loader=name, mode=mode, mixture_images_per_s=mix, single_images_per_s=one,
                                ratio_mixture_vs_single=mix / one, windows={k: v for k, v in rates.items()
                                                                            if k.endswith(mode)},
                                mixture=lds["mixture"].data_parts(), single=lds["single"].data_parts(),
                                batch_size=args.batch_size, batches_per_window=args.batches, workers=workers,
                                windows_planned=args.windows, budget_s=args.budget or None,
                                note="; ".join(f"{k}: {v}" for k, v in stopped.items() if k.endswith(mode))
                                or None))
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
    from fasttrain import cli  # the exception table; cli imports the benchmarks lazily
    sys.exit(cli.run_command("bench mixture", main, sys.argv[1:]))
