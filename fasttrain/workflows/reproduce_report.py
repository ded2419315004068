"""`fasttrain reproduce`, its report: DIR/table2.md + table2.json beside the paper's Table 2,
per-label AUC tables, the transfer (external validation) table, stage costs and figures.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fasttrain.eval.plots import plot_runs, pyplot
from fasttrain.io import write_atomic, write_json_atomic
from fasttrain.train.runlog import read_metrics, save_figure
from fasttrain.workflows.reproduce_plan import DATASETS, PAPER, Plan, format_duration


def _fmt_auc(res: Optional[dict]) -> str:
    if not res or res.get("mauc") is None:
        return "-"
    ci = res.get("mauc_ci95")
    return f"{100 * res['mauc']:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def write_table(plan: Plan) -> dict:
    """DIR/table2.md + table2.json: mAUC with 95% CIs beside the paper's, per-label AUCs, figures,
    GPU-hours and images/s per stage. Numbers of a run on phantoms are labelled SYNTHETIC."""
    out = plan.out
    synthetic = any(s.synthetic for s in plan.sources.values())
    tag = "SYNTHETIC " if synthetic else ""
    rows, results = [], {}
    for row in [r for r in ("s", "b", "teacher_s", "teacher_b") if any(st.name.startswith(f"evaluate_{r}_")
                                                                      for st in plan.stages)]:
        entry = {"row": PAPER[row]["row"], "key": row}
        for d in DATASETS:
            f = out / "runs" / f"finetune_{row}_{d}" / "eval" / "results_test.json"
            res = json.loads(f.read_text()) if f.is_file() else None
            results[(row, d)] = res
            ours = 100 * res["mauc"] if res and res.get("mauc") is not None else None
            entry[d] = {"mauc": ours, "ci95": [100 * c for c in res["mauc_ci95"]] if res and res.get("mauc_ci95") else None,
                        "paper": PAPER[row][d], "diff": (ours - PAPER[row][d]) if ours is not None else None,
                        "n_images": res.get("n_images") if res else None, "synthetic": synthetic}
        rows.append(entry)
    transfer = []  # external validation: one dataset's fine-tune scored on the other's test split
    for st in plan.stages:
        if not st.name.startswith("transfer_"):
            continue
        row, src, _, dst = st.name[len("transfer_"):].rsplit("_", 3)
        f = out / "runs" / f"finetune_{row}_{src}" / f"eval_on_{dst}" / "results_test.json"
        res = json.loads(f.read_text()) if f.is_file() else None
        transfer.append({"row": PAPER[row]["row"], "key": row, "trained_on": src, "scored_on": dst,
                         "mauc": 100 * res["mauc"] if res and res.get("mauc") is not None else None,
                         "ci95": [100 * c for c in res["mauc_ci95"]] if res and res.get("mauc_ci95") else None,
                         "shared_labels": list(res["label_map"]["shared"]) if res else None,
                         "not_scored": res["label_map"]["not_scored_model_labels"] if res else None,
                         "n_images": res.get("n_images") if res else None, "result": res})
    stages = []
    for st in plan.stages:
        r = plan.runner.record(st.name)
        if r is not None:
            stages.append({**{k: r.get(k) for k in ("stage", "wall_s", "images_per_s", "steps", "resumed", "gpus")},
                           "gpu_hours": r["wall_s"] * r["gpus"] / 3600})  # every attempt counted
    figures = make_figures(plan)
    doc = {"synthetic": synthetic, "rows": rows, "stages": stages,
           "transfer": [{k: v for k, v in t.items() if k != "result"} for t in transfer],
           "gpu_hours_total": sum(s["gpu_hours"] for s in stages),
           "figures": [str(p.relative_to(out)) for p in figures], "notes": list(dict.fromkeys(plan.notes)),
           "per_label": {f"{r}/{d}": {n: e for n, e in res["labels"].items()} for (r, d), res in results.items() if res},
           "paper": PAPER}
    md = []
    if synthetic:
        md += ["> **SYNTHETIC phantoms, not radiographs.** Every number below is about procedurally drawn",
               "> phantoms; it shows the pipeline runs and learns, and says nothing about the paper's claims.", ""]
    md.append(f"# {tag}Table 2: mean AUC (%), ours beside the ETMAE paper's")
    md.append("")
    md.append("NIH ChestX-ray14: official test list; CheXpert: valid.csv. 95% CIs from "
              f"{plan.args.bootstrap} bootstrap resamples of the test images.")
    md.append("")
    md.append(f"| model | NIH {tag}(ours) | NIH paper | diff | CheXpert {tag}(ours) | CheXpert paper | diff |")
    md.append("| --- | --- | --- | --- | --- | --- | --- |")
    for e in rows:
        cells = []
        for d in DATASETS:
            res = results.get((e["key"], d))
            diff = e[d]["diff"]
            cells += [_fmt_auc(res), f"{e[d]['paper']:.1f}", f"{diff:+.1f}" if diff is not None else "-"]
        md.append(f"| {e['row']} | " + " | ".join(cells) + " |")
    for n in dict.fromkeys(plan.notes):
        md += ["", f"Note: {n}"]
    if transfer:
        where = {"nih": "NIH ChestX-ray14 test", "chexpert": "CheXpert valid.csv"}
        md += ["", f"## {tag}Transfer: fine-tuned on one dataset, scored on the other (shared labels)", "",
               "| model | fine-tuned on | scored on | mAUC (%) [95% CI] | shared labels | not scored |",
               "| --- | --- | --- | --- | --- | --- |"]
        for t in transfer:
            md.append(f"| {t['row']} | {where[t['trained_on']]} | {where[t['scored_on']]} | {_fmt_auc(t['result'])} | "
                      f"{', '.join(t['shared_labels'] or []) or '-'} | {', '.join(t['not_scored'] or []) or '-'} |")
    for d in DATASETS:
        keyed = [(e, results.get((e["key"], d))) for e in rows if results.get((e["key"], d))]
        if not keyed:
            continue
        names = list(keyed[0][1]["labels"])
        md += ["", f"## {tag}Per-label AUC (%), {'NIH ChestX-ray14 test' if d == 'nih' else 'CheXpert valid.csv'}", ""]
        md.append("| label | " + " | ".join(e["row"] for e, _ in keyed) + " |")
        md.append("| --- |" + " --- |" * len(keyed))
        for n in names:
            cells = []
            for _, res in keyed:
                le = res["labels"].get(n, {})
                if le.get("auc") is None:
                    cells.append("undefined")
                else:
                    ci = le.get("ci95")
                    cells.append(f"{100 * le['auc']:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""))
            md.append(f"| {n} | " + " | ".join(cells) + " |")
    md += ["", f"## {tag}Stages: wall time, GPU-hours, images/s", "",
           "| stage | wall | GPU-hours | images/s | steps | resumed |", "| --- | --- | --- | --- | --- | --- |"]
    for s in stages:
        ips = f"{s['images_per_s']:,.0f}" if s.get("images_per_s") else "-"
        md.append(f"| {s['stage']} | {format_duration(s['wall_s'])} | {s['gpu_hours']:.3f} | {ips} | {s.get('steps') or '-'} | "
                  f"{'yes' if s.get('resumed') else 'no'} |")
    md.append(f"| total | | {doc['gpu_hours_total']:.3f} | | | |")
    md.append("")
    md.append("GPU-hours = wall time x GPUs, summed over a stage's attempts (an interrupted attempt counts "
              "until the last record it logged).")
    if figures:
        md += ["", f"## {tag}Figures", ""] + [f"- [{p.relative_to(out)}]({p.relative_to(out)})" for p in figures]
    write_json_atomic(out / "table2.json", doc)
    write_atomic(out / "table2.md", "\n".join(md) + "\n")
    return doc


def make_figures(plan: Plan) -> list[Path]:
    """The paper's figures from the run logs: pre-training loss curves (L_MAE, L_dist), fine-tuning
    train loss and val mAUC (fasttrain plot), fine-tuning train/val loss per epoch, per-label AUC bars."""
    figs: list[Path] = []
    pre = [st.run_dir for st in plan.stages if st.kind == "pretrain" and (st.run_dir / "metrics.jsonl").is_file()]
    if pre:
        figs += plot_runs(pre, plan.out / "figures" / "pretrain")
    for d in DATASETS:
        runs = [st.run_dir for st in plan.stages if st.kind == "finetune" and st.name.endswith(f"_{d}")
                and (st.run_dir / "metrics.jsonl").is_file()]
        if runs:
            figs += plot_runs(runs, plan.out / "figures" / f"finetune_{d}")
            figs.append(plot_finetune_losses(runs, plan.out / "figures" / f"finetune_{d}" / "loss_train_val.png",
                                             synthetic=any(s.synthetic for s in plan.sources.values())))
    return figs


def plot_finetune_losses(runs: list[Path], path: Path, synthetic: bool) -> Path:
    """Fine-tuning BCE per epoch, train (mean of the epoch's logged steps) and validation, one colour
    per run: the paper's fine-tuning loss figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(runs):
        recs = read_metrics(run)
        train: dict[int, list[float]] = {}
        for r in recs:
            if r.get("phase") == "train" and isinstance(r.get("loss"), (int, float)):
                train.setdefault(r["epoch"], []).append(r["loss"])
        val = [(r["epoch"], r["loss"]) for r in recs if r.get("phase") == "val" and isinstance(r.get("loss"), (int, float))]
        c = f"C{i}"
        if train:
            ep = sorted(train)
            ax.plot([e + 1 for e in ep], [sum(train[e]) / len(train[e]) for e in ep], "-", color=c, label=f"{run.name} train")
        if val:
            ax.plot([e + 1 for e, _ in val], [v for _, v in val], "o--", color=c, label=f"{run.name} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("BCE")
    ax.set_title(("SYNTHETIC phantoms - " if synthetic else "") + "fine-tuning loss, train and validation")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
