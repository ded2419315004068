"""`fasttrain probe`: linear probe of a frozen encoder on cached features.

    fasttrain probe --ckpt RUN/checkpoints/last.pt --data PACKED [--pool mean|cls] [--json]
    fasttrain probe --random-init --config configs/demo/finetune.yaml --data PACKED   (the floor)

As MAE's `main_linprobe.py` (and Xiao et al.'s chest X-ray copy of it): the encoder is frozen, a
head of BatchNorm1d without affine (eps 1e-6) + Linear (trunc-normal std 0.01) is trained with
MAE's schedule (blr 0.1, momentum 0.9, no weight decay, 10 warm-up epochs, cosine, 90 epochs; SGD,
not LARS: see make_optimizer). BCE with the NaN (unknown)
labels masked; per-label AUC and mAUC with evaluate's bootstrap CIs on the test split.

The anchors run the frozen encoder over every training image in every epoch. Here the features of
each split are extracted once (eval transform) and cached on disk, keyed by the checkpoint's and
the packed manifest's hashes, so the 90 epochs touch only an [N, D] matrix on the device.
`--compare` also runs the anchors' way (encoder every epoch, with their train augmentation) and
reports both times and mAUCs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain.config import apply_updates, build_config, config_from_dict, parse_overrides
from fasttrain.data import build_loader
from fasttrain.eval.evaluate import format_table
from fasttrain.format.packed import read_manifest
from fasttrain.io import write_atomic_with, write_json_atomic
from fasttrain.metrics import bootstrap_auc, mean_auc
from fasttrain.train.builders import build_classifier, init_classifier, is_fasttrain_checkpoint, peek_checkpoint
from fasttrain.train.dist import resolve_device
from fasttrain.train.engine import bce_masked
from fasttrain.train.optim import lr_at

log = logging.getLogger("fasttrain.train")

CACHE_VERSION = 1  # bump when the extracted features change meaning
POOLS = ("mean", "cls")


@dataclass
class ProbeSettings:
    epochs: int = 90  # MAE's linear probe: 90 epochs
    batch_size: int = 512  # MAE uses 16384 on ImageNet (78 steps/epoch); a chest X-ray train split of
    # a few thousand to 80k images gets steps per epoch from a smaller batch (lr scales with it)
    blr: float = 0.1  # MAE: lr = blr * batch / 256
    weight_decay: float = 0.0  # MAE's linear probe uses none
    warmup_epochs: float = 10.0  # MAE: 10 of 90
    momentum: float = 0.9  # MAE's (LARS) momentum
    seed: int = 0


class ProbeError(ValueError):
    """Bad probe input (checkpoint, dataset, options): raised before any feature is extracted."""


# ----------------------------------------------------------------------------- encoder

def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def probe_config(ckpt: Optional[str], config: Optional[str], overrides: Optional[list[str] | dict]):
    """The Config whose model/data sections describe the encoder and its eval transform.

    A fasttrain pretrain checkpoint carries its own (the MAE name becomes the classifier's); any
    other checkpoint (MAE, Xiao et al., timm export) or --random-init takes --config + overrides
    (default: the ViT-T/16 classifier at 224 px)."""
    raw = peek_checkpoint(Path(ckpt)) if ckpt is not None else None
    if is_fasttrain_checkpoint(raw):
        if raw["kind"] != "pretrain":
            raise ProbeError(f"{ckpt}: a fine-tuned classifier; the probe takes a pre-trained encoder "
                             "(RUN/checkpoints/last.pt of `fasttrain pretrain`, or an exported/MAE/timm checkpoint)")
        cfg = config_from_dict(raw["config"])
        if config is not None:
            raise ProbeError(f"{ckpt} carries its own config; drop --config (dotted overrides still apply)")
        if overrides:
            apply_updates(cfg, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    else:
        cfg = build_config(config, overrides)
    if cfg.model.name.startswith("mae_"):
        cfg.model.name = cfg.model.name[len("mae_"):]  # the encoder of mae_vit_X is vit_X
    cfg.model.drop_path = 0.0
    return cfg


def build_encoder(cfg, num_labels: int, ckpt: Optional[str], random_init: bool, seed: int = 0) -> nn.Module:
    """A ViTClassifier (the fine-tuning model: same pooling) with its encoder from `ckpt`, frozen."""
    cfg.model.num_classes = num_labels
    torch.manual_seed(seed)
    model = build_classifier(cfg, num_labels=num_labels)
    if not random_init:
        init_classifier(model, ckpt, cfg.data.norm)  # every checkpoint `finetune --init` accepts; strict on the encoder
    return model.requires_grad_(False).eval()


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    """images [B, C, H, W] -> features [B, D] of the frozen encoder.

    mean: as the classifier (and MAE's global-pool probe): mean of the patch tokens, then fc_norm
    (fresh: a plain LayerNorm). cls: the cls token after a LayerNorm without affine (MAE's probe
    uses the encoder's final norm; the classifier has dropped it, and the probe's BatchNorm
    re-scales every feature anyway)."""
    x = model.forward_tokens(images)  # [B, 1+L, D]
    if pool == "mean":
        return model.fc_norm(x[:, 1:].mean(dim=1))  # [B, D]
    return F.layer_norm(x[:, 0], (x.shape[-1],), eps=1e-6)  # [B, D]


@torch.no_grad()
def extract(model: nn.Module, loader, pool: str, device) -> tuple[np.ndarray, np.ndarray]:
    """Every image of the loader once -> (features [N, D] float32, labels [N, C] float32, NaN kept)."""
    feats, labels = [], []
    for images, y in loader:
        feats.append(encode(model, images.to(device, non_blocking=True), pool).float().cpu())
        labels.append(y.float().cpu())
    if not feats:
        raise ProbeError("a probe split is empty")
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def cache_key(ckpt_hash: str, manifest_hash: str, split: str, pool: str, cfg) -> str:
    """Everything the features depend on: checkpoint, packed data, split, pooling, eval transform."""
    m, d = cfg.model, cfg.data
    desc = dict(v=CACHE_VERSION, ckpt=ckpt_hash, manifest=manifest_hash, split=split, pool=pool,
                name=m.name, img_size=m.img_size, in_chans=m.in_chans, patch=m.patch_size, dim=m.embed_dim,
                depth=m.depth, heads=m.num_heads, eval_resize=d.eval_resize, norm=d.norm,
                views=d.views, label_fraction=d.label_fraction,
                subset_seed=cfg.run.seed if d.label_fraction not in (None, 1.0) else None)
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def cached_features(model, cfg, split: str, pool: str, ckpt_hash: str, cache_dir: Path, device,
                    batch_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(features, labels, hit): read from cache_dir when the key matches, else extract and write
    atomically (a killed extraction leaves no half file)."""
    manifest_hash = file_sha256(Path(cfg.data.path) / "manifest.json")
    key = cache_key(ckpt_hash, manifest_hash, split, pool, cfg)
    path = cache_dir / f"{split}-{pool}-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["features"], z["labels"], True
    loader = build_loader(cfg.data, split, train=False, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                          device=device, dtype=torch.float32, seed=cfg.run.seed, batch_size=batch_size)
    feats, labels = extract(model, loader, pool, device)
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomic_with(path, lambda f: np.savez(f, features=feats, labels=labels))
    return feats, labels, False


# ----------------------------------------------------------------------------- head

class LinearProbe(nn.Module):
    """MAE's probe head: BatchNorm1d(D, affine=False, eps=1e-6) then Linear(D, C)."""

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_labels)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE: trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(feats))  # [B, D] -> [B, C] logits


