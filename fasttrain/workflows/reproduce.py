"""`fasttrain reproduce`: the ETMAE paper's four experiments end to end, ending in its Table 2.

    fasttrain reproduce --nih NIH_DIR --chexpert CHEXPERT_DIR --teacher-s vit-s_CXR_0.3M_mae.pth \
        --teacher-b vit-b_CXR_0.5M_mae.pth --out DIR [--experiments 1,2] [--gpus N] [--dry-run] [--with-teachers]

Experiments (paper Table 2): 1 = ViT-T distilled from ViT-S, fine-tuned on NIH; 2 = the same
student on CheXpert; 3 / 4 = ViT-T distilled from ViT-B on NIH / CheXpert. The stages, each a normal
`fasttrain` command (in this process, or under torchrun when --gpus > 1) with dotted overrides:

  convert_nih, convert_chexpert     each source packed once into DIR/packed/ (reused when packed)
  pretrain_s, pretrain_b            configs/paper/pretrain_vit{s,b}_to_vitt.yaml on NIH + CheXpert train
  finetune_{s,b}_{nih,chexpert}     configs/paper/finetune_{nih,chexpert}.yaml from the student
  evaluate_*                        NIH's official test list / CheXpert's valid.csv, bootstrap CIs
  transfer_*                        each fine-tune scored on the other dataset's test split, on the
                                    labels both name (fasttrain.labelmap): NIH -> CheXpert and back
  (+ finetune_teacher_{s,b}_* and their evaluations with --with-teachers)

Every stage is resumable: a finished stage leaves DIR/stages/NAME.json and is skipped; an
interrupted training stage resumes from its RUN/checkpoints/last.pt (`--resume auto` semantics);
an interrupted conversion restarts clean (the converter writes atomically). So the same command
is simply re-run after any failure or pre-emption. Before any work: every input is checked
(teacher checkpoints loaded strictly, dataset releases, free disk), and a plan lists each stage
with its images, steps and a wall time estimated from a short measured step on this machine.
At the end: DIR/table2.md + table2.json beside the paper's numbers, per-label AUC tables, figures.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fasttrain.converters.decode import RESIZE_MODES
from fasttrain.format.packed import read_manifest
from fasttrain.workflows.stages import StageRunner, run_fasttrain

log = logging.getLogger("fasttrain.reproduce")

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
# GPU-hour estimates without a measurement (README, --bench-steps 0): an assumed model FLOPs
# utilisation of the dense bf16 peak. An assumption, not a measurement (no GPU has run fasttrain yet):
# ViT-B training commonly reaches 35-45% on H100s; ViT-T's 192-wide matmuls reach less, so 25%.
ASSUMED_MFU = 0.25
RERUN = "fasttrain reproduce"  # the command a failed stage's message says to re-run


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
    --resize asks (data packed before the manifest said were squashed); None when they agree."""
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


def _count_lines(path: Path) -> int:
    with open(path, errors="replace") as f:
        return sum(1 for line in f if line.strip())


