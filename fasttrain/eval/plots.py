"""`fasttrain plot RUN...`: the figures of a run (or several, overlaid) as PNGs.

- losses.png: L_MAE and L_dist of pre-training runs in separate panels (the paper's Fig. 2-3
  style: the distillation term falling while reconstruction converges), train and val;
- finetune.png: fine-tuning BCE and validation mAUC per epoch;
- recon_<run>.png: for a pre-training run, MAE's visualisation of a fixed set of val images:
  original, masked input, reconstruction, and reconstruction with the visible patches pasted back;
- auc_bars.png: per-label AUC of each run's evaluation results (eval/results_*.json), with the
  95% bootstrap CI as error bars (the paper's per-label comparison, Fig. 4 style).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from fasttrain.config import config_from_dict
from fasttrain.data import build_loader
from fasttrain.data.mixture import parse_parts, part_manifests
from fasttrain.format.packed import read_manifest
from fasttrain.models.checkpoints import load_into
from fasttrain.train.builders import build_student
from fasttrain.train.checkpoint import load_checkpoint
from fasttrain.train.runlog import read_metrics, save_figure


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    return plt


def _series(records: list[dict], phase: str, key: str) -> tuple[list, list]:
    rs = [r for r in records if r.get("phase") == phase and isinstance(r.get(key), (int, float))]
    return [r["step"] for r in rs], [r[key] for r in rs]


def plot_runs(runs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    runs = [Path(r) for r in runs]
    for r in runs:
        if not (r / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{r}: not a fasttrain run directory (no metrics.jsonl)")
    out = Path(out) if out is not None else (runs[0] / "plots")
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    written: list[Path] = []
    data = {r: read_metrics(r) for r in runs}

    pre = {r: m for r, m in data.items() if any("loss_mae" in x for x in m)}
    if pre:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r, m in pre.items():
            for ax, key, title in ((axes[0], "loss_mae", "L_MAE (masked reconstruction)"),
                                   (axes[1], "loss_dist", "L_dist (feature alignment)")):
                for phase, style in (("train", "-"), ("val", "--")):
                    x, y = _series(m, phase, key)
                    if x and any(v > 0 for v in y):  # L_dist is 0 in a run without a teacher
                        ax.plot(x, y, style, label=f"{r.name} {phase}")
                ax.set_title(title)
                ax.set_xlabel("optimiser step")
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, out / "losses.png"))

    fin = {r: m for r, m in data.items() if any(x.get("phase") == "val" and "mauc" in x for x in m)
           or (any(x.get("phase") == "train" for x in m) and r not in pre)}
    if fin:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r, m in fin.items():
            x, y = _series(m, "train", "loss")
            if x:
                axes[0].plot(x, y, label=r.name)
            x, y = _series(m, "val", "mauc")
            if x:
                axes[1].plot(x, y, "o-", label=r.name)
        axes[0].set_title("fine-tuning BCE (train)")
        axes[1].set_title("validation mAUC")
        for ax in axes:
            ax.set_xlabel("optimiser step")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, out / "finetune.png"))

    results = []
    for r in runs:
        for f in sorted((r / "eval").glob("results_*.json")) if (r / "eval").is_dir() else []:
            results.append((f"{r.name}/{f.stem[len('results_'):]}", json.loads(f.read_text())))
    if results:
        names = list(results[0][1]["labels"])
        width = 0.8 / len(results)
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 4.5))
        for i, (tag, res) in enumerate(results):
            xs, ys, lo, hi = [], [], [], []
            for j, n in enumerate(names):
                e = res["labels"].get(n)
                if not e or not e["defined"]:
                    continue
                xs.append(j + (i - (len(results) - 1) / 2) * width)
                ys.append(e["auc"])
                ci = e["ci95"] or [e["auc"], e["auc"]]
                lo.append(e["auc"] - ci[0])
                hi.append(ci[1] - e["auc"])
            synth = " SYNTHETIC" if res.get("synthetic") else ""
            mauc = res.get("mauc")
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2,
                   label=f"{tag}{synth} (mAUC {mauc:.3f})" if mauc is not None else tag)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0.4, 1.0)
        ax.axhline(0.5, color="k", lw=0.6, ls=":")
        ax.set_ylabel("AUC (95% bootstrap CI)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, out / "auc_bars.png"))
    for r in pre:
        if (r / "checkpoints" / "last.pt").is_file():
            written.append(plot_reconstructions(r, out / f"recon_{r.name}.png"))

    if not written:
        raise ValueError(f"nothing to plot in {', '.join(map(str, runs))}: no logged steps and no eval results yet")
    return written


def reconstruct(run: str | Path, n_images: int = 6, seed: int = 0, split: str | None = None):
    """A pre-training run's student on the first `n_images` of the val split (test if none), with a
    mask drawn from `seed` (the same images and masks for every run and every call).

    -> (images [n, C, H, W], masked [n, C, H, W], recon [n, C, H, W], pasted [n, C, H, W], cfg),
    all in the loader's normalised pixel space; with norm_pix_loss the prediction is mapped back
    with each target patch's own mean and variance (as MAE-style visualisations of such models do:
    a removed patch's brightness and contrast then come from the original, its structure from the model)."""

    ck = load_checkpoint(Path(run) / "checkpoints" / "last.pt")
    if ck.get("kind") != "pretrain":
        raise ValueError(f"{run}: reconstructions need a pre-training run (kind={ck.get('kind')!r})")
    cfg = config_from_dict(ck["config"])
    student = build_student(cfg)
    load_into(student, ck["model"], strict=True, what=f"{run}/checkpoints/last.pt")  # (ETMAE: takes `student.*`)
    student.eval()
    # a mixture (NIH + CheXpert): the figure's fixed images come from its first part
    first = parse_parts(cfg.data.path)[0].path
    data_cfg = dataclasses.replace(cfg.data, path=first, weights=None, samples_per_epoch=None)
    splits = read_manifest(first).get("splits", {})
    split = split or (cfg.data.val_split if cfg.data.val_split in splits else cfg.data.test_split)
    loader = build_loader(data_cfg, split, train=False, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                          device="cpu", dtype=torch.float32, batch_size=n_images, drop_last=False)
    imgs, _ = next(iter(loader))  # [n, C, H, W] the first images of the split: a fixed set
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(imgs.shape[0], student.num_patches, generator=gen)  # [n, L] fixed masks
    with torch.no_grad():
        _, pred, mask = student(imgs, noise=noise)  # pred [n, L, p*p*C], mask [n, L] (1 = removed)
        if student.norm_pix_loss:
            target = student.patchify(imgs)  # [n, L, p*p*C]
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean  # back to pixel space, patch by patch
        recon = student.unpatchify(pred)  # [n, C, H, W]
        p, c = student.patch_size, student.in_chans
        m = student.unpatchify(mask[:, :, None].expand(-1, -1, p * p * c))  # [n, C, H, W] 1 = removed
    masked = imgs * (1 - m)
    pasted = imgs * (1 - m) + recon * m
    return imgs, masked, recon, pasted, m, cfg


