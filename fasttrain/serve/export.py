"""`fasttrain export --ckpt CKPT --format timm|onnx [--out PATH]`: hand a model to someone else.

timm  A pre-training checkpoint: the student encoder as a timm ViT state dict
      (models.checkpoints.export_timm; `timm.create_model(<name>, num_classes=0)` loads it).
      A fine-tuned checkpoint: the whole classifier as timm's VisionTransformer with
      global_pool='avg' (mean over patch tokens, fc_norm, head: MAE's fine-tuning model, which is
      timm's own layout), in_chans as trained. Both loaded back into timm after writing (strict)
      and compared with our model on a few inputs; the max abs difference is reported.
onnx  A fine-tuned classifier: input `image` float32 [batch, in_chans, img_size, img_size]
      (already through the eval transform: resize, center crop, normalise; the file's metadata
      says which), output `logits` [batch, num_classes], the batch axis dynamic. Checked after
      writing: onnx.checker, then ONNX Runtime (when installed: `pip install fasttrain[onnx]`)
      against PyTorch's fp32 logits at two batch sizes; max abs diff must be < 1e-4.

Every file is written (atomically: fasttrain.io.write_atomic) only after its check passed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import timm
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from fasttrain.config import config_from_dict
from fasttrain.data.gpu_augment import eval_resize_size, norm_stats
from fasttrain.io import write_atomic
from fasttrain.models.checkpoints import CheckpointError, export_timm, load_into, timm_name_for
from fasttrain.provenance import provenance
from fasttrain.serve.predict import PredictError, load_for_inference
from fasttrain.train.builders import build_student, input_norms
from fasttrain.train.checkpoint import load_checkpoint

ONNX_TOL = 1e-4  # fp32: ORT and PyTorch differ by kernel order only (~1e-6 seen on ViT-T)
FORMATS = ("timm", "onnx")


def _probe_inputs(model, batches=(1, 3), seed: int = 0) -> list[torch.Tensor]:
    """Normalised-image-like inputs [B, C, H, W] (N(0, 1) is the normalised pixels' scale)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, model.in_chans, model.img_size, model.img_size, generator=g) for b in batches]


def default_out(ckpt: str | Path, fmt: str) -> Path:
    """RUN/checkpoints/best.pt -> RUN/export/best.{safetensors,onnx}."""
    ckpt = Path(ckpt)
    return ckpt.resolve().parent.parent / "export" / (ckpt.stem + (".safetensors" if fmt == "timm" else ".onnx"))


# ----------------------------------------------------------------------------- timm

def export_timm_checkpoint(ckpt: str | Path, out: Path) -> dict:
    ck = load_checkpoint(ckpt)
    if out.suffix != ".safetensors":
        raise PredictError(f"--out {out}: a timm export is a .safetensors file")
    if ck.get("kind") == "pretrain":
        cfg = config_from_dict(ck["config"])
        student = build_student(cfg)
        load_into(student, ck["model"], strict=True, what=str(ckpt))  # ETMAE: the student, not the projection head
        export_timm(student, out, input_norm=input_norms(cfg.data.norm))  # exact on the run's RGB normalisation
        return {"format": "timm", "out": str(out), "what": "pre-trained encoder (num_classes=0)"}
    if ck.get("kind") != "finetune":
        raise PredictError(f"{ckpt}: not a fasttrain pretrain or finetune checkpoint (kind={ck.get('kind')!r})")
    model, cfg, names, size = load_for_inference(ckpt, ck=ck)
    return export_timm_classifier(model, out, names)


def timm_classifier_kwargs(model) -> dict:
    return dict(model.encoder_config(), num_classes=model.num_classes, global_pool="avg", class_token=True)


def export_timm_classifier(model, out: Path, label_names: list[str]) -> dict:
    """Our ViTClassifier -> timm VisionTransformer(global_pool='avg') state dict, checked in timm."""

    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    kwargs = timm_classifier_kwargs(model)
    name = timm_name_for(model)
    meta = {"format": "pt", "timm_model": name or "", "timm_kwargs": json.dumps(kwargs),
            "label_names": json.dumps(label_names), "exported_by": "fasttrain",
            "provenance": json.dumps(provenance("cpu"), default=str)}
    data = safetensors_bytes(state, metadata=meta)
    ref = timm.create_model(name, pretrained=False, **kwargs) if name else timm.models.VisionTransformer(**kwargs)
    ref.load_state_dict(safetensors_load(data), strict=True)  # every key, every shape
    diff = _max_diff(model, ref)
    if diff > ONNX_TOL:
        raise RuntimeError(f"timm model loaded from {out} differs from ours by {diff:.3g} (> {ONNX_TOL})")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, data)
    return {"format": "timm", "out": str(out), "what": f"classifier ({len(label_names)} labels)",
            "timm_model": name, "timm_kwargs": kwargs, "max_abs_diff": diff}


@torch.no_grad()
def _max_diff(ours, theirs) -> float:
    ours, theirs = ours.eval().float(), theirs.eval().float()
    return max(float((ours(x) - theirs(x)).abs().max()) for x in _probe_inputs(ours))


# ----------------------------------------------------------------------------- ONNX

class _Logits(torch.nn.Module):
    """The classifier in fp32, eval mode: image [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def onnx_runtime_available() -> Optional[str]:
    """None when onnxruntime imports, else why not."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"onnxruntime is not installed ({e}); `pip install fasttrain[onnx]` to check the export"
    return None


EXPORTERS = ("dynamo", "torchscript")


