"""`fasttrain ablate`: a grid of arms x seeds through chosen stages, with paired bootstrap CIs.

    fasttrain ablate --config configs/demo/student.yaml --finetune-config configs/demo/finetune.yaml \
        --grid distill.teacher_ckpt=null,RUN/checkpoints/last.pt --seeds 3 --out ABL \
        --stages pretrain,probe,finetune,evaluate --data.path=PACKED

Every arm x seed is a set of normal run folders (ABL/<arm>/seed<k>/pretrain, .../finetune), so
`fasttrain plot` and `evaluate` work on them. A one-key grid of numbers, e.g.
`--grid data.label_fraction=0.01,0.1,1.0` (the label-efficiency curve), also gets ABL/curve.png:
test mAUC against the value, mean over seeds with a bootstrap 95% CI. ABL/ablation.json and ABL/ablation.md hold, per arm
and metric, the mean and standard deviation over seeds and every seed's value, the wall time and
images/s of each stage, and for every pair of arms the paired difference (same seeds, same test
images) with a bootstrap 95% CI: the test images are resampled once per bootstrap draw, the same
draw for every run, and the mean over seeds of the per-seed mAUC differences is taken on each.

Resumable (fasttrain.workflows.stages): a finished stage leaves ABL/<arm>/seed<k>/stages/STAGE.json
and is reused; a training run with a last.pt but no summary.json (killed) resumes from it;
re-running the same command finishes the grid.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from fasttrain.config import ConfigError, build_config, parse_overrides, parse_scalar
from fasttrain.data.mixture import open_mixture
from fasttrain.eval.evaluate import evaluate_checkpoint
from fasttrain.eval.plots import pyplot
from fasttrain.eval.probe import ProbeSettings, run_probe
from fasttrain.io import write_atomic, write_json_atomic
from fasttrain.metrics import bootstrap_auc_matrix, mean_auc, mean_of_defined, per_label_auc
from fasttrain.train.finetune import run_finetune
from fasttrain.train.pretrain import run_pretrain
from fasttrain.train.runlog import save_figure
from fasttrain.workflows.stages import StageRunner

log = logging.getLogger("fasttrain.train")

STAGES = ("pretrain", "probe", "finetune", "evaluate")
# metric -> (stage that produces it, per-image test scores it leaves ({split}: data.test_split), or None)
METRICS = {"probe_mauc": ("probe", "pretrain/probe/scores_{split}.npy"),
           "finetune_val_mauc": ("finetune", None),
           "test_mauc": ("evaluate", "finetune/eval/scores_{split}.npy")}


class AblationError(ValueError):
    """A bad grid, stage list or key: raised before any run starts."""


# ----------------------------------------------------------------------------- the grid

def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    """['distill.alpha=0,1'] -> [('distill.alpha', [0, 1])] (values parsed like dotted overrides)."""
    if not items:
        raise AblationError("an empty grid: give at least one --grid KEY=V1,V2")
    grid = []
    for item in items:
        if "=" not in item:
            raise AblationError(f"--grid {item!r} must look like section.key=V1,V2")
        key, text = item.split("=", 1)
        key = key.lstrip("-")
        if len(key.split(".")) < 2:
            raise AblationError(f"--grid {item!r}: the key must be section.key (e.g. distill.alpha)")
        values = [parse_scalar(v) for v in text.split(",") if v != ""]
        if not values:
            raise AblationError(f"--grid {item!r} has no values")
        if any(k == key for k, _ in grid):
            raise AblationError(f"--grid key {key} given twice")
        grid.append((key, values))
    return grid


def parse_arms(items: list[str]) -> list[dict]:
    """['distill.teacher_ckpt=null', 'distill.teacher_ckpt=T distill.alpha=2'] -> one dict per arm:
    arms named one by one, for studies that are not a product of values (MAE only vs a teacher
    at several alphas). Assignments inside an arm are separated by spaces."""
    arms = []
    for item in items:
        arm: dict = {}
        for word in item.split():
            key, values = parse_grid([word])[0]
            if len(values) != 1:
                raise AblationError(f"--arm {item!r}: {key} has {len(values)} values; an arm sets one value per key")
            if key in arm:
                raise AblationError(f"--arm {item!r}: {key} given twice")
            arm[key] = values[0]
        if not arm:
            raise AblationError("an empty --arm: give KEY=VALUE assignments separated by spaces")
        arms.append(arm)
    return arms


def arm_name(assign: dict) -> str:
    """{'distill.teacher_ckpt': None} -> 'teacher_ckpt=none' (a folder name; paths by their run)."""
    parts = []
    for k, v in assign.items():
        if isinstance(v, str) and "/" in v:
            p = Path(v)
            v = p.parent.parent.name if p.parent.name == "checkpoints" else p.stem  # RUN/checkpoints/last.pt -> RUN
        parts.append(f"{k.split('.')[-1]}={'none' if v is None else v}")
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def arms_of(grid: list[tuple[str, list]]) -> list[dict]:
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[vals for _, vals in grid])]


def _nested(assign: dict) -> dict:
    out: dict = {}
    for dotted, v in assign.items():
        d = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def _merge(a: dict, b: dict) -> dict:
    out = json.loads(json.dumps(a))
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------- statistics

def paired_difference(labels: np.ndarray, scores_a: list[np.ndarray], scores_b: list[np.ndarray], *,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean over seeds of mAUC(a, seed) - mAUC(b, seed) on the same test images, with a paired
    bootstrap CI: every draw resamples the images once and scores every run on that resample.

    labels [N, C] (NaN = unknown); scores_a / scores_b: one [N, C] per seed, in seed order.
    mAUC = mean over the labels defined on the whole test set (as evaluate's)."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"paired difference needs the same seeds in both arms, got {len(scores_a)} and {len(scores_b)}")
    labels = np.asarray(labels, dtype=np.float64)
    names = [str(j) for j in range(labels.shape[1])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        point = per_label_auc(labels, scores_a[0], names)
        defined = [j for j, n in enumerate(names) if point[n] is not None]
        per_seed = [mean_of_defined(per_label_auc(labels, a, names)) - mean_of_defined(per_label_auc(labels, b, names))
                    for a, b in zip(scores_a, scores_b)]
        diffs = np.zeros(n_boot)  # [B]
        for a, b in zip(scores_a, scores_b):  # the same seed -> the same resamples for every run
            ma = np.nanmean(bootstrap_auc_matrix(labels, a, defined, n_boot=n_boot, seed=seed)[:, defined], axis=1)
            mb = np.nanmean(bootstrap_auc_matrix(labels, b, defined, n_boot=n_boot, seed=seed)[:, defined], axis=1)
            diffs += (ma - mb) / len(scores_a)
    diffs = diffs[~np.isnan(diffs)]
    q = 100 * (1 - level) / 2
    ci = [float(np.percentile(diffs, q)), float(np.percentile(diffs, 100 - q))] if diffs.size else None
    return {"mean_diff": float(np.mean(per_seed)), "per_seed": [float(d) for d in per_seed], "ci95": ci,
            "bootstrap": {"n": n_boot, "seed": seed, "level": level}}


def summarize(values: list[Optional[float]]) -> dict:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return {"mean": float(np.mean(vals)) if vals else None,
            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            "values": values, "n": len(vals)}


# ----------------------------------------------------------------------------- runs

def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


class Ablation:
    def __init__(self, out: str | Path, base: str, grid: list[tuple[str, list]], seeds: int, stages: list[str],
                 finetune_config: Optional[str] = None, overrides: Optional[list[str]] = None,
                 probe_settings=None, n_boot: int = 1000, arms: Optional[list[dict]] = None,
                 pretrained_from: Optional[str | Path] = None):
        """`grid` (a product of values) or `arms` (named one by one), not both. `pretrained_from`:
        another ablation folder with the same arms and seeds whose finished pretrain stages this one
        takes (fine-tuning variants of the same encoders: label fractions, recipes)."""
        self.out = Path(out)
        if bool(grid) == bool(arms):
            raise AblationError("give either --grid (a product of values) or --arm (arms one by one), not both"
                                if grid else "an empty grid: give at least one --grid KEY=V1,V2 or --arm KEY=V")
        self.grid, self.seeds, self.stages = grid, seeds, stages
        self.base, self.ft_base = base, finetune_config
        self.common = parse_overrides(list(overrides or []))
        self.probe_settings, self.n_boot = probe_settings, n_boot
        self.arms = arms or arms_of(grid)
        self.pretrained_from = Path(pretrained_from) if pretrained_from is not None else None
        self._check()

    @property
    def keys(self) -> list[str]:
        """The keys the arms set, in first-seen order."""
        return list(dict.fromkeys(k for arm in self.arms for k in arm))

    def _check(self) -> None:
        """Every stage name, grid key and config resolves before any run (errors name the key)."""
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise AblationError(f"--stages {','.join(self.stages)}: choose from {','.join(STAGES)}")
        if self.seeds < 1:
            raise AblationError(f"--seeds {self.seeds}: need at least 1")
        need_ft = any(s in self.stages for s in ("finetune", "evaluate"))
        if need_ft and self.ft_base is None:
            raise AblationError("stages finetune/evaluate need --finetune-config (e.g. configs/demo/finetune.yaml)")
        if "evaluate" in self.stages and "finetune" not in self.stages:
            raise AblationError("stage evaluate needs stage finetune in --stages")
        if "probe" in self.stages and "pretrain" not in self.stages:
            raise AblationError("stage probe needs stage pretrain in --stages (it probes the pre-trained encoder)")
        if self.pretrained_from is not None:
            if "pretrain" not in self.stages:
                raise AblationError("--pretrained-from takes the pretrain stage from another ablation: "
                                    "keep pretrain in --stages")
            missing = [str(self.source_dir(a, s)) for a in self.arms for s in range(self.seeds)
                       if self.source_record(self.source_dir(a, s), "pretrain") is None]
            if missing:
                raise AblationError(f"--pretrained-from {self.pretrained_from}: no finished pretrain stage in "
                                    + ", ".join(missing))
        names = [arm_name(a) for a in self.arms]
        if len(set(names)) != len(names):
            raise AblationError(f"two arms share a folder name: {names}")
        for arm in self.arms:
            try:
                if "pretrain" in self.stages:
                    build_config(self.base, _merge(self.common, _nested(arm)))
                if need_ft:
                    build_config(self.ft_base, _merge(self.common, _nested(arm)))
            except ConfigError as e:
                raise AblationError(f"grid arm {arm}: {e}") from None

    def run_dir(self, arm: dict, seed: int) -> Path:
        return self.out / arm_name(arm) / f"seed{seed}"

    def source_dir(self, arm: dict, seed: int) -> Path:
        """The arm x seed folder of --pretrained-from."""
        return self.pretrained_from / arm_name(arm) / f"seed{seed}"

    @staticmethod
    def source_record(d: Path, stage: str) -> Optional[dict]:
        """A finished stage's record in another ablation's arm x seed folder d, read without writing
        there: d/stages/STAGE.json, or the entry of an older folder's single d/stages.json (whose
        carry-over, stage_runner's, is left to that ablation's own re-run)."""
        rec = StageRunner(d / "stages").record(stage)
        if rec is not None:
            return rec
        old = (_read_json(d / "stages.json") or {}).get(stage)
        return {k: v for k, v in old.items() if k != "done"} if isinstance(old, dict) and old.get("done") else None

    def encoder(self, d: Path) -> str:
        """The pre-trained checkpoint of the arm x seed folder d (its own, or --pretrained-from's)."""
        return self.stage_runner(d).record("pretrain")["last"]

    @staticmethod
    def stage_runner(d: Path) -> StageRunner:
        """The stage records of one arm x seed: d/stages/STAGE.json once a stage finished. An
        ablation folder written with one d/stages.json for all stages ({stage: {"done": true, ...}})
        has its finished stages carried over once, so a re-run reuses them."""
        runner = StageRunner(d / "stages", say=lambda line: log.info("ablate: %s/%s: %s", d.parent.name, d.name, line))
        old = _read_json(d / "stages.json")
        if old is not None:
            runner.folder.mkdir(parents=True, exist_ok=True)
            for stage, rec in old.items():
                if isinstance(rec, dict) and rec.get("done") and not runner.is_done(stage):
                    write_json_atomic(runner.done_path(stage), {k: v for k, v in rec.items() if k != "done"})
            (d / "stages.json").replace(d / "stages.json.carried-over")
        return runner

    def records(self, arm: dict, seed: int) -> dict:
        """stage -> its record, for the stages of this arm x seed that finished."""
        runner = self.stage_runner(self.run_dir(arm, seed))
        return {st: r for st in self.stages if (r := runner.record(st)) is not None}

    def run_all(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "plan.json", {"grid": self.grid, "arms": self.arms, "seeds": self.seeds,
                                                   "stages": self.stages,
                                                   "config": self.base, "finetune_config": self.ft_base,
                                                   "overrides": self.common})
        for seed in range(self.seeds):  # seed-major: an interrupted grid has every arm at the same seeds
            for arm in self.arms:
                self.run_one(arm, seed)
        return self.report()

    def run_one(self, arm: dict, seed: int) -> dict:
        """Every stage of one arm x seed (those finished earlier are reused); stage -> record."""
        d = self.run_dir(arm, seed)
        runner = self.stage_runner(d)
        over = _merge(self.common, _merge(_nested(arm), {"run": {"seed": seed}}))
        recs = {}
        for stage in self.stages:
            work = functools.partial(getattr(self, f"_{stage}"), d, over, seed)
            recs[stage] = runner.run(stage, work, run_dir=d / stage if stage in ("pretrain", "finetune") else None)
        return recs

    def _train(self, kind: str, yaml: str, run: Path, over: dict) -> dict:
        cfg = build_config(yaml, _merge(over, {"run": {"out": str(run)}}))
        done = _read_json(run / "summary.json")
        if done is not None:
            return done
        # a killed run continues (from the newest checkpoint that verifies); a new one starts fresh
        if kind == "pretrain":
            return run_pretrain(cfg, resume="auto")
        return run_finetune(cfg, resume="auto")

    def _pretrain(self, d: Path, over: dict, seed: int) -> dict:
        if self.pretrained_from is not None:
            src = self.pretrained_from / d.relative_to(self.out)
            rec = self.source_record(src, "pretrain")
            return {"images_per_s": rec.get("images_per_s"), "last": rec["last"], "pretrained_from": str(src)}
        s = self._train("pretrain", self.base, d / "pretrain", over)
        return {"images_per_s": s.get("images_per_s"), "last": s["last"]}

    def _probe(self, d: Path, over: dict, seed: int) -> dict:
        cfg = build_config(self.base, over)
        s = self.probe_settings or ProbeSettings()
        s = type(s)(**{**s.__dict__, "seed": seed})
        res = run_probe(self.encoder(d), cfg.data.path, train_split=cfg.data.train_split,
                        test_split=cfg.data.test_split, out=d / "pretrain" / "probe", settings=s, n_boot=self.n_boot)
        n = res["n_train"] + res["n_images"]
        return {"probe_mauc": res["mauc"], "images_per_s": n / max(res["time_s"]["features"], 1e-9),
                "time_s": res["time_s"]}

    def _finetune(self, d: Path, over: dict, seed: int) -> dict:
        if "pretrain" in self.stages:
            over = _merge(over, {"model": {"init": self.encoder(d)}})
        s = self._train("finetune", self.ft_base, d / "finetune", over)
        return {"images_per_s": s.get("images_per_s"),
                "finetune_val_mauc": s.get("best_val_mauc"), "best": s.get("best") or s.get("last")}

    def _evaluate(self, d: Path, over: dict, seed: int) -> dict:
        cfg = build_config(self.ft_base, over)
        ft = self.stage_runner(d).record("finetune")
        res = evaluate_checkpoint(ft["best"], cfg.data.path, cfg.data.test_split, d / "finetune" / "eval",
                                  n_boot=self.n_boot, seed=0)
        return {"test_mauc": res["mauc"], "images_per_s": res["images_per_s"]}

    # -- the report ----------------------------------------------------------------------------

    def report(self) -> dict:
        arms_out = {}
        for arm in self.arms:
            name = arm_name(arm)
            recs = [self.records(arm, s) for s in range(self.seeds)]
            metrics = {}
            for m, (stage, _) in METRICS.items():
                if stage in self.stages:
                    metrics[m] = summarize([r.get(stage, {}).get(m) for r in recs])
            stages = {st: {"wall_s": summarize([r.get(st, {}).get("wall_s") for r in recs]),
                           "images_per_s": summarize([r.get(st, {}).get("images_per_s") for r in recs])}
                      for st in self.stages}
            arms_out[name] = {"assign": arm, "metrics": metrics, "stages": stages,
                              "complete": all(st in r for r in recs for st in self.stages)}
        pairs = []
        names = list(arms_out)
        labels = None
        test_split = self._data_cfg().test_split
        for m, (stage, rel) in METRICS.items():
            if rel is None or stage not in self.stages:
                continue
            rel = rel.format(split=test_split)
            for a, b in itertools.combinations(range(len(self.arms)), 2):
                fa = [self.run_dir(self.arms[a], s) / rel for s in range(self.seeds)]
                fb = [self.run_dir(self.arms[b], s) / rel for s in range(self.seeds)]
                if not all(f.is_file() for f in fa + fb):
                    continue
                if labels is None:
                    labels = self._test_labels()
                res = paired_difference(labels, [np.load(f) for f in fa], [np.load(f) for f in fb],
                                        n_boot=self.n_boot, seed=0)
                pairs.append({"metric": m, "a": names[a], "b": names[b], **res})
        report = {"grid": self.grid, "keys": self.keys, "seeds": self.seeds, "stages": self.stages,
                  "arms": arms_out, "pairs": pairs,
                  "synthetic": self._synthetic()}
        curve = self.curve(labels)
        if curve is not None:
            report["curve"] = curve
            report["curve"]["plot"] = str(plot_curve(curve, self.out / "curve.png", report["synthetic"]))
        write_json_atomic(self.out / "ablation.json", report)
        write_atomic(self.out / "ablation.md", format_markdown(report))
        return report

    def curve(self, labels: Optional[np.ndarray]) -> Optional[dict]:
        """A one-key grid of numbers (data.label_fraction=0.01,0.1,1.0: the label-efficiency curve)
        -> per value and test metric, the mean over seeds and its bootstrap 95% CI (the test images
        resampled, the same draw for every seed, the seeds' mAUC averaged on each draw)."""
        if len(self.grid) != 1 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          for v in self.grid[0][1]):
            return None
        key = self.grid[0][0]
        test_split = self._data_cfg().test_split
        points = {}
        for m, (stage, rel) in METRICS.items():
            if rel is None or stage not in self.stages:
                continue
            rel = rel.format(split=test_split)
            rows = []
            for arm in self.arms:
                files = [self.run_dir(arm, s) / rel for s in range(self.seeds)]
                if not all(f.is_file() for f in files):
                    continue
                if labels is None:
                    labels = self._test_labels()
                mean, ci = seed_mean_ci(labels, [np.load(f) for f in files], n_boot=self.n_boot, seed=0)
                rows.append({"value": arm[key], "arm": arm_name(arm), "mean": mean, "ci95": ci, "seeds": self.seeds})
            if rows:
                points[m] = sorted(rows, key=lambda r: r["value"])
        return {"key": key, "points": points} if points else None

    def _data_cfg(self):
        return build_config(self.ft_base or self.base, self.common).data

    def _test_labels(self) -> np.ndarray:
        """The test split's labels [N, C], in the order the probe and evaluate scored it (one packed
        dataset or a mixture's parts)."""
        d = self._data_cfg()
        return np.asarray(open_mixture(d.path, d.test_split, None, train_split=d.test_split).labels, np.float64)

    def _synthetic(self) -> bool:
        d = self._data_cfg()
        try:
            return bool(open_mixture(d.path, d.test_split, None, train_split=d.test_split).synthetic)
        except Exception:
            return False


