"""`fasttrain reproduce`, its plan: the sources, the stages and the checks before any work.

Every input is checked before the first stage runs: each dataset release (or a dataset packed
earlier), the teacher checkpoints (loaded strictly, as their pre-training will), the free disk.
The Plan lists every stage of the experiments asked for, each a `fasttrain` command line with
its dotted overrides, its images, epochs, steps and global batch; format_plan prints it with the
wall-time estimates of fasttrain.workflows.reproduce_estimate.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from fasttrain.config import build_config, load_yaml
from fasttrain.converters.chexpert import chexpert_release_facts, chexpert_release_root
from fasttrain.converters.common import ConvertError
from fasttrain.converters.nih import find_csv, nih_release_facts, xiao_split_counts
from fasttrain.format.packed import read_manifest
from fasttrain.train.builders import build_pretrain_model
from fasttrain.workflows.stages import StageRunner

# The paper's Table 2 (mAUC in %, NIH ChestX-ray14 official test / CheXpert valid.csv).
PAPER = {
    "s": {"row": "ViT-T distilled from ViT-S", "nih": 78.1, "chexpert": 86.9},
    "b": {"row": "ViT-T distilled from ViT-B", "nih": 78.2, "chexpert": 87.8},
    "teacher_s": {"row": "teacher ViT-S (Xiao et al.)", "nih": 82.3, "chexpert": 89.2},
    "teacher_b": {"row": "teacher ViT-B (Xiao et al.)", "nih": 83.0, "chexpert": 89.3},
}
EXPERIMENTS = {1: ("s", "nih"), 2: ("s", "chexpert"), 3: ("b", "nih"), 4: ("b", "chexpert")}
DATASETS = ("nih", "chexpert")
# Image counts of the public releases (docs: /work/shared/DATASETS.md); a source of another size is
# reported in the plan (phantoms, a subset), never silently treated as the release.
RELEASE_IMAGES = {"nih": 112_120, "chexpert": 223_414}
# Xiao et al.'s val_official.txt holds 11,212 of NIH's 86,524 train_val images (13%): without their
# split files we carve the same fraction, patient-disjoint. CheXpert: the paper is silent; 5% of
# train (never valid.csv, the test set) picks best.pt and draws the val mAUC curve.
VAL_FRACTION = {"nih": 0.13, "chexpert": 0.05}
PACK_SIZE = 256  # paper: images resized to 256 px, trained on 224 crops (--pack-size: tests only)


class ReproduceError(ValueError):
    """Bad input found before any work: names the file or option and what is wrong."""


def configs_dir() -> Path:
    d = Path(__file__).resolve().parents[2] / "configs" / "paper"
    if not d.is_dir():
        raise ReproduceError(f"{d}: the paper's configs are missing (run from a fasttrain checkout)")
    return d


# ----------------------------------------------------------------------------- sources

@dataclass
class Source:
    """One dataset as given on the command line: a release folder to convert, or already packed."""
    name: str  # nih | chexpert
    path: Path
    packed: bool  # True: `path` holds a manifest.json (converted earlier, reused as is)
    images: int  # images that will be packed (NIH: all; CheXpert: frontal train + valid)
    splits: dict  # split -> images after conversion (train / val / test), estimated for a source
    synthetic: bool
    note: str = ""

    pack_size: int = PACK_SIZE

    @property
    def pack_bytes(self) -> int:
        return 0 if self.packed else self.images * self.pack_size ** 2  # raw: uint8, 1 channel


def _is_synthetic_source(path: Path) -> bool:
    for readme in (path / "README.txt", *path.glob("*/README.txt")):
        if readme.is_file() and "SYNTHETIC" in readme.read_text(errors="replace")[:400]:
            return True
    return False


def packed_resize_note(name: str, path: Path, wanted: str) -> Optional[str]:
    """A plan note when a dataset packed earlier fitted its frames to the square otherwise than
    --resize asks (a manifest without a 'resize' entry means squashed); None when they agree."""
    mode = read_manifest(path).get("resize", "squash")
    if mode == wanted:
        return None
    return (f"{name}: packed earlier with --resize {mode}, not {wanted}: its frames are fitted otherwise "
            f"(convert it again to follow --resize)")


def _packed_source(name: str, path: Path) -> Source:
    m = read_manifest(path)
    if not str(m.get("dataset", "")).startswith("nih" if name == "nih" else "chexpert"):
        raise ReproduceError(f"--{name} {path}: a packed '{m.get('dataset')}' dataset, not {name}")
    for s in ("train", "test"):
        if s not in m["splits"]:
            raise ReproduceError(f"--{name} {path}: the packed dataset has no '{s}' split (it has {list(m['splits'])})")
    splits = {s: meta["count"] for s, meta in m["splits"].items()}
    synthetic = bool(m.get("synthetic")) or "synthetic" in str(m.get("dataset", ""))
    src = m.get("source", {})
    if isinstance(src, dict) and src.get("path") and Path(src["path"]).is_dir():
        synthetic = synthetic or _is_synthetic_source(Path(src["path"]))
    return Source(name, path, True, sum(splits.values()), splits, synthetic, note="packed earlier, reused")


def _release_or_packed(name: str, path: Path, read_facts: Callable[[Path], dict], other: str,
                       looks_like_other: Callable[[Path], bool]) -> Source | dict:
    """--NAME PATH: a packed folder (its Source) or a raw release (its converter's facts); a bad one
    is a ReproduceError naming the flag, with a hint when it looks like the other dataset."""
    if not path.is_dir():
        raise ReproduceError(f"--{name} {path}: folder not found")
    if (path / "manifest.json").is_file():
        return _packed_source(name, path)
    try:
        return read_facts(path)
    except ConvertError as e:
        hint = f" (it looks like {other})" if looks_like_other(path) else ""
        raise ReproduceError(f"--{name} {e}{hint}") from None


def inspect_nih(path: Path, split_dir: Optional[Path] = None) -> Source:
    """An NIH ChestX-ray14 release folder (or a packed one): its image counts, or a clear error."""
    path = Path(path)
    facts = _release_or_packed("nih", path, nih_release_facts, "CheXpert: pass it as --chexpert",
                               lambda p: find_csv(p) is None and chexpert_release_root(p) is not None)
    if isinstance(facts, Source):
        return facts
    if split_dir is not None:
        try:
            splits = xiao_split_counts(Path(split_dir))
        except ConvertError as e:
            raise ReproduceError(f"--nih-split-dir {e}") from None
    else:
        val = round(facts["train_val"] * VAL_FRACTION["nih"])
        splits = {"train": facts["train_val"] - val, "val": val, "test": facts["test"]}
    images = facts["images"]
    note = "" if images == RELEASE_IMAGES["nih"] else f"{images:,} images (the release has {RELEASE_IMAGES['nih']:,})"
    return Source("nih", path, False, images, splits, _is_synthetic_source(path), note)


def inspect_chexpert(path: Path) -> Source:
    """A CheXpert v1.0 release folder (the folder or its CheXpert-v1.0-small parent), or a packed one."""
    path = Path(path)
    facts = _release_or_packed("chexpert", path, chexpert_release_facts, "NIH ChestX-ray14: pass it as --nih",
                               lambda p: chexpert_release_root(p) is None and find_csv(p) is not None)
    if isinstance(facts, Source):
        return facts
    train, test = facts["train_frontal"], facts["valid_frontal"]
    val = round(train * VAL_FRACTION["chexpert"])
    rows = facts["train_rows"]
    note = "" if rows == RELEASE_IMAGES["chexpert"] else f"{rows:,} train.csv rows (the release has {RELEASE_IMAGES['chexpert']:,})"
    return Source("chexpert", path, False, train + test, {"train": train - val, "val": val, "test": test},
                  _is_synthetic_source(path) or _is_synthetic_source(facts["root"]), note)


def disk_free(path: Path) -> int:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk(sources: list[Source], out: Path) -> None:
    """Enough free disk for the packed datasets (raw uint8 at 256 px) + 10%, before converting."""
    need = sum(s.pack_bytes for s in sources)
    if not need:
        return
    free = disk_free(out)
    if free < need * 1.1:
        parts = ", ".join(f"{s.name} {s.images:,} images {s.pack_bytes / 1e9:.1f} GB" for s in sources if s.pack_bytes)
        raise ReproduceError(f"not enough disk at {out}: packing at {sources[0].pack_size} px (raw) needs {need / 1e9:.1f} GB "
                             f"+ 10% margin = {need * 1.1 / 1e9:.1f} GB ({parts}); {free / 1e9:.1f} GB free")


# ----------------------------------------------------------------------------- stages

@dataclass
class Stage:
    name: str
    kind: str  # convert | pretrain | finetune | evaluate
    argv: list[str]  # a `fasttrain` command line (without the program name)
    run_dir: Optional[Path] = None
    images: int = 0  # images per epoch (train) or evaluated / converted
    epochs: int = 1
    steps: int = 0
    batch: int = 0  # global batch
    est_s: Optional[float] = None
    distributed: bool = False  # under torchrun when --gpus > 1
    needs: list[str] = field(default_factory=list)
    config: Optional[object] = None  # the resolved Config (training stages)

    @property
    def trains(self) -> bool:
        return self.kind in ("pretrain", "finetune")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _override_args(d: dict) -> list[str]:
    return [f"--{k}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}" for k, v in d.items()]


def parse_user_overrides(items: list[str]) -> list[tuple[str, str, str]]:
    """['--finetune_*:model.depth=2', '--model.img_size=32'] -> [(glob, key, value)] (no scope = '*')."""
    out = []
    for a in items:
        s = a[2:] if a.startswith("--") else a
        scope, _, rest = s.rpartition(":") if ":" in s.split("=", 1)[0] else ("*", "", s)
        if "=" not in rest or "." not in rest.split("=", 1)[0]:
            raise ReproduceError(f"override '{a}' must look like --section.key=value or --STAGE_GLOB:section.key=value")
        key, value = rest.split("=", 1)
        out.append((scope, key, value))
    return out


def mixture_spec(parts: list[Path]) -> str:
    """data.path of the paper's pre-training: NIH train + CheXpert train (a list of PATH:SPLIT parts)."""
    return ",".join(f"{p}:train" for p in parts)


class Plan:
    """Every stage of the reproduction, in order, with its inputs resolved and its size known."""

    def __init__(self, args, sources: dict[str, Source]):
        self.args, self.sources = args, sources
        self.out = Path(args.out)
        self.gpus = max(1, args.gpus)
        self.experiments = args.experiments
        self.students = [t for t in ("s", "b") if any(EXPERIMENTS[e][0] == t for e in self.experiments)]
        self.datasets = [d for d in DATASETS if any(EXPERIMENTS[e][1] == d for e in self.experiments)]
        self.user = parse_user_overrides(args.overrides)
        self.packed = {d: (s.path if s.packed else self.out / "packed" / d) for d, s in sources.items()}
        self.notes: list[str] = []
        self.stages: list[Stage] = []
        # DIR/stages/NAME.json once a stage finished (skipped when re-run)
        self.runner = StageRunner(self.out / "stages", say=lambda line: print(f"\n=== {line}", flush=True))
        self.pretrain_data = self._pretrain_data()
        self._build()

    # -- inputs --------------------------------------------------------------------------------

    def _pretrain_data(self) -> str:
        """The paper pre-trains on NIH train + CheXpert train: one mixture (PATH:SPLIT parts)."""
        return mixture_spec([self.packed[d] for d in DATASETS])

    def _user_over(self, stage: str) -> list[str]:
        return [f"--{k}={v}" for g, k, v in self.user if fnmatch.fnmatch(stage, g)]

    def _common_over(self) -> list[str]:
        over = []
        if self.args.quiet:
            over.append("--run.progress=false")
        return over

    @staticmethod
    def _config(yaml_name: str, over: list[str]):
        """The stage's resolved Config, exactly as its command will build it."""
        return build_config(configs_dir() / yaml_name, over)

    # -- the stages ----------------------------------------------------------------------------

    def _build(self) -> None:
        for d in DATASETS:
            s = self.sources[d]
            if s.packed:
                note = packed_resize_note(d, s.path, self.args.resize)
                if note:
                    self.notes.append(note)
                continue
            argv = ["convert", d, "--src", str(s.path), "--out", str(self.packed[d]), "--format", *self.args.formats,
                    "--size", str(self.args.pack_size), "--resize", self.args.resize, "--seed", str(self.args.seed)]
            if d == "nih" and self.args.nih_split_dir:
                argv += ["--split-dir", str(self.args.nih_split_dir)]
            else:
                argv += ["--val-fraction", str(VAL_FRACTION[d])]
            if d == "chexpert":
                argv += ["--uncertain", "paper", "--labels", "competition", "--views", "frontal"]
            if self.args.quiet:
                argv.append("--no-progress")
            self.stages.append(Stage(f"convert_{d}", "convert", argv, images=s.images))
        teachers = {"s": self.args.teacher_s, "b": self.args.teacher_b}
        for t in self.students:
            name = f"pretrain_{t}"
            yaml_name = f"pretrain_vit{t}_to_vitt.yaml"
            over = [f"--data.path={self.pretrain_data}", f"--run.seed={self.args.seed}",
                    *self._common_over(), *self._user_over(name)]
            run = self.out / "runs" / name
            tck = [f"--distill.teacher_ckpt={teachers[t]}"] if teachers[t] else []  # what --teacher sets
            cfg = self._config(yaml_name, over + tck)
            images = sum(self.sources[d].splits["train"] for d in DATASETS if str(self.packed[d]) in self.pretrain_data)
            argv = ["pretrain", "--config", str(configs_dir() / yaml_name), "--out", str(run),
                    "--teacher", str(teachers[t]), *over]
            self.stages.append(self._train_stage(name, "pretrain", argv, run, cfg, images,
                                                 needs=[f"convert_{d}" for d in DATASETS]))
        rows = list(self.students) + ([f"teacher_{t}" for t in self.students] if self.args.with_teachers else [])
        for row in rows:
            for d in self.datasets:
                if not any(EXPERIMENTS[e] == (row.replace("teacher_", ""), d) for e in self.experiments):
                    continue
                self._finetune_and_eval(row, d, teachers)
            self._transfer(row)

    def _finetune_and_eval(self, row: str, d: str, teachers: dict) -> None:
        name = f"finetune_{row}_{d}"
        run = self.out / "runs" / name
        over = [f"--data.path={self.packed[d]}", f"--run.seed={self.args.seed}"]
        if row.startswith("teacher_"):
            t = row.split("_")[1]
            over += _override_args(_flatten(load_yaml(configs_dir() / f"finetune_teacher_vit{t}.yaml")))
            init, needs = str(teachers[t]), [f"convert_{d}"]
        else:
            init, needs = str(self.out / "runs" / f"pretrain_{row}" / "checkpoints" / "last.pt"), [f"convert_{d}", f"pretrain_{row}"]
        if "val" not in self.sources[d].splits:  # a set packed earlier without a val split: last.pt is evaluated
            over.append("--data.val_split=null")
            self.notes.append(f"{d}: the packed set has no 'val' split, so no best.pt: the last checkpoint is evaluated")
        over += self._common_over() + self._user_over(name)
        yaml_name = f"finetune_{d}.yaml"
        cfg = self._config(yaml_name, over)
        argv = ["finetune", "--config", str(configs_dir() / yaml_name), "--out", str(run), "--init", init, *over]
        self.stages.append(self._train_stage(name, "finetune", argv, run, cfg, self.sources[d].splits["train"],
                                             needs=needs))
        ev = f"evaluate_{row}_{d}"
        argv = ["evaluate", "--ckpt", str(run / "checkpoints" / "best.pt"), "--data", str(self.packed[d]),
                "--split", "test", "--out", str(run / "eval"), "--bootstrap", str(self.args.bootstrap),
                "--seed", str(self.args.seed), "--json"]
        self.stages.append(Stage(ev, "evaluate", argv, run_dir=run, images=self.sources[d].splits["test"],
                                 needs=[name], config=cfg))

    def _transfer(self, row: str) -> None:
        """External validation (Zech et al. 2018): the model fine-tuned on one dataset scored on the
        other's test split, on the labels both name (fasttrain.labelmap), when both fine-tunes run."""
        names = {st.name for st in self.stages}
        for src, dst in (("nih", "chexpert"), ("chexpert", "nih")):
            ft = f"finetune_{row}_{src}"
            if ft not in names or f"finetune_{row}_{dst}" not in names:
                continue
            run = self.out / "runs" / ft
            argv = ["evaluate", "--ckpt", str(run / "checkpoints" / "best.pt"), "--data", str(self.packed[dst]),
                    "--split", "test", "--out", str(run / f"eval_on_{dst}"), "--bootstrap", str(self.args.bootstrap),
                    "--seed", str(self.args.seed), "--json"]
            self.stages.append(Stage(f"transfer_{row}_{src}_to_{dst}", "evaluate", argv, run_dir=run,
                                     images=self.sources[dst].splits["test"], needs=[ft, f"convert_{dst}"],
                                     config=self.stage(ft).config))

    def _train_stage(self, name, kind, argv, run, cfg, images, needs) -> Stage:
        global_batch = cfg.data.batch_size * cfg.optim.accum_steps * self.gpus
        steps_per_epoch = max(1, images // global_batch)
        steps = cfg.optim.epochs * steps_per_epoch
        if cfg.run.max_steps is not None:
            steps = min(steps, cfg.run.max_steps)
        return Stage(name, kind, argv, run_dir=run, images=images, epochs=cfg.optim.epochs, steps=steps,
                     batch=global_batch, distributed=self.gpus > 1, needs=needs, config=cfg)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


# ----------------------------------------------------------------------------- pre-flight

def check_teachers(plan: Plan) -> dict[str, object]:
    """Load each teacher the plan needs strictly, exactly as its pre-training will (builders.py):
    a missing or wrong-size checkpoint fails here, before any conversion or step. Returns the
    built pre-training models (reused by the step measurement)."""
    models = {}
    for t, flag in (("s", "--teacher-s"), ("b", "--teacher-b")):
        if t not in plan.students:  # --with-teachers fine-tunes only the teachers of the students run
            continue
        path = getattr(plan.args, f"teacher_{t}")
        if path is None:
            raise ReproduceError(f"{flag} is required for experiments {plan.args.experiments_text} "
                                 f"(Xiao et al.'s vit-{t}_CXR_{'0.3' if t == 's' else '0.5'}M_mae.pth)")
        if not Path(path).is_file():
            raise ReproduceError(f"{flag} {path}: teacher checkpoint not found")
        stage = plan.stage(f"pretrain_{t}")
        try:
            models[t] = build_pretrain_model(stage.config)
        except Exception as e:  # CheckpointError / ConfigError: named for the flag that gave the file
            raise ReproduceError(f"{flag} {path}: {e}") from e
    return models


def format_duration(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1:
        return "<1 s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def format_plan(plan: Plan, info: dict) -> str:
    synth = any(s.synthetic for s in plan.sources.values())
    lines = []
    if synth:
        lines.append("SYNTHETIC phantoms: every number of this run is about phantoms, not radiographs.")
    lines.append(f"fasttrain reproduce: experiments {plan.args.experiments_text} -> {plan.out}")
    for d, s in plan.sources.items():
        tag = " (SYNTHETIC)" if s.synthetic else ""
        sp = ", ".join(f"{k} {v:,}" for k, v in s.splits.items())
        lines.append(f"  {d:<9}{tag} {s.path}: {s.images:,} images -> {sp}{'; ' + s.note if s.note else ''}")
    need = sum(s.pack_bytes for s in plan.sources.values())
    if need:
        lines.append(f"  disk for the packed datasets ({', '.join(plan.args.formats)}, {plan.args.pack_size} px): ~{need / 1e9:.1f} GB raw")
    lines.append(f"  pre-training data: {plan.pretrain_data}")
    for n in dict.fromkeys(plan.notes):
        lines.append(f"  NOTE: {n}")
    done = {st.name for st in plan.stages if plan.runner.is_done(st.name)}
    lines.append("")
    lines.append(f"{'stage':<28} {'images':>10} {'epochs':>6} {'steps':>9} {'batch':>6} {'est. wall':>10} "
                 f"{'GPU-h':>7}  status")
    total_wall = total_gpu_h = 0.0
    for st in plan.stages:
        status = "done" if st.name in done else ("resume" if st.run_dir and (st.run_dir / "checkpoints" / "last.pt").is_file()
                                                  and st.kind != "evaluate" else "todo")
        gpu_h = (st.est_s or 0) * stage_gpus(plan, st) / 3600
        if st.name not in done:
            total_wall += st.est_s or 0
            total_gpu_h += gpu_h
        steps = f"{st.steps:,}" if st.steps else "-"
        batch = str(st.batch) if st.batch else "-"
        epochs = str(st.epochs) if st.kind in ("pretrain", "finetune") else "-"
        lines.append(f"{st.name:<28} {st.images:>10,} {epochs:>6} {steps:>9} {batch:>6} {format_duration(st.est_s):>10} "
                     f"{gpu_h:>7.1f}  {status}")
    lines.append(f"{'remaining':<28} {'':>10} {'':>6} {'':>9} {'':>6} {format_duration(total_wall):>10} {total_gpu_h:>7.1f}")
    lines.append(f"estimates on {info['device']} x {plan.gpus}: " + "; ".join(info["assumptions"]))
    if plan.gpus > 1:
        lines.append(f"training stages run as: {' '.join(torchrun_prefix(plan.gpus))} <stage command>")
    return "\n".join(lines)


def torchrun_prefix(gpus: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "fasttrain.cli"]


def stage_gpus(plan: Plan, st: Stage) -> int:
    """GPUs a stage holds: the training stages all of --gpus, an evaluation one, a conversion none."""
    return {"pretrain": plan.gpus, "finetune": plan.gpus, "evaluate": 1}.get(st.kind, 0)
