"""Checkpoint I/O: read teacher / MAE / timm / our own checkpoints, load them strictly, export.

Formats read:
  - Xiao et al.'s X-ray MAE checkpoints and the official MAE ones: {"model": state, "args": Namespace,
    ...} with the encoder keys (vit.py) plus decoder_embed, mask_token, decoder_pos_embed,
    decoder_blocks.*, decoder_norm, decoder_pred;
  - plain timm ViT state dicts (.pth/.bin or .safetensors), optionally under "state_dict";
  - ours: {"model": MAE / ETMAE / classifier state dict, ...}; ETMAE keys carry `student.` and `proj.`.
Key prefixes added by DDP (`module.`) and torch.compile (`_orig_mod.`) are stripped.

Loading is strict by default: every missing, unexpected and shape-mismatched key is listed in a
CheckpointError naming the file (`strict=False` in torch hides wrong architectures, e.g.
a 6-head teacher loaded into a 12-head model without a word). The only conversions are explicit
and logged: position-embedding grids (sin-cos recomputed, learned tables resampled bicubic) and
input channels (3 -> 1 sums the patch-embedding weights, 1 -> 3 repeats them / 3).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from timm.layers import resample_abs_pos_embed

from fasttrain.io import write_atomic
from fasttrain.models.distill import student_of
from fasttrain.models.vit import ViTEncoder, is_encoder_key, sincos_pos_embed_2d

log = logging.getLogger(__name__)

# Keys a checkpoint may nest its weights under, in the order they are tried.
STATE_KEYS = ("model", "state_dict", "model_state_dict", "model_state")
# Segments inserted by wrappers: DDP (`module.`) and torch.compile (`_orig_mod.`).
WRAPPER_SEGMENTS = ("module", "_orig_mod")
DECODER_PREFIXES = ("decoder_", "mask_token")  # the MAE decoder (a teacher never runs it)
POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")
PATCH_WEIGHT = "patch_embed.proj.weight"
PATCH_BIAS = "patch_embed.proj.bias"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


# ----------------------------------------------------------------------------- reading

def safe_globals() -> list:
    """Non-tensor objects MAE-style checkpoints carry next to the weights (MAE's save_model
    pickles the argparse Namespace and numpy scalars); allowed for weights_only loading."""
    g: list = [argparse.Namespace]
    try:  # numpy scalar reconstruction, as written by numpy 1.x and 2.x
        from numpy.core.multiarray import scalar  # type: ignore
        g.append(scalar)
    except Exception:  # pragma: no cover - numpy layout differences
        pass
    try:
        from numpy._core.multiarray import scalar as scalar2  # type: ignore
        g.append(scalar2)
    except Exception:  # pragma: no cover
        pass
    g += [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
    return g


def read_checkpoint(source: Any, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Path or already-loaded object -> (state dict with wrapper prefixes stripped, meta).

    meta: {"what": a name for messages, "top_keys": the top-level keys, "args_model": the
    registry name stored in MAE-style `args`, if any}. `.safetensors` files are read with
    safetensors; everything else with torch.load(weights_only=True) plus MAE's Namespace. A file
    needing arbitrary unpickling fails unless allow_pickle=True (trusted files only).
    """
    what = str(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    if isinstance(source, (str, os.PathLike)):
        obj = _load_file(Path(source), allow_pickle)
    else:
        obj = source
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{what}: expected a dict of tensors, got {type(obj).__name__}")
    meta: dict = {"what": what, "top_keys": sorted(map(str, obj.keys()))[:20], "args_model": None}
    args = obj.get("args")
    if args is not None:
        meta["args_model"] = getattr(args, "model", None) if not isinstance(args, Mapping) else args.get("model")
    state = None
    for k in STATE_KEYS:
        if k in obj and isinstance(obj[k], Mapping):
            state = obj[k]
            meta["nested_under"] = k
            break
    if state is None:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj
        else:
            raise CheckpointError(
                f"{what}: no weights found: expected a raw state dict or one under {list(STATE_KEYS)}; "
                f"top-level keys: {meta['top_keys']}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{what}: non-tensor entries in the state dict: {bad[:10]}")
    return normalize_keys(state), meta


def read_state_dict(source: Any, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Path (.pth/.pt/.bin/.safetensors) or loaded dict -> flat state dict (see read_checkpoint)."""
    return read_checkpoint(source, allow_pickle)[0]


def _load_file(path: Path, allow_pickle: bool) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with generic advice; the line that matters is the unpickler's own
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused is None:  # not a pickle of refused objects: garbage, an HTML page, a corrupt file
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(e), re.S)
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or not a .pth file: "
                                  f"{detail.group(1) if detail else str(e).splitlines()[0]})") from e
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: holds a {refused.group(1)} object, which torch.load(weights_only=True) refuses; "
                "if you trust the file, load it with allow_pickle=True") from e
        log.warning("%s: unpickling with weights_only=False (allow_pickle=True)", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        hint = " (truncated or corrupt download?)" if "zip archive" in str(e) else ""
        raise CheckpointError(f"{path}: unreadable checkpoint{hint}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e


def normalize_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) segments from every key."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        nk = ".".join(seg for seg in k.split(".") if seg not in WRAPPER_SEGMENTS)
        if nk in out:
            raise CheckpointError(f"keys '{k}' and another collapse to '{nk}' after stripping wrapper prefixes")
        out[nk] = v
    return out


def sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under `prefix` with the prefix removed (e.g. the student of an ETMAE state dict)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- conversions

def _grid(n_tokens: int, key: str, what: str) -> int:
    g = int(round(n_tokens ** 0.5))
    if g * g != n_tokens:
        raise CheckpointError(f"{what}: {key} has {n_tokens} patch positions, not a square grid")
    return g


def convert_pos_embed(value: torch.Tensor, target: torch.Tensor, key: str, what: str) -> tuple[torch.Tensor, str]:
    """[1, 1+L_old, D] -> [1, 1+L_new, D]. A sin-cos table is recomputed for the new grid (it is a
    function of the grid); a learned one is resampled bicubic (timm's resample_abs_pos_embed, as MAE's fine-tuning does)."""

    d = value.shape[-1]
    notes = []
    n_old = value.shape[1]
    if int(round(n_old ** 0.5)) ** 2 == n_old and int(round((n_old - 1) ** 0.5)) ** 2 != n_old - 1:
        # no cls slot (timm's no_embed_class): the cls token gets no position, i.e. a zero slot
        value = torch.cat([value.new_zeros(1, 1, d), value], dim=1)
        notes.append("zero cls slot added")
    g_old = _grid(value.shape[1] - 1, key, what)
    g_new = _grid(target.shape[1] - 1, key, what)
    if g_old == g_new:
        return value, f"{key}: " + ", ".join(notes)
    table_old = sincos_pos_embed_2d(d, g_old) if d % 4 == 0 else None
    if table_old is not None and torch.allclose(value.float(), table_old, atol=1e-4):
        new = sincos_pos_embed_2d(d, g_new).to(value.dtype)
        return new, f"{key}: sin-cos table recomputed for a {g_new}x{g_new} grid (checkpoint: {g_old}x{g_old})"
    # antialias off: the same resampling as MAE's (and Xiao et al.'s) interpolate_pos_embed
    new = resample_abs_pos_embed(value.float(), [g_new, g_new], [g_old, g_old], num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=False).to(value.dtype)
    return new, f"{key}: learned table resampled bicubic {g_old}x{g_old} -> {g_new}x{g_new}"


# Input normalisation per input-channel count: {1: (mean, std), 3: (mean, std)}, one value per
# channel in [0, 1] pixel units (fasttrain.data.gpu_augment.norm_stats gives both for a data.norm).
InputNorm = Mapping[int, tuple[tuple[float, ...], tuple[float, ...]]]


def convert_in_chans(weight: torch.Tensor, bias: torch.Tensor | None, target_chans: int, key: str,
                     input_norm: InputNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """patch_embed.proj (weight [D, C, p, p], bias [D]) between 1 and 3 input channels, exact on
    a grey image g in [0, 1]: the converted model on g normalised with input_norm[target] gives
    the source model's response to g replicated and normalised with input_norm[C].

    The source sees channel c = (g - m_c) / s_c; the target's 1 channel x = (g - m) / s. So
      3 -> 1:  W' = sum_c W_c s / s_c,         b' = b + sum_c sum(W_c) (m - m_c) / s_c
      1 -> 3:  W'_c = W s_c / (3 s),           b' = b + sum(W) (mean_c m_c - m) / s
    (sum(W) over the p x p taps: the response to a constant image). input_norm None: the pixels
    are not normalised per channel (s = 1, m = 0): RGB filters summed / repeated and divided by 3.
    """
    c = weight.shape[1]
    if sorted((c, target_chans)) != [1, 3]:
        raise CheckpointError(f"{key}: cannot convert {c} input channels to {target_chans}")
    folded = input_norm is not None
    if input_norm is None:
        input_norm = {1: ((0.0,), (1.0,)), 3: ((0.0,) * 3, (1.0,) * 3)}
    for n in (c, target_chans):
        if n not in input_norm or any(len(v) != n for v in input_norm[n]):
            raise CheckpointError(f"{key}: converting {c} -> {target_chans} input channels needs the input "
                                  f"normalisation of {n} channels (mean, std per channel), got {input_norm.get(n)}")
    w = weight.double()
    ms, ss = (torch.tensor(v, dtype=torch.float64) for v in input_norm[c])  # [C] source
    mt, st = (torch.tensor(v, dtype=torch.float64) for v in input_norm[target_chans])  # [C'] target
    taps = w.sum(dim=(2, 3))  # [D, C] response to a constant 1 image
    if target_chans == 1:
        new_w = (w * (st / ss).view(1, -1, 1, 1)).sum(dim=1, keepdim=True)  # [D, 1, p, p]
        shift = (taps * ((mt - ms) / ss).view(1, -1)).sum(dim=1)  # [D]
        how = "RGB filters x s/s_c summed"
    else:
        new_w = w.repeat(1, 3, 1, 1) * (st / (3 * ss)).view(1, -1, 1, 1)  # [D, 3, p, p]
        shift = taps[:, 0] * (mt.mean() - ms[0]) / ss[0]  # [D]
        how = "filter repeated over RGB x s_c/(3 s)"
    if bias is None and bool(shift.abs().max() > 0):
        raise CheckpointError(f"{key}: the {c} -> {target_chans} channel conversion shifts the patch bias, "
                              "but the checkpoint has no patch_embed.proj.bias")
    new_b = None if bias is None else (bias.double() + shift).to(bias.dtype)
    note = (f"{key}: {c} -> {target_chans} input channels ({how}"
            + (", bias shifted: the input normalisation folded in)" if folded else ")"))
    return new_w.to(weight.dtype), new_b, note


def convert_pred_chans(w: torch.Tensor, b: torch.Tensor | None, p: int, c_old: int, c_new: int):
    """decoder_pred [p*p*C, Dd] (pixels ordered row, col, channel) between 1 and 3 channels.

    3 -> 1 averages the RGB outputs of each pixel (a gray target replicated in RGB has equal
    channels); 1 -> 3 repeats the gray output for each channel."""
    def conv(t):
        t = t.reshape(p * p, c_old, *t.shape[1:])  # [p*p, C_old, ...]
        t = t.mean(dim=1, keepdim=True) if c_new == 1 else t.repeat(1, 3, *([1] * (t.dim() - 2)))
        return t.reshape(p * p * c_new, *t.shape[2:])
    return conv(w), (conv(b) if b is not None else None)


# ----------------------------------------------------------------------------- strict loading

@dataclass
class LoadReport:
    what: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys absent from the checkpoint (not allowed)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model does not have
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint shape, model shape)
    ignored: list[str] = field(default_factory=list)  # checkpoint keys dropped on purpose (ignore_prefixes)
    left_at_init: list[str] = field(default_factory=list)  # model keys allowed to be missing (e.g. a new head)
    notes: list[str] = field(default_factory=list)  # conversions performed

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """Every missing, unexpected and mismatched key (one mismatch per line)."""
        lines = []
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.mismatched:
            lines.append(f"  shape mismatches ({len(self.mismatched)}):")
            lines += [f"    {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
        return "\n".join(lines)

    def summary(self) -> str:
        s = f"{self.what}: loaded {len(self.loaded)} tensors"
        if self.ignored:
            s += f", ignored {len(self.ignored)}"
        if self.left_at_init:
            s += f", {len(self.left_at_init)} left at init ({', '.join(self.left_at_init)})"
        if not self.ok:
            s += "\n" + self.problems()
        return s


def describe_state(state: Mapping[str, torch.Tensor]) -> str:
    """Infer the architecture of a ViT/MAE state dict (for error messages)."""
    parts = []
    if "cls_token" in state:
        parts.append(f"embed_dim {state['cls_token'].shape[-1]}")
    depth = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if depth:
        parts.append(f"depth {max(depth) + 1}")
    if PATCH_WEIGHT in state:
        w = state[PATCH_WEIGHT]
        parts.append(f"patch {w.shape[-1]}, in_chans {w.shape[1]}")
    if "pos_embed" in state:
        parts.append(f"{state['pos_embed'].shape[1] - 1} positions")
    ddepth = {int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks.")}
    if "decoder_embed.weight" in state:
        parts.append(f"decoder {state['decoder_embed.weight'].shape[0]}-d x {max(ddepth) + 1 if ddepth else 0}")
    return ", ".join(parts) or "unrecognised layout"


def _registry_size_for(state: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """(size letter, registry name family) of a state dict's encoder width, if it is one of ours."""
    d = state["cls_token"].shape[-1] if "cls_token" in state else None
    size = {192: "tiny", 384: "small", 768: "base"}.get(d)
    if size is None:
        return None
    return size[0], f"mae_vit_{size}_patch16 / vit_{size}_patch16"


def describe_model(model: nn.Module) -> str:
    return describe_state(model.state_dict()) + (
        f", {model.num_heads} heads" if hasattr(model, "num_heads") else "")


def load_into(model: nn.Module, state: Any, strict: bool = True, ignore_prefixes: Iterable[str] = (),
              allow_missing: Iterable[str] = (), what: str | None = None, allow_pickle: bool = False,
              log_ignored: bool = True, explained: Iterable[str] = (), input_norm: InputNorm | None = None
              ) -> LoadReport:
    """Load `state` (path, checkpoint dict or state dict) into `model`, strictly.

    ignore_prefixes: checkpoint keys starting with these are dropped (and reported as ignored);
    allow_missing: model keys starting with these may be absent (left at their init). Position
    embeddings and input channels are converted when they differ (logged). With strict=True any
    other difference raises CheckpointError listing every missing, unexpected and mismatched key;
    with strict=False the matching tensors are loaded and the report lists the rest.
    input_norm: the input normalisation per channel count, which makes a 3 <-> 1 channel
    conversion exact (convert_in_chans); None = un-normalised pixels.
    """
    if isinstance(state, (str, os.PathLike)) or not _is_flat_tensor_dict(state):
        state, meta = read_checkpoint(state, allow_pickle)
        what = what or meta["what"]
    else:
        state = normalize_keys(state)
    what = what or "checkpoint"
    report = LoadReport(what=what)
    target = model.state_dict()
    state = dict(state)

    # our ETMAE checkpoints: the student's weights sit under `student.`
    if not any(k.startswith("student.") for k in target) and any(k.startswith("student.") for k in state) \
            and not any(k in target for k in state):
        state = sub_state(state, "student.")
        report.notes.append("took the student (`student.*`) from an ETMAE checkpoint")

    ignore_prefixes = tuple(ignore_prefixes)
    if ignore_prefixes:
        for k in [k for k in state if k.startswith(ignore_prefixes)]:
            report.ignored.append(k)
            del state[k]

    _convert(model, state, target, report, input_norm)

    allow_missing = tuple(allow_missing)
    for k, v in target.items():
        if k not in state:
            (report.left_at_init if allow_missing and k.startswith(allow_missing) else report.missing).append(k)
    for k, v in state.items():
        if k not in target:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(target[k].shape):
            report.mismatched.append((k, tuple(v.shape), tuple(target[k].shape)))
        else:
            report.loaded.append(k)

    if not report.ok and strict:
        hint = ""
        if any(k in ("cls_token", "blocks.0.attn.qkv.weight") for k, _, _ in report.mismatched):
            # said before the (long) key list, so it is what a reader sees first
            fits = _registry_size_for(state)
            hint = ("\n  -> a different model size" +
                    (f": the checkpoint is a ViT-{fits[0].upper()} (use {fits[1]})" if fits else
                     ": build the model whose registry name matches the checkpoint"))
        raise CheckpointError(
            f"{what} does not fit {type(model).__name__} "
            f"(checkpoint: {describe_state(state)}; model: {describe_model(model)}){hint}:\n{report.problems()}")
    to_load = {k: state[k] for k in report.loaded}
    result = model.load_state_dict(to_load, strict=False)
    # our own checks above must have caught everything torch would complain about
    leftover = set(result.missing_keys) - set(report.missing) - set(report.left_at_init)
    assert not result.unexpected_keys and not leftover, (result, leftover)
    for n in report.notes:
        log.warning("%s: %s", what, n)
    if report.ignored and log_ignored:
        log.warning("%s: ignored %d checkpoint keys under %s", what, len(report.ignored), list(ignore_prefixes))
    # keys the checkpoint had but we dropped on purpose are told by the line above (or the caller's),
    # not a second time as "not in the checkpoint"
    # (`explained`: prefixes of left-at-init keys the caller tells about in its own words)
    absent = [k for k in report.left_at_init if k not in set(report.ignored) and not k.startswith(tuple(explained))]
    if absent:
        log.warning("%s: %d model keys not in the checkpoint, left at init: %s", what, len(absent), ", ".join(absent))
    if not report.ok:
        log.warning("%s: loaded non-strictly:\n%s", what, report.problems())
    return report


def _is_flat_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _convert(model: nn.Module, state: dict, target: dict, report: LoadReport,
             input_norm: InputNorm | None = None) -> None:
    """In-place: position-embedding grids and input channels (everything else must match)."""
    for key in POS_EMBED_KEYS:
        if key in state and key in target and state[key].shape != target[key].shape \
                and state[key].dim() == 3 and state[key].shape[-1] == target[key].shape[-1]:
            state[key], note = convert_pos_embed(state[key], target[key], key, report.what)
            report.notes.append(note)
    if PATCH_WEIGHT in state and PATCH_WEIGHT in target:
        w, tw = state[PATCH_WEIGHT], target[PATCH_WEIGHT]
        if w.dim() == 4 and w.shape[1] != tw.shape[1] and w.shape[0] == tw.shape[0] and w.shape[2:] == tw.shape[2:]:
            c_old = w.shape[1]
            state[PATCH_WEIGHT], bias, note = convert_in_chans(w, state.get(PATCH_BIAS), tw.shape[1], PATCH_WEIGHT,
                                                               input_norm)
            if bias is not None:
                state[PATCH_BIAS] = bias
            report.notes.append(note)
            p = w.shape[-1]
            pw = state.get("decoder_pred.weight")
            tpw = target.get("decoder_pred.weight")
            if pw is not None and tpw is not None and pw.shape[0] == p * p * c_old and tpw.shape[0] == p * p * tw.shape[1]:
                state["decoder_pred.weight"], nb = convert_pred_chans(pw, state.get("decoder_pred.bias"), p, c_old,
                                                                      tw.shape[1])
                if nb is not None:
                    state["decoder_pred.bias"] = nb
                report.notes.append(f"decoder_pred: {c_old} -> {tw.shape[1]} output channels per pixel")


# ----------------------------------------------------------------------------- entry points

def load_teacher(name: str, path: Any, img_size: int = 224, in_chans: int = 3, allow_pickle: bool = False,
                 input_norm: InputNorm | None = None, **overrides) -> nn.Module:
    """Registry model `name` with the weights of `path`, frozen, in eval mode.

    The decoder keys (and a classifier head, if any) are ignored, and the log says so: the
    teacher never runs its decoder for its features. Everything else must fit strictly, so a
    ViT-B checkpoint for a ViT-S teacher fails here, before any training. `input_norm`: see
    load_into (an RGB checkpoint loaded as a 1-channel teacher).
    """
    from fasttrain.models import create_model  # cycle: fasttrain.models imports the classifier, which imports this module

    model = create_model(name, img_size=img_size, in_chans=in_chans, **overrides)
    state, meta = read_checkpoint(path, allow_pickle)
    what = f"teacher checkpoint {meta['what']}"
    if meta.get("args_model") and meta["args_model"] != name:
        log.warning("%s was saved by a run of model '%s'; loading as '%s'", what, meta["args_model"], name)
    ignore = DECODER_PREFIXES + ("head.", "fc_norm.")
    report = load_into(model, state, strict=True, ignore_prefixes=ignore, allow_missing=DECODER_PREFIXES, what=what,
                       log_ignored=False, explained=DECODER_PREFIXES, input_norm=input_norm)
    n_dec = sum(k.startswith(DECODER_PREFIXES) for k in report.ignored)
    log.warning("%s: loaded %d encoder tensors; %s", what, len(report.loaded),
                f"ignored its {n_dec} decoder keys (the teacher runs its encoder only; its decoder stays at init)"
                if n_dec else "it has no decoder (the teacher runs its encoder only; its decoder stays at init)")
    if len(report.ignored) > n_dec:
        log.warning("%s: also ignored %s", what, ", ".join(k for k in report.ignored if not k.startswith(DECODER_PREFIXES)))
    model.requires_grad_(False)
    model.eval()
    model.load_report = report
    return model


def load_encoder(model: ViTEncoder, source: Any, what: str | None = None, allow_pickle: bool = False,
                 input_norm: InputNorm | None = None) -> LoadReport:
    """Encoder weights (MAE / ETMAE student / timm) into a classifier or MAE-shaped encoder.

    Decoder keys are ignored, and for a model without a final `norm` (the mean-pool classifier,
    which uses fc_norm) the checkpoint's `norm.*` is ignored too; fc_norm/head keep their init
    when absent. Everything the encoder has must be present. `input_norm`: see load_into.
    """
    state, meta = read_checkpoint(source, allow_pickle)
    what = what or meta["what"]
    target = model.state_dict()
    ignore = list(DECODER_PREFIXES) + ["proj."]  # proj.*: the ETMAE projection heads
    if not any(k.startswith("norm.") for k in target):
        ignore.append("norm.")
    if not any(k.startswith("head.") for k in target):
        ignore += ["head.", "fc_norm."]
    report = load_into(model, state, strict=True, ignore_prefixes=tuple(ignore),
                       allow_missing=("fc_norm.", "head.", *DECODER_PREFIXES), what=what, log_ignored=False,
                       input_norm=input_norm)
    if report.ignored:
        log.warning("%s: not used by %s: %s", what, type(model).__name__,
                    ", ".join(sorted({k.split('.')[0] for k in report.ignored})))
    return report


def load_mae(name: str, path: Any, allow_pickle: bool = False, **overrides) -> nn.Module:
    """A whole MAE (encoder + decoder) from a checkpoint, strictly (resume, visualisation)."""
    from fasttrain.models import create_model  # cycle: fasttrain.models imports the classifier, which imports this module

    model = create_model(name, **overrides)
    model.load_report = load_into(model, path, strict=True, allow_pickle=allow_pickle)
    return model


# ----------------------------------------------------------------------------- export

_TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base"}


def timm_name_for(enc: ViTEncoder) -> str | None:
    """The timm model name with this encoder's shapes (e.g. vit_tiny_patch16_224), if one exists."""

    size = _TIMM_SIZES.get((enc.embed_dim, enc.depth, enc.num_heads))
    if size is None or enc.mlp_ratio != 4.0:
        return None
    name = f"vit_{size}_patch{enc.patch_size}_{enc.img_size}"
    return name if name in timm.list_models(name) else None


def export_timm(model: nn.Module, path: str | os.PathLike, in_chans: int | None = 3,
                input_norm: InputNorm | None = None) -> Path:
    """Write the (student) encoder as a plain timm ViT state dict (.safetensors), atomically.

    `model`: an MAE, an ETMAE (its student is exported) or a ViTEncoder with a final norm. The
    file loads with strict=True into `timm.create_model(<timm_model>, num_classes=0,
    in_chans=<in_chans>)` (both stored in the file's metadata) and gives the same
    forward_features. timm's pos_embed is a learned parameter of the same shape; the fixed
    sin-cos values are copied into it.

    in_chans: 3 (default, timm's own default) so that plain `timm.create_model(<timm_model>,
    num_classes=0)` loads the file as is; a grayscale (1-channel) student's patch filter is then
    repeated over RGB and divided by 3, which gives exactly its features on the grey image fed
    as three equal channels (what every RGB pipeline does); with `input_norm` (the run's
    normalisation, convert_in_chans) the filter is scaled per channel and the bias shifted, so
    the features are exact on the grey image replicated and normalised per channel as the run's
    3-channel input. None keeps the model's channels.
    """
    for attr in ("module", "_orig_mod"):  # DDP / torch.compile wrappers
        model = getattr(model, attr, model)
    enc = student_of(model)
    enc = getattr(enc, "_orig_mod", enc)
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"export_timm writes safetensors: name the file *.safetensors, got {path}")
    if not isinstance(enc, ViTEncoder) or not hasattr(enc, "norm"):
        raise ValueError(f"export_timm needs an MAE / ETMAE / ViT encoder with a final norm, got {type(model).__name__}")

    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
             for k, v in enc.state_dict().items() if is_encoder_key(k)}
    cfg = enc.encoder_config()
    if in_chans is not None and in_chans != cfg["in_chans"]:
        state[PATCH_WEIGHT], bias, note = convert_in_chans(state[PATCH_WEIGHT], state.get(PATCH_BIAS), in_chans,
                                                           PATCH_WEIGHT, input_norm)
        if bias is not None:
            state[PATCH_BIAS] = bias
        cfg["in_chans"] = in_chans
        log.info("export %s: %s", path, note)
    name = timm_name_for(enc)
    meta = {"format": "pt", "timm_model": name or "",
            "timm_kwargs": json.dumps({"num_classes": 0, **cfg}), "exported_by": "fasttrain"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, safetensors_bytes(state, metadata=meta))
    log.info("exported %d encoder tensors to %s (timm: %s)", len(state), path, name or f"VisionTransformer(**{cfg})")
    return path