def seed_mean_ci(labels: np.ndarray, scores: list[np.ndarray], *, n_boot: int, seed: int,
                 level: float = 0.95) -> tuple[Optional[float], Optional[list[float]]]:
    """Mean over seeds of the test mAUC, and its percentile bootstrap CI: every seed's scores are
    resampled with the same image draw (bootstrap_auc_matrix with one seed), the seeds' mAUCs
    averaged on each draw."""
    labels = np.asarray(labels, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        point = [mean_auc(labels, np.asarray(s, np.float64), [str(j) for j in range(labels.shape[1])])
                 for s in scores]
        if any(p is None for p in point):
            return None, None
        per_seed = [np.nanmean(bootstrap_auc_matrix(labels, np.asarray(s, np.float64), range(labels.shape[1]),
                                                    n_boot=n_boot, seed=seed), axis=1) for s in scores]  # [B] each
        draws = np.mean(per_seed, axis=0)  # [B]
    draws = draws[~np.isnan(draws)]
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    ci = [float(np.percentile(draws, lo)), float(np.percentile(draws, hi))] if draws.size else None
    return float(np.mean(point)), ci


def plot_curve(curve: dict, path: Path, synthetic: bool) -> Path:
    """The metric against the grid value with its 95% CI (log x for a fraction grid spanning >= 10x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    values = []
    for m, rows in curve["points"].items():
        x = np.array([r["value"] for r in rows], np.float64)
        y = np.array([r["mean"] if r["mean"] is not None else np.nan for r in rows])
        lo = np.array([r["ci95"][0] if r["ci95"] else np.nan for r in rows])
        hi = np.array([r["ci95"][1] if r["ci95"] else np.nan for r in rows])
        ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=f"{m} (95% CI)")
        values += x.tolist()
    if values and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    key = curve["key"]
    ax.set_xlabel(key + (" (share of the training split's patients)" if key == "data.label_fraction" else ""))
    ax.set_ylabel("mAUC")
    what = "label efficiency" if key == "data.label_fraction" else f"mAUC against {key}"
    ax.set_title(("SYNTHETIC phantoms: " if synthetic else "") + what, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _fmt(v, digits=4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_markdown(r: dict) -> str:
    tag = "SYNTHETIC phantoms: " if r.get("synthetic") else ""
    lines = [f"# {tag}ablation over {', '.join(r.get('keys') or [k for k, _ in r['grid']])} ({r['seeds']} seeds, stages "
             f"{','.join(r['stages'])})", ""]
    metric_names = sorted({m for a in r["arms"].values() for m in a["metrics"]}, key=list(METRICS).index)
    lines += ["| arm | " + " | ".join(f"{m} mean ± std" for m in metric_names) + " | per-seed values | complete |",
              "|---|" + "---|" * len(metric_names) + "---|---|"]
    for name, a in r["arms"].items():
        cells = [f"{_fmt(a['metrics'][m]['mean'])} ± {_fmt(a['metrics'][m]['std'])}" for m in metric_names]
        seeds = "; ".join(f"{m}: " + ", ".join(_fmt(v) for v in a["metrics"][m]["values"]) for m in metric_names)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seeds} | {'yes' if a['complete'] else 'no'} |")
    lines += ["", "Wall time (s) and images/s per stage, mean over seeds:", "",
              "| arm | " + " | ".join(f"{s} s | {s} img/s" for s in r["stages"]) + " |",
              "|---|" + "---|---|" * len(r["stages"])]
    for name, a in r["arms"].items():
        cells = [f"{_fmt(a['stages'][s]['wall_s']['mean'], 1)} | {_fmt(a['stages'][s]['images_per_s']['mean'], 0)}"
                 for s in r["stages"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if r.get("curve"):
        lines += ["", f"Curve over {r['curve']['key']} (mean over seeds, bootstrap 95% CI over test images): "
                      f"{r['curve']['plot']}", "", "| metric | value | mean | 95% CI |", "|---|---|---|---|"]
        for m, rows in r["curve"]["points"].items():
            for row in rows:
                ci = f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]" if row["ci95"] else "-"
                lines.append(f"| {m} | {row['value']:g} | {_fmt(row['mean'])} | {ci} |")
    if r["pairs"]:
        lines += ["", "Paired differences (a - b; same seeds, same test images; bootstrap 95% CI over test images):", "",
                  "| metric | a | b | mean diff | 95% CI | per seed |", "|---|---|---|---|---|---|"]
        for p in r["pairs"]:
            ci = f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p["ci95"] else "-"
            lines.append(f"| {p['metric']} | {p['a']} | {p['b']} | {p['mean_diff']:+.4f} | {ci} | "
                         + ", ".join(f"{v:+.4f}" for v in p["per_seed"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """A bad grid raises AblationError (exit 2); a stage's own error propagates: the `fasttrain`
    command's exception table turns each into its exit code."""
    p = argparse.ArgumentParser(prog="fasttrain ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="pre-training YAML of every arm")
    p.add_argument("--finetune-config", help="fine-tuning YAML (stages finetune/evaluate)")
    p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2 (repeat for a product grid; null = None)")
    p.add_argument("--arm", action="append", default=[],
                   help="one arm as 'KEY=V KEY2=V2' (repeat for each arm; instead of --grid)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="pretrain,probe,finetune,evaluate")
    p.add_argument("--probe-epochs", type=int, default=90)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--pretrained-from", metavar="ABL",
                   help="take each arm x seed's finished pretrain stage from this ablation folder (same arms, "
                        "seeds) instead of pre-training again: fine-tuning variants of the same encoders")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --section.key=value)")
    abl = Ablation(args.out, args.config, parse_grid(args.grid) if args.grid else [], args.seeds,
                   args.stages.split(","), finetune_config=args.finetune_config, overrides=rest,
                   probe_settings=ProbeSettings(epochs=args.probe_epochs), n_boot=args.bootstrap,
                   arms=parse_arms(args.arm), pretrained_from=args.pretrained_from)
    abl.run_all()
    print((Path(args.out) / "ablation.md").read_text())
    print(f"{Path(args.out) / 'ablation.json'}")
    return 0
