"""Configuration as small typed dataclasses.

Defaults live here, one comment per field saying why. YAML files in configs/ only
override them; dotted CLI overrides (`--optim.lr=1e-4`) override the YAML. Unknown keys
and wrong types are errors that name the key. The resolved config is saved with every run.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from fasttrain.io import write_atomic


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type."""


@dataclass
class ModelConfig:
    name: str = "mae_vit_tiny_patch16"  # the paper's student (ViT-T/16 + 512-d x 2 decoder)
    img_size: int = 224  # the paper trains at 224 px
    in_chans: int = 1  # X-rays are grayscale; 3 only to match RGB checkpoints without conversion
    mask_ratio: float = 0.75  # MAE's ratio, used by the paper
    norm_pix_loss: bool = True  # MAE's default for pre-training (per-patch normalised targets)
    drop_path: float = 0.0  # 0 for pre-training; the fine-tuning recipes set 0.2
    num_classes: int = 0  # 0 = no head (pre-training); fine-tuning sets 14 (NIH) or 5 (CheXpert)
    # Architecture overrides (None = the registry's value): only the demo and tests shrink models.
    patch_size: Optional[int] = None  # the demo uses 8 px patches on 64 px phantoms
    embed_dim: Optional[int] = None  # encoder width
    depth: Optional[int] = None  # encoder blocks
    num_heads: Optional[int] = None  # encoder heads
    decoder_embed_dim: Optional[int] = None  # MAE decoder width
    decoder_depth: Optional[int] = None  # MAE decoder blocks
    decoder_num_heads: Optional[int] = None  # MAE decoder heads
    init: Optional[str] = None  # checkpoint to start from (fine-tuning: the distilled student, ours or timm export)


@dataclass
class DistillConfig:
    teacher: Optional[str] = None  # registry name of the frozen teacher, e.g. mae_vit_base_patch16; None = MAE only
    teacher_ckpt: Optional[str] = None  # Xiao et al. checkpoint (vit-s_CXR_0.3M_mae.pth / vit-b_CXR_0.5M_mae.pth)
    student_blocks: list[int] = field(default_factory=lambda: [8])  # 3/4 depth of 12 blocks (paper)
    teacher_blocks: list[int] = field(default_factory=lambda: [8])  # same depth in the teacher
    alpha: float = 1.0  # L = L_MAE + alpha * L_dist; the paper uses 1
    proj: str = "linear"  # projection head: "linear" (paper) or "mlp" (2-layer)
    # Teacher architecture overrides (None = the registry's value). A teacher pre-trained by
    # `fasttrain pretrain` carries its own architecture in its checkpoint and needs none of these.
    teacher_embed_dim: Optional[int] = None  # teacher encoder width
    teacher_depth: Optional[int] = None  # teacher encoder blocks
    teacher_num_heads: Optional[int] = None  # teacher encoder heads


