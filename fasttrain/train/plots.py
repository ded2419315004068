"""`fasttrain plot RUN...`: the figures of a run (or several, overlaid) as PNGs.

- losses.png: L_MAE and L_dist of pre-training runs in separate panels (the paper's Fig. 2-3
  style: the distillation term falling while reconstruction converges), train and val;
- finetune.png: fine-tuning BCE and validation mAUC per epoch;
- auc_bars.png: per-label AUC of each run's evaluation results (eval/results_*.json), with the
  95% bootstrap CI as error bars (the paper's per-label comparison, Fig. 4 style).
"""
from __future__ import annotations

import json
from pathlib import Path

from fasttrain.train.runlog import read_metrics


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


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
    plt = _plt()
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
        written.append(_save(fig, out / "losses.png"))
        plt.close(fig)

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
        written.append(_save(fig, out / "finetune.png"))
        plt.close(fig)

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
        written.append(_save(fig, out / "auc_bars.png"))
        plt.close(fig)
    if not written:
        raise ValueError(f"nothing to plot in {', '.join(map(str, runs))}: no logged steps and no eval results yet")
    return written