def inspect_nih(path: Path, split_dir: Optional[Path] = None) -> Source:
    """An NIH ChestX-ray14 release folder (or a packed one): its image counts, or a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise ReproduceError(f"--nih {path}: folder not found")
    if (path / "manifest.json").is_file():
        return _packed_source("nih", path)
    from fasttrain.converters.nih import CSV_NAMES, LIST_NAMES, REQUIRED_COLUMNS, XIAO_NAMES, find_csv
    csv_path = find_csv(path)
    if csv_path is None:
        hint = " (it looks like CheXpert: pass it as --chexpert)" if _find_chexpert_root(path) else ""
        raise ReproduceError(f"--nih {path}: not the NIH ChestX-ray14 release: no {' or '.join(CSV_NAMES)}{hint}")
    with open(csv_path, newline="", errors="replace") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in REQUIRED_COLUMNS if c not in [h.strip() for h in header]]
    if missing:
        raise ReproduceError(f"--nih {csv_path}: not NIH's Data_Entry CSV: columns {missing} are missing")
    if not (path / "images").is_dir() and not any(path.glob("images_*/images")):
        raise ReproduceError(f"--nih {path}: no images/ or images_NNN/images/ folder (the NIH archive layout)")
    lists = {s: path / n for s, n in LIST_NAMES.items()}
    for s, p in lists.items():
        if not p.is_file():
            raise ReproduceError(f"--nih {path}: {p.name} is missing (NIH's official patient-wise split)")
    images = _count_lines(csv_path) - 1
    train_val, test = _count_lines(lists["train"]), _count_lines(lists["test"])
    if split_dir is not None:
        xs = {s: Path(split_dir) / n for s, n in XIAO_NAMES.items()}
        for s, p in xs.items():
            if not p.is_file():
                raise ReproduceError(f"--nih-split-dir {split_dir}: {p.name} is missing (Xiao et al.'s split files)")
        splits = {s: _count_lines(p) for s, p in xs.items()}
    else:
        val = round(train_val * VAL_FRACTION["nih"])
        splits = {"train": train_val - val, "val": val, "test": test}
    note = "" if images == RELEASE_IMAGES["nih"] else f"{images:,} images (the release has {RELEASE_IMAGES['nih']:,})"
    return Source("nih", path, False, images, splits, _is_synthetic_source(path), note)


def _find_chexpert_root(path: Path) -> Optional[Path]:
    from fasttrain.converters.chexpert import RELEASE_PREFIXES
    for root in (path, *(path / n for n in RELEASE_PREFIXES)):
        if (root / "train.csv").is_file() and (root / "valid.csv").is_file():
            return root
    return None


def _frontal_rows(csv_path: Path, what: str) -> int:
    from fasttrain.converters.chexpert import COMPETITION
    with open(csv_path, newline="", errors="replace") as f:
        rows = csv.DictReader(f)
        cols = rows.fieldnames or []
        missing = [c for c in ["Path", "Frontal/Lateral", *COMPETITION] if c not in cols]
        if missing:
            raise ReproduceError(f"--chexpert {csv_path}: not CheXpert v1.0's {what}: columns {missing} are missing")
        return sum(1 for r in rows if (r.get("Frontal/Lateral") or "").strip().lower() == "frontal")


def inspect_chexpert(path: Path) -> Source:
    """A CheXpert v1.0 release folder (the folder or its CheXpert-v1.0-small parent), or a packed one."""
    path = Path(path)
    if not path.is_dir():
        raise ReproduceError(f"--chexpert {path}: folder not found")
    if (path / "manifest.json").is_file():
        return _packed_source("chexpert", path)
    root = _find_chexpert_root(path)
    if root is None:
        from fasttrain.converters.nih import find_csv
        hint = " (it looks like NIH ChestX-ray14: pass it as --nih)" if find_csv(path) else ""
        raise ReproduceError(f"--chexpert {path}: not the CheXpert v1.0 release: no train.csv and valid.csv here or in "
                             f"CheXpert-v1.0-small/ or CheXpert-v1.0/{hint}")
    train = _frontal_rows(root / "train.csv", "train.csv")
    test = _frontal_rows(root / "valid.csv", "valid.csv")
    val = round(train * VAL_FRACTION["chexpert"])
    rows = _count_lines(root / "train.csv") - 1
    note = "" if rows == RELEASE_IMAGES["chexpert"] else f"{rows:,} train.csv rows (the release has {RELEASE_IMAGES['chexpert']:,})"
    return Source("chexpert", path, False, train + test, {"train": train - val, "val": val, "test": test},
                  _is_synthetic_source(path) or _is_synthetic_source(root), note)


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
    """data.path of the paper's pre-training: NIH train + CheXpert train (issue #10's PATH:SPLIT list)."""
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
        from fasttrain.config import build_config
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
        from fasttrain.config import load_yaml
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
    from fasttrain.train.builders import build_pretrain_model
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


def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_images_per_s(stage: Stage, model, steps: int, batch: int) -> float:
    """Images/s of `steps` timed steps (after one warm-up) of this stage's model and step, on random
    images at the configured size, uncompiled: the same TrainStep the trainers run."""
    import torch
    from fasttrain.train.engine import make_step
    from fasttrain.train.optim import build_optimizer, param_groups_weight_decay
    cfg = stage.config
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, compile=False))
    dev = _device()
    model = model.to(dev).train()
    trainable = getattr(model, "student", model)
    opt = build_optimizer(param_groups_weight_decay(trainable, 0.05), 1e-4, cfg.optim, reference=False, device=dev)
    step = make_step(cfg, model, opt, kind=stage.kind, device=dev)
    m = cfg.model
    images = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=dev)
    labels = torch.randint(0, 2, (batch, max(1, m.num_classes))).float().to(dev)
    call = (lambda: step(images, labels)) if stage.kind == "finetune" else (lambda: step(images))
    call()
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return batch / times[len(times) // 2]


def stage_flops(stage: Stage, model) -> float:
    """Analytic training FLOPs per image (fasttrain.bench.flops): the ETMAE step, or 3x the classifier forward."""
    from fasttrain.bench.flops import encoder_flops, etmae_step_flops
    if stage.kind == "pretrain":
        student, teacher = getattr(model, "student", model), getattr(model, "teacher", None)
        d = stage.config.distill
        return etmae_step_flops(student, teacher, stage.config.model.mask_ratio, d.teacher_blocks[-1],
                                getattr(model, "proj", None)).per_image
    return 3 * encoder_flops(model, 1 + model.patch_embed.num_patches, len(model.blocks))


def estimate(plan: Plan, models: dict, bench_steps: int) -> dict:
    """Wall-time estimate of every stage: a short measured step per training stage on this
    machine (or, with bench_steps=0, FLOPs at ASSUMED_MFU of the device's bf16 peak); the
    evaluation at a third of its fine-tuning step per image (forward only); the conversion from
    a measured decode of a few source images. N GPUs are assumed to scale linearly."""
    from fasttrain.train.builders import build_classifier
    dev = _device()
    info = {"device": str(dev), "bench_steps": bench_steps, "assumptions": []}
    ips_of: dict[str, float] = {}
    for st in plan.stages:
        if st.kind not in ("pretrain", "finetune"):
            continue
        if st.kind == "pretrain":
            model = models[st.name.rsplit("_", 1)[1]]  # built (teacher loaded) by check_teachers
        else:
            model = build_classifier(st.config)
        if bench_steps > 0:
            # CPU: 2 images a step (a full-size ViT-B step on a loaded 2-core machine takes minutes at 8)
            batch = st.config.data.batch_size if dev.type == "cuda" else min(st.config.data.batch_size, 2)
            ips = measure_images_per_s(st, model, bench_steps, batch)
        else:
            ips = _assumed_ips(st, model, dev)
        ips_of[st.name] = ips
        st.est_s = st.steps * st.batch / (ips * plan.gpus)
    for st in plan.stages:
        if st.kind == "evaluate":
            ips = 3 * ips_of[st.needs[0]]  # forward only: a third of a training step's FLOPs
            st.est_s = st.images / ips
        elif st.kind == "convert":
            st.est_s = st.images * _decode_seconds(plan.sources[st.name.split("_", 1)[1]]) / max(1, os.cpu_count() or 1)
    if bench_steps > 0:
        info["assumptions"].append(f"training: median of {bench_steps} measured uncompiled steps per stage on "
                                   f"{dev} (batch {'as configured' if dev.type == 'cuda' else '<= 2'}); "
                                   "the compiled step is faster, so these are upper bounds")
    else:
        peak_of = "an H100's" if dev.type == "cpu" else "the device's"
        info["assumptions"].append(f"training: analytic FLOPs at an assumed {ASSUMED_MFU:.0%} MFU of {peak_of} "
                                   "bf16 peak (no step measured)")
    info["assumptions"].append("evaluation: forward only, a third of the fine-tuning step per image")
    info["assumptions"].append(f"{plan.gpus} GPU(s) scale linearly; data loading never stalls the step")
    info["images_per_s"] = ips_of
    return info


def _assumed_ips(stage: Stage, model, dev) -> float:
    from fasttrain.bench.flops import known_peak, measured_matmul_peak
    peak = None
    if dev.type == "cuda":
        import torch
        peak = known_peak(torch.cuda.get_device_name(dev))
    if peak is None:
        peak = known_peak("H100") if dev.type == "cpu" else measured_matmul_peak(dev)
    return ASSUMED_MFU * peak / stage_flops(stage, model)


def _decode_seconds(source: Source) -> float:
    """Measured seconds to decode + resize one source image (a few of them, one core)."""
    from fasttrain.converters.decode import decode_file
    if source.packed:
        return 0.0
    files = []
    for pattern in ("images/*.png", "images_*/images/*.png", "*/train/*/*/*.jpg", "train/*/*/*.jpg"):
        for f in source.path.glob(pattern):
            files.append(f)
            if len(files) >= 8:
                break
        if len(files) >= 8:
            break
    if not files:
        return 0.05  # no image to time (a CSV-only folder): an assumed 50 ms, a 1024-px PNG's order
    t0 = time.perf_counter()
    for f in files:
        decode_file(str(f), source.pack_size)
    return (time.perf_counter() - t0) / len(files)


def _hms(s: Optional[float]) -> str:
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
        lines.append(f"{st.name:<28} {st.images:>10,} {epochs:>6} {steps:>9} {batch:>6} {_hms(st.est_s):>10} "
                     f"{gpu_h:>7.1f}  {status}")
    lines.append(f"{'remaining':<28} {'':>10} {'':>6} {'':>9} {'':>6} {_hms(total_wall):>10} {total_gpu_h:>7.1f}")
    lines.append(f"estimates on {info['device']} x {plan.gpus}: " + "; ".join(info["assumptions"]))
    if plan.gpus > 1:
        lines.append(f"training stages run as: {' '.join(torchrun_prefix(plan.gpus))} <stage command>")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running

def torchrun_prefix(gpus: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "fasttrain.cli"]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def stage_gpus(plan: Plan, st: Stage) -> int:
    """GPUs a stage holds: the training stages all of --gpus, an evaluation one, a conversion none."""
    return {"pretrain": plan.gpus, "finetune": plan.gpus, "evaluate": 1}.get(st.kind, 0)


def run_stage(plan: Plan, st: Stage) -> dict:
    """Run one stage as a `fasttrain` command through the plan's stage runner (skipped when it
    finished earlier); a training stage resumes from its last.pt. Raises StageFailed."""
    argv = list(st.argv)
    if st.trains:
        # an interrupted stage continues from its newest checkpoint that verifies (a corrupt
        # last.pt falls back to a kept step checkpoint); a new one starts fresh
        argv += ["--resume", "auto"]
    if st.kind == "evaluate":
        best = st.run_dir / "checkpoints" / "best.pt"
        if not best.is_file():  # no val split: the last checkpoint (never chosen on the test set)
            argv[argv.index("--ckpt") + 1] = str(st.run_dir / "checkpoints" / "last.pt")

    def work() -> dict:
        prefix = torchrun_prefix(plan.gpus) if st.distributed and st.trains else ()
        run_fasttrain(st.name, argv, RERUN, prefix)
        return {"kind": st.kind, "argv": argv, "gpus": stage_gpus(plan, st), **stage_facts(plan, st, argv)}
    return plan.runner.run(st.name, work, run_dir=st.run_dir if st.trains else None,
                           what=f"fasttrain {' '.join(argv)}")


def stage_facts(plan: Plan, st: Stage, argv: list[str]) -> dict:
    """What a finished stage left behind: images/s, and the steps (training) or mAUC (evaluation)."""
    if st.trains:
        summary = json.loads((st.run_dir / "summary.json").read_text())
        return {"images_per_s": summary.get("images_per_s"), "steps": summary.get("steps"),
                "best_val_mauc": summary.get("best_val_mauc")}
    if st.kind == "evaluate":
        res = json.loads((Path(argv[argv.index("--out") + 1]) / "results_test.json").read_text())
        return {"images_per_s": res.get("images_per_s"), "mauc": res.get("mauc"), "checkpoint": res.get("checkpoint")}
    m = json.loads((plan.packed[st.name.split("_", 1)[1]] / "manifest.json").read_text())
    return {"images_per_s": m["conversion"].get("images_per_s")}


# ----------------------------------------------------------------------------- Table 2

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
                           "gpu_hours": r["wall_s"] * r["gpus"] / 3600})
    figures = make_figures(plan)
    doc = {"synthetic": synthetic, "rows": rows, "stages": stages,
           "transfer": [{k: v for k, v in t.items() if k != "result"} for t in transfer],
           "gpu_hours_total": sum(s["gpu_hours"] or 0 for s in stages),
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
        md.append(f"| {s['stage']} | {_hms(s['wall_s'])} | {s['gpu_hours']:.3f} | {ips} | {s.get('steps') or '-'} | "
                  f"{'yes' if s.get('resumed') else 'no'} |")
    md.append(f"| total | | {doc['gpu_hours_total']:.3f} | | | |")
    md.append("")
    md.append("GPU-hours = wall time x GPUs, summed over a stage's attempts (an interrupted attempt counts "
              "until the last record it logged).")
    if figures:
        md += ["", f"## {tag}Figures", ""] + [f"- [{p.relative_to(out)}]({p.relative_to(out)})" for p in figures]
    _write_json(out / "table2.json", doc)
    tmp = out / "table2.md.tmp"
    tmp.write_text("\n".join(md) + "\n")
    tmp.replace(out / "table2.md")
    return doc


def make_figures(plan: Plan) -> list[Path]:
    """The paper's figures from the run logs: pre-training loss curves (L_MAE, L_dist), fine-tuning
    train loss and val mAUC (fasttrain plot), fine-tuning train/val loss per epoch, per-label AUC bars."""
    from fasttrain.eval.plots import plot_runs
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
    from fasttrain.eval.plots import pyplot
    from fasttrain.train.runlog import read_metrics, save_figure
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


# ----------------------------------------------------------------------------- main

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasttrain reproduce", description=(
        "The ETMAE paper's experiments end to end (convert, pre-train, fine-tune, evaluate) ending in "
        "DIR/table2.md. Re-run the same command after any interruption: finished stages are skipped, "
        "an interrupted one resumes. Dotted overrides may follow, for every training stage "
        "(--model.img_size=64) or for the stages matching a glob (--finetune_*:optim.epochs=10)."))
    p.add_argument("--nih", required=True, help="NIH ChestX-ray14 folder (Data_Entry_2017*.csv, images*/) or a packed one")
    p.add_argument("--chexpert", required=True, help="CheXpert-v1.0-small folder (train.csv, valid.csv) or a packed one")
    p.add_argument("--teacher-s", help="Xiao et al.'s vit-s_CXR_0.3M_mae.pth (experiments 1, 2)")
    p.add_argument("--teacher-b", help="Xiao et al.'s vit-b_CXR_0.5M_mae.pth (experiments 3, 4)")
    p.add_argument("--out", required=True, help="reproduction folder: packed/, runs/, stages/, table2.md")
    p.add_argument("--experiments", default="1,2,3,4",
                   help="1 = S->T NIH, 2 = S->T CheXpert, 3 = B->T NIH, 4 = B->T CheXpert (default all)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per training stage (torchrun when > 1)")
    p.add_argument("--with-teachers", action="store_true",
                   help="also fine-tune and evaluate each teacher (the paper's comparison rows)")
    p.add_argument("--dry-run", action="store_true", help="check the inputs, print the plan, do nothing else")
    p.add_argument("--nih-split-dir", help="Xiao et al.'s train/val/test_official.txt (default: a 13%% val carve)")
    p.add_argument("--formats", nargs="+", default=["raw"], help="packed formats (default raw: the fastest loader)")
    p.add_argument("--pack-size", type=int, default=PACK_SIZE, help="packed image size (default 256 as the paper; tests shrink it)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                   help="fitting each frame to the square when packing (convert --resize): crop (default) keeps "
                        "CheXpert's portrait frames undistorted, as Xiao et al.'s Resize + CenterCrop; NIH's are square")
    p.add_argument("--bench-steps", type=int, default=2,
                   help="measured steps per training stage for the plan's estimates (0: FLOPs at an assumed MFU)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str]):
    p = parser()
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--") or "=" not in a]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (overrides look like --section.key=value)")
    args.overrides = rest
    try:
        args.experiments = sorted({int(x) for x in args.experiments.split(",") if x.strip()})
    except ValueError:
        p.error(f"--experiments {args.experiments!r}: a comma-separated list of 1-4")
    if not args.experiments or any(e not in EXPERIMENTS for e in args.experiments):
        p.error(f"--experiments {args.experiments}: choose from 1,2,3,4")
    args.experiments_text = ",".join(map(str, args.experiments))
    if args.gpus < 1:
        p.error("--gpus must be >= 1")
    return args


def reproduce(args) -> int:
    out = Path(args.out)
    sources = {"nih": inspect_nih(Path(args.nih), Path(args.nih_split_dir) if args.nih_split_dir else None),
               "chexpert": inspect_chexpert(Path(args.chexpert))}
    for s in sources.values():
        s.pack_size = args.pack_size
    plan = Plan(args, sources)
    models = check_teachers(plan)
    check_disk(list(sources.values()), out)
    info = estimate(plan, models, args.bench_steps)
    del models  # the teachers' memory, before the stages build their own
    text = format_plan(plan, info)
    print(text, flush=True)
    if args.dry_run:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.txt").write_text(text + "\n")
    for st in plan.stages:
        run_stage(plan, st)
    doc = write_table(plan)
    print(f"\n{(out / 'table2.md').read_text()}")
    print(f"table: {out / 'table2.md'} (+ table2.json); figures: {', '.join(doc['figures'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Bad input raises ReproduceError / ConfigError (exit 2), a failed stage StageFailed (exit 1):
    the `fasttrain` command's exception table turns them into the exit code."""
    return reproduce(parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