@dataclass
class DataConfig:
    # packed dataset folder (has manifest.json), or several read as one mixture (the paper pre-trains on
    # NIH + CheXpert): a YAML list or "A,B" / "[A,B]"; each part "PATH" or "PATH:SPLIT" (default train_split)
    path: Optional[typing.Union[str, list[str]]] = None
    weights: Optional[list[float]] = None  # mixture sampling proportions, one per part; None = each image once per epoch
    samples_per_epoch: Optional[int] = None  # with weights: draws per epoch; None = the parts' total size
    # raw loader's madvise on its memmaps: auto = random for uniformly shuffled training (a page fault then
    # reads its page, not the readahead window: ~90x less I/O on a cold cache), sequential for block_shuffle
    # and in-order eval (they read contiguous runs, so readahead pays)
    raw_advice: str = "auto"  # auto | random | sequential | normal (the kernel's default readahead)
    # page-aware order (as FFCV's QUASI_RANDOM) for data bigger than the page cache: >0 = blocks of this
    # many consecutive images in random order, shuffled inside each block; 0 = uniform shuffle (the default:
    # batches stay i.i.d.; see docs/benchmarks.md for when blocks pay)
    block_shuffle: int = 0
    loader: str = "auto"  # auto (from the packed formats) | raw | ffcv | dali | reference
    batch_size: int = 32  # per GPU: the paper pre-trains with 32 per GPU
    num_workers: int = 2  # host workers; this CI machine has 2 cores
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # MAE's RandomResizedCrop scale
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])  # torchvision's default aspect range
    hflip: float = 0.5  # horizontal flip probability (MAE, Xiao et al.)
    eval_resize: int = 256  # evaluation: resize to 256 then center-crop img_size (Xiao et al.)
    norm: str = "imagenet"  # imagenet (the paper) | nih (0.5056 / 0.252, Xiao et al.)
    train_split: str = "train"
    val_split: Optional[str] = "val"  # None = no validation during fine-tuning
    test_split: str = "test"
    os_cache: bool = True  # ffcv: read through the OS page cache (dataset fits in RAM at 256 px)
    prefetch: int = 2  # batches prefetched by the raw loader's background thread
    reference_images: Optional[str] = None  # reference loader: folder of <id>.png packed images; None = source files
    # Fine-tuning augmentation: Xiao et al. fine-tune through timm's create_transform.
    # training crop filter: bicubic, as MAE's and Xiao et al.'s pre-training RandomResizedCrop(interpolation=3)
    # and Xiao's fine-tuning create_transform(interpolation='bicubic'); bilinear only where a config says why.
    # Evaluation resizes bilinear whatever this says (MAE's and Xiao's eval Resize(256) is bicubic).
    interpolation: str = "bicubic"  # bicubic | bilinear
    randaug: Optional[str] = None  # timm RandAugment policy after crop + flip, e.g. "rand-m6-mstd0.5-inc1" (Xiao); None = off
    # keep only images whose packed 'view' metadata is one of these ("PA,AP" or [PA, AP]), in every split a
    # run reads (train and val; evaluate scores whole splits); None = every image
    views: Optional[typing.Union[str, list[str]]] = None
    # label efficiency (MGCA / BenchX 1% / 10% / 100%): fine-tune (and probe) on this fraction of the
    # training split's patients (whole patients, seeded by run.seed: the same ids on any machine); MAE
    # pre-training reads no label and always reads every image; 1.0 = all of it
    label_fraction: float = 1.0


@dataclass
class OptimConfig:
    epochs: int = 100  # the paper pre-trains and fine-tunes for 100 epochs
    blr: float = 1.5e-4  # base lr per 256 images (MAE); absolute lr = blr * eff_batch / 256
    lr: Optional[float] = None  # absolute lr; derived from blr when None
    min_lr: float = 0.0  # cosine floor
    warmup_epochs: float = 5.0  # linear warm-up (MAE uses 40 of 800; 5 for 100-epoch runs)
    weight_decay: float = 0.05  # MAE and the paper's fine-tuning
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # MAE pre-training betas
    layer_decay: Optional[float] = None  # fine-tuning: 0.55 (paper); None = no layer-wise decay
    clip_grad: Optional[float] = None  # MAE pre-training does not clip
    accum_steps: int = 1  # gradient accumulation: effective batch = batch * accum * world
    fused: bool = True  # torch.optim.AdamW(fused=True): one kernel for the whole update


@dataclass
class EngineConfig:
    mode: str = "fused"  # fused (compiled, bf16, truncated teacher) | reference (the baseline's semantics)
    compile: bool = True  # torch.compile the step (costs 90-180 s cold on 2 CPU cores for ViT-T+ViT-B)
    amp: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32: emulated bf16 is ~20x slower) | bf16 | fp16 | fp32 autocast dtype (fused mode)
    channels_last: bool = True  # NHWC input: faster conv patch embedding on GPUs and on oneDNN
    teacher_mode: str = "auto"  # auto (fused: truncated at the aligned block; reference: full, as the baseline) | truncated | full
    kernels: str = "auto"  # fasttrain.kernels backend: auto (Triton on CUDA) | torch | triton