def plot_reconstructions(run: str | Path, path: str | Path, n_images: int = 6, seed: int = 0) -> Path:
    """Rows: images; columns: original | masked (removed patches grey) | reconstruction |
    reconstruction + visible (MAE's figure). One grey scale per row, from the original's range."""
    imgs, masked, recon, pasted, m, cfg = reconstruct(run, n_images, seed)
    synthetic = any(bool(mf.get("synthetic", False)) for _, mf in part_manifests(cfg.data.path))
    plt = pyplot()
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), squeeze=False)
    titles = ("original", f"masked ({cfg.model.mask_ratio:.0%})", "reconstruction", "reconstruction + visible")
    for i in range(n):
        lo, hi = float(imgs[i].min()), float(imgs[i].max())
        shown = (imgs[i], masked[i], recon[i], pasted[i])
        for j, (ax, im) in enumerate(zip(axes[i], shown)):
            a = im.mean(dim=0).numpy()  # [H, W] gray (3 channels: their mean)
            if j == 1:
                a = np.where(m[i, 0].numpy() > 0, (lo + hi) / 2, a)  # removed patches in mid grey
            ax.imshow(a, cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    tag = "SYNTHETIC phantoms - " if synthetic else ""
    fig.suptitle(f"{tag}{Path(run).name}: MAE reconstructions of fixed val images", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fasttrain plot", description="Loss curves and per-label AUC bars as PNGs.")
    p.add_argument("runs", nargs="+", help="run directories (several are overlaid)")
    p.add_argument("--out", help="output folder (default FIRST_RUN/plots)")
    args = p.parse_args(argv)
    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0