def make_optimizer(head: LinearProbe, s: ProbeSettings, lr: float) -> torch.optim.Optimizer:
    """SGD with MAE's momentum, lr and schedule, without LARS's trust ratio.

    MAE's LARS (trust coefficient 0.001) moves the weight matrix by lr * 0.001 of its norm per
    step, which converges over ImageNet's ~7,000 probe steps at lr 6.4; on a chest X-ray split's
    few hundred steps the head barely leaves its init (measured on a known linear problem in
    tests/eval/test_probe.py's setting: mAUC 0.50 with LARS vs 0.81 with this and 0.81 with sklearn's
    LogisticRegression). BatchNorm in front already puts every feature on one scale."""
    return torch.optim.SGD(head.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)


def probe_lr(step: int, steps_per_epoch: int, s: ProbeSettings, lr: float) -> float:
    """MAE's per-iteration schedule (linear warm-up, then half-cosine to 0) in fractional epochs:
    optim.lr_at with the warm-up and the total counted in steps."""
    return lr_at(step, base_lr=lr, min_lr=0.0, warmup_steps=s.warmup_epochs * steps_per_epoch,
                 total_steps=s.epochs * steps_per_epoch)


def train_head(feats: np.ndarray, labels: np.ndarray, s: ProbeSettings, device) -> LinearProbe:
    """The probe head on cached features [N, D] / labels [N, C], on the device; shuffled
    mini-batches each epoch, the last partial batch dropped (as MAE's loader; kept if it is the only one)."""
    dev = torch.device(device)
    x = torch.as_tensor(feats, dtype=torch.float32, device=dev)  # [N, D] stays on the device
    y = torch.as_tensor(labels, dtype=torch.float32, device=dev)  # [N, C]
    n = x.shape[0]
    bs = min(s.batch_size, n)
    steps = max(n // bs, 1)
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    torch.manual_seed(s.seed)
    head = LinearProbe(x.shape[1], y.shape[1]).to(dev).train()
    lr = s.blr * bs / 256
    opt = make_optimizer(head, s, lr)
    step = 0
    for _ in range(s.epochs):
        perm = torch.randperm(n, generator=gen).to(dev)  # [N]
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]  # [bs]
            for g in opt.param_groups:
                g["lr"] = probe_lr(step, steps, s, lr)
            loss = bce_masked(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


@torch.no_grad()
def head_scores(head: LinearProbe, feats: np.ndarray, device) -> np.ndarray:
    x = torch.as_tensor(feats, dtype=torch.float32, device=torch.device(device))
    return torch.sigmoid(head(x)).double().cpu().numpy()  # [N, C]


# ----------------------------------------------------------------------------- the command

def check_splits(data: str | Path, splits: list[str]) -> list[str]:
    """Label names of the packed dataset; every split present and with that label count."""
    manifest = read_manifest(data)
    names = list(manifest["label_names"])
    have = manifest.get("splits", {})
    for split in splits:
        if split not in have:
            raise ProbeError(f"{data}: no split '{split}' (it has: {', '.join(have)})")
        meta = have[split]
        lab = Path(data) / meta["labels"] if isinstance(meta, dict) and "labels" in meta else None
        if lab is not None and lab.is_file():
            shape = np.load(lab, mmap_mode="r").shape
            if len(shape) != 2 or shape[1] != len(names):
                raise ProbeError(f"{data}: split '{split}' has labels of shape {list(shape)}, but the manifest "
                                 f"names {len(names)} labels; the splits disagree, re-convert the dataset")
    return names


def default_out(ckpt: Optional[str]) -> Path:
    if ckpt is not None and Path(ckpt).resolve().parent.name == "checkpoints":
        return Path(ckpt).resolve().parent.parent / "probe"
    return Path("probe")


def run_probe(ckpt: Optional[str], data: str | Path, *, train_split: str = "train", test_split: str = "test",
              pool: str = "mean", random_init: bool = False, config: Optional[str] = None,
              overrides: Optional[list[str] | dict] = None, out: Optional[str | Path] = None,
              cache_dir: Optional[str | Path] = None, settings: Optional[ProbeSettings] = None,
              n_boot: int = 1000, device: str = "auto", batch_size: Optional[int] = None,
              compare: bool = False) -> dict:
    """Linear probe of a frozen encoder -> results dict (also OUT/probe_<test>.json). The Python
    entry point of `fasttrain probe` (used by `fasttrain ablate` and the reproduction pipeline)."""
    s = settings or ProbeSettings()
    if pool not in POOLS:
        raise ProbeError(f"--pool {pool!r}: choose one of {', '.join(POOLS)}")
    if random_init == (ckpt is not None):
        raise ProbeError("give exactly one of --ckpt CKPT and --random-init")
    if ckpt is not None and not Path(ckpt).is_file():
        raise FileNotFoundError(f"--ckpt checkpoint not found: {ckpt}")
    names = check_splits(data, [train_split, test_split])
    cfg = probe_config(ckpt, config, overrides)
    cfg.data.path = str(data)
    # the probe reads one packed dataset: a pre-training mixture's sampling settings do not apply
    cfg.data.weights, cfg.data.samples_per_epoch = None, None
    cfg.run.seed = s.seed  # draws data.label_fraction's patients for the cached features and --compare alike
    dev = resolve_device(device)
    model = build_encoder(cfg, len(names), ckpt, random_init, seed=s.seed).to(dev)
    ckpt_hash = file_sha256(ckpt) if ckpt is not None else f"random-init-seed{s.seed}"
    out = Path(out) if out is not None else default_out(ckpt)
    cache = Path(cache_dir) if cache_dir is not None else out / "features"

    t0 = time.perf_counter()
    x_tr, y_tr, hit_tr = cached_features(model, cfg, train_split, pool, ckpt_hash, cache, dev, batch_size)
    x_te, y_te, hit_te = cached_features(model, cfg, test_split, pool, ckpt_hash, cache, dev, batch_size)
    t_extract = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = train_head(x_tr, y_tr, s, dev)
    t_head = time.perf_counter() - t0
    scores = head_scores(head, x_te, dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap_auc(y_te.astype(np.float64), scores, names, n_boot=n_boot, seed=s.seed)
    manifest = read_manifest(data)
    result.update(kind="probe", checkpoint=str(ckpt) if ckpt else None, random_init=random_init, data=str(data),
                  dataset=manifest.get("dataset"), synthetic=bool(manifest.get("synthetic", False)),
                  train_split=train_split, split=test_split, pool=pool, n_train=int(len(x_tr)),
                  n_images=int(len(x_te)), feature_dim=int(x_tr.shape[1]), settings=asdict(s),
                  cache={"dir": str(cache), "train_hit": hit_tr, "test_hit": hit_te},
                  time_s={"features": t_extract, "head": t_head})
    if compare:
        result["compare"] = compare_reference(model, cfg, names, s, dev, train_split, test_split, pool,
                                              cached_s=t_extract + t_head, cached_mauc=result["mauc"],
                                              cached_features_hit=hit_tr and hit_te, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic_with(out / f"scores_{test_split}.npy", lambda f: np.save(f, scores.astype(np.float32)))
    path = out / f"probe_{test_split}.json"
    result["paths"] = {"results": str(path), "scores": str(out / f"scores_{test_split}.npy")}
    write_json_atomic(path, result)
    return result


# ----------------------------------------------------------------------------- the anchors' way

def compare_reference(model, cfg, names, s: ProbeSettings, dev, train_split: str, test_split: str, pool: str, *,
                      cached_s: float, cached_mauc, cached_features_hit: bool, batch_size=None) -> dict:
    """The anchors' probe: the frozen encoder runs on every (augmented) training batch of every
    epoch, same head, optimiser, schedule and epochs; then the test split once. Time and mAUC."""
    bs = s.batch_size
    loader = build_loader(cfg.data, train_split, train=True, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                          device=dev, dtype=torch.float32, seed=s.seed, batch_size=bs, drop_last=True)
    steps = len(loader)
    if steps < 1:
        raise ProbeError(f"--compare: the train split has fewer than batch_size={bs} images; lower --batch-size")
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    head = None
    step = 0
    for epoch in range(s.epochs):
        loader.set_epoch(epoch)
        for images, y in loader:
            f = encode(model, images.to(dev, non_blocking=True), pool)  # [B, D] the encoder, every epoch
            if head is None:
                head = LinearProbe(f.shape[1], len(names)).to(dev).train()
                lr = s.blr * bs / 256
                opt = make_optimizer(head, s, lr)
            for g in opt.param_groups:
                g["lr"] = probe_lr(step, steps, s, lr)
            loss = bce_masked(head(f), y.to(dev).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    test = build_loader(cfg.data, test_split, train=False, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                        device=dev, dtype=torch.float32, batch_size=batch_size)
    x_te, y_te = extract(model, test, pool, dev)
    t_ref = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref_mauc = mean_auc(y_te, head_scores(head.eval(), x_te, dev), names)
    return {"epochs": s.epochs, "reference_s": t_ref, "cached_s": cached_s, "speedup": t_ref / max(cached_s, 1e-9),
            "reference_mauc": ref_mauc, "cached_mauc": cached_mauc, "cached_features_were_cached": cached_features_hit,
            "note": "reference = encoder on every augmented train batch every epoch (MAE/Xiao linprobe); "
                    "cached = features extracted once (eval transform) + head on the cached matrix"}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fasttrain probe", description=(
        "Linear probe (BatchNorm + Linear, 90 epochs, as MAE's) of a frozen encoder on features "
        "extracted once and cached; per-label AUC and mAUC with bootstrap CIs. Dotted config overrides "
        "(e.g. --data.eval_resize=64) may follow."))
    p.add_argument("--ckpt", help="pre-trained encoder: ours (RUN/checkpoints/last.pt), MAE, Xiao et al., timm export")
    p.add_argument("--random-init", action="store_true", help="a randomly initialised encoder (the floor)")
    p.add_argument("--config", help="architecture/eval transform for a foreign checkpoint or --random-init "
                                    "(e.g. configs/finetune_nih.yaml); ours carry their own")
    p.add_argument("--data", required=True, help="packed dataset folder")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--pool", default="mean", choices=POOLS, help="mean of patch tokens (as the classifier) or cls")
    p.add_argument("--out", help="results folder (default RUN/probe for our checkpoints, else ./probe)")
    p.add_argument("--cache", help="feature cache folder (default OUT/features)")
    p.add_argument("--epochs", type=int, default=ProbeSettings.epochs)
    p.add_argument("--batch-size", type=int, default=ProbeSettings.batch_size, help="head batch size")
    p.add_argument("--blr", type=float, default=ProbeSettings.blr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--compare", action="store_true", help="also run the anchors' probe (encoder every epoch) and time both")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like --section.key=value)")

    s = ProbeSettings(epochs=args.epochs, batch_size=args.batch_size, blr=args.blr, seed=args.seed)
    res = run_probe(args.ckpt, args.data, train_split=args.train_split, test_split=args.test_split, pool=args.pool,
                    random_init=args.random_init, config=args.config, overrides=rest or None, out=args.out,
                    cache_dir=args.cache, settings=s, n_boot=args.bootstrap, device=args.device, compare=args.compare)
    if args.json:
        print(json.dumps(res, default=str))
        return 0
    tag = "SYNTHETIC phantoms: " if res["synthetic"] else ""
    src = "random init" if res["random_init"] else res["checkpoint"]
    print(format_table(res, f"{tag}linear probe ({args.pool} pool) of {src} on {res['dataset']} {args.test_split}, "
                            f"{res['n_images']} images, 95% CI from {args.bootstrap} bootstrap resamples"))
    print(f"features: {res['cache']['dir']} (train {'cached' if res['cache']['train_hit'] else 'extracted'}, "
          f"test {'cached' if res['cache']['test_hit'] else 'extracted'}); "
          f"time: features {res['time_s']['features']:.1f} s, head {res['time_s']['head']:.1f} s")
    if "compare" in res:
        c = res["compare"]
        print(f"compare ({c['epochs']} epochs): encoder every epoch {c['reference_s']:.1f} s, mAUC "
              f"{c['reference_mauc']:.4f}; cached features {c['cached_s']:.1f} s, mAUC {c['cached_mauc']:.4f}; "
              f"{c['speedup']:.1f}x less time")
    print(f"results: {res['paths']['results']}")
    return 0