@dataclass
class RunConfig:
    out: Optional[str] = None  # run directory
    seed: int = 0
    device: str = "auto"  # auto = cuda if available else cpu
    log_every: int = 20  # host sync (loss.item()) only every log_every steps
    ckpt_every: int = 500  # steps between atomic checkpoints/last.pt
    max_steps: Optional[int] = None  # stop early (demo, tests); None = full epochs
    deterministic: bool = False  # bit-exact resume on CPU (slower kernels)
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0 (step, img/s, both losses, lr, ETA)
    eval_every: int = 1  # fine-tuning: validation mAUC every N epochs (best.pt follows it)
    bootstrap: int = 1000  # evaluation: bootstrap resamples of the test images for the 95% CI
    # Cluster survival (README "Clusters"): one command line for the first launch and every requeue.
    resume: Union[bool, str] = False  # false: fresh; true: continue from last.pt (--resume); "auto": resume if last.pt exists
    # a resume on another world size keeps the global batch by changing accum_steps; true: it may also lower
    # data.batch_size (per device) when no accum_steps fits (off by default: the batch is the user's memory budget)
    resume_rebatch: bool = False
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # SLURM's kill warning and --signal=USR1@T
    preempt_check_every: int = 1  # steps between the ranks' agreement on a signal (one tiny gloo all-reduce each)
    preempt_exit_code: int = 75  # EX_TEMPFAIL ("try again"): a pre-empted run saved last.pt; requeue it
    keep_checkpoints: int = 2  # step_N.pt kept beside last.pt (hard links): a corrupt last.pt falls back to one
    dist_timeout_s: int = 600  # collectives and rendezvous fail after this instead of hanging for torch's 30 min


@dataclass
class EvalConfig:
    # kNN monitor in pre-training (fasttrain/train/knn.py): a val mAUC while pre-training runs
    knn_every: int = 5  # epochs between kNN evaluations (0 = off); est. ~1.2% of an NIH-sized run, 3.7% measured at the demo's scale
    knn_k: int = 20  # neighbours that vote (DINO's k-NN eval uses 20)
    knn_temperature: float = 0.07  # vote weight exp(cos / T) (DINO, InstDisc)
    # memory bank: N train images (eval transform; each rank its 1/world); cost grows with it. 1,000 keeps the
    # monitor under 5% of the demo-scale pre-training (2,000: 7.1%) for -0.017 kNN mAUC (docs/benchmarks.md)
    knn_train_images: int = 1000


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (atomically)."""
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- type checking

def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` coerced to `tp` where lossless (int -> float), else raise naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r} ({type(value).__name__})")
        (elem,) = args[:1] or (Any,)
        return [_check_value(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a float, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an int, got {value!r} ({type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r} ({type(value).__name__})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def apply_updates(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(
                f"unknown config key '{key}'; known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}': expected a mapping of sub-keys, got {v!r}")
            apply_updates(current, v, prefix=f"{key}.")
        else:
            setattr(obj, k, _check_value(key, v, hints[k]))


def parse_scalar(text: str) -> Any:
    """Parse a CLI override value with YAML rules (1e-4 -> float, true -> bool, [1,2] -> list)."""
    value = yaml.safe_load(text) if text != "" else ""
    # YAML 1.1 reads '1e-4' as a string; accept it as a float.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def parse_overrides(args: list[str]) -> dict:
    """['--optim.lr=1e-4', 'model.img_size=64'] -> {'optim': {'lr': 1e-4}, 'model': {'img_size': 64}}."""
    nested: dict = {}
    for a in args:
        s = a[2:] if a.startswith("--") else a
        if "=" not in s:
            raise ConfigError(f"override '{a}' must look like --section.key=value")
        dotted, text = s.split("=", 1)
        parts = dotted.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override '{a}': key must be section.key (e.g. --optim.lr=1e-4)")
        d = nested
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"override '{a}' conflicts with an earlier override of '{p}'")
        d[parts[-1]] = parse_scalar(text)
    return nested


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)  # optional: another YAML this one overrides (relative path)
    if base is not None:
        merged = load_yaml(path.parent / base)
        _deep_update(merged, data)
        return merged
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def build_config(yaml_path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides. Errors name the offending key (and file)."""
    cfg = Config()
    if yaml_path is not None:
        try:
            apply_updates(cfg, load_yaml(yaml_path))
        except ConfigError as e:
            raise ConfigError(f"{yaml_path}: {e}") from None
    if overrides:
        apply_updates(cfg, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    return cfg


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    apply_updates(cfg, d)
    return cfg


def dumps(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