def export_onnx(ckpt: str | Path, out: Path, opset: int = 18, check: bool = True, exporter: str = "dynamo") -> dict:
    if out.suffix != ".onnx":
        raise PredictError(f"--out {out}: an ONNX export is a .onnx file")
    if exporter not in EXPORTERS:
        raise PredictError(f"--exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    model, cfg, names, size = load_for_inference(ckpt)  # refuses a checkpoint without a classifier head
    try:
        import onnx
    except ImportError as e:
        raise PredictError(f"ONNX export needs the onnx package ({e}): pip install 'fasttrain[onnx]'") from None
    model = model.float().eval()
    net = _Logits(model).eval()
    probes = _probe_inputs(model)
    with torch.no_grad():
        want = [net(x).numpy() for x in probes]  # PyTorch fp32 logits, the reference
    with tempfile.TemporaryDirectory(prefix="fasttrain-onnx-") as work:
        tmp = Path(work) / out.name  # the exporters write a file; `out` gets the checked bytes
        if exporter == "dynamo":
            # torch.export + onnxscript: torch's maintained exporter (~20 s even for a 2-block test
            # model on a loaded 2-core CPU); the batch axis is declared dynamic, not traced
            prog = torch.onnx.export(net, (probes[0],), dynamo=True, input_names=["image"], output_names=["logits"],
                                     dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset,
                                     verbose=False)
            prog.save(str(tmp))
        else:
            # the TorchScript tracer: deprecated by torch but ~1 s, and needs no onnxscript
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
                torch.onnx.export(net, (probes[0],), str(tmp), dynamo=False, input_names=["image"],
                                  output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=opset)
        proto = onnx.load(str(tmp))
        mean, std = norm_stats(cfg.data.norm, cfg.model.in_chans)
        meta = {"label_names": json.dumps(names), "exported_by": "fasttrain", "checkpoint": str(ckpt),
                "input": (f"float32 [batch, {cfg.model.in_chans}, {cfg.model.img_size}, {cfg.model.img_size}]: "
                          f"grey image decoded and resized to {size}x{size} as `fasttrain convert` does, resized "
                          f"(shorter side {eval_resize_size((size, size), cfg.model.img_size, cfg.data.eval_resize)}, "
                          f"PIL bilinear), center-cropped, /255, (x - mean) / std"),
                "mean": json.dumps(mean), "std": json.dumps(std), "output": "logits; sigmoid gives probabilities",
                "provenance": json.dumps(provenance("cpu"), default=str)}
        for k, v in meta.items():
            onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, k: v})
        data = proto.SerializeToString()
        onnx.checker.check_model(proto, full_check=True)
        result = {"format": "onnx", "out": str(out), "opset": opset, "exporter": exporter, "labels": names,
                  "checked_with": None,
                  "max_abs_diff": None}
        why = onnx_runtime_available() if check else "check skipped (--no-check)"
        if why is None:
            import onnxruntime as ort
            sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            diff = 0.0
            for x, w in zip(probes, want):
                got = sess.run(["logits"], {"image": x.numpy()})[0]
                if got.shape != w.shape:
                    raise RuntimeError(f"ONNX Runtime returned {got.shape} for a batch of {x.shape[0]}; "
                                       f"expected {w.shape}")
                diff = max(diff, float(abs(got - w).max()))
            if not diff < ONNX_TOL:
                raise RuntimeError(f"{out}: ONNX Runtime logits differ from PyTorch's by {diff:.3g} (>= {ONNX_TOL}); "
                                   f"not written")
            result.update(checked_with=f"onnxruntime {ort.__version__}", max_abs_diff=diff,
                          batch_sizes=[int(x.shape[0]) for x in probes])
        else:
            result["not_checked"] = why
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, data)
    return result


def export_checkpoint(ckpt: str | Path, fmt: str, out: str | Path | None = None, check: bool = True,
                      exporter: str = "dynamo") -> dict:
    if fmt not in FORMATS:
        raise PredictError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    out = Path(out) if out else default_out(ckpt, fmt)
    if fmt == "timm":
        return export_timm_checkpoint(ckpt, out)
    return export_onnx(ckpt, out, check=check, exporter=exporter)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fasttrain export", description=(
        "timm: a pre-trained encoder or a fine-tuned classifier as a timm safetensors state dict; "
        "onnx: a fine-tuned classifier (dynamic batch), checked with ONNX Runtime against PyTorch."))
    p.add_argument("--ckpt", required=True, help="RUN/checkpoints/best.pt (finetune) or last.pt (pretrain, timm only)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", default=None, help="output file (default RUN/export/<ckpt>.safetensors | .onnx)")
    p.add_argument("--no-check", action="store_true", help="onnx: skip the ONNX Runtime comparison")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="onnx: dynamo (torch.export + onnxscript, default) or torchscript (the older tracer, faster)")
    args = p.parse_args(argv)
    try:
        res = export_checkpoint(args.ckpt, args.format, args.out, check=not args.no_check, exporter=args.exporter)
    except (PredictError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"fasttrain export: error: {e}", file=sys.stderr)
        return 2
    line = f"exported {args.format} -> {res['out']}"
    if res.get("max_abs_diff") is not None:
        line += f" (max abs diff vs PyTorch fp32: {res['max_abs_diff']:.2e}"
        line += f", {res['checked_with']})" if res.get("checked_with") else ", timm)"
    print(line)
    if res.get("not_checked"):
        print(f"  not checked with ONNX Runtime: {res['not_checked']}", file=sys.stderr)
    return 0
