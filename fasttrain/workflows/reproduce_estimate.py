"""`fasttrain reproduce`, its estimates: the wall time of every stage before any runs.

A training stage from a short measured step on this machine (or, with --bench-steps 0, its
analytic FLOPs at an assumed MFU); an evaluation at a third of its fine-tuning step per image;
a conversion from a measured decode of a few source images.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from fasttrain.bench.flops import encoder_flops, etmae_step_flops, known_peak, measured_matmul_peak
from fasttrain.converters.decode import decode_file
from fasttrain.models import student_of
from fasttrain.train.builders import build_classifier
from fasttrain.train.engine import make_step
from fasttrain.train.optim import build_optimizer, param_groups_weight_decay
from fasttrain.workflows.reproduce_plan import Plan, Source, Stage

# GPU-hour estimates without a measurement (README, --bench-steps 0): an assumed model FLOPs
# utilisation of the dense bf16 peak. An assumption, not a measurement:
# ViT-B training commonly reaches 35-45% on H100s; ViT-T's 192-wide matmuls reach less, so 25%.
ASSUMED_MFU = 0.25


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_images_per_s(stage: Stage, model, steps: int, batch: int) -> float:
    """Images/s of `steps` timed steps (after one warm-up) of this stage's model and step, on random
    images at the configured size, uncompiled: the same TrainStep the trainers run."""
    cfg = stage.config
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, compile=False))
    dev = _device()
    model = model.to(dev).train()
    trainable = student_of(model)
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
    if stage.kind == "pretrain":
        student, teacher = student_of(model), getattr(model, "teacher", None)
        d = stage.config.distill
        return etmae_step_flops(student, teacher, stage.config.model.mask_ratio, d.teacher_blocks[-1],
                                getattr(model, "proj", None)).per_image
    return 3 * encoder_flops(model, 1 + model.patch_embed.num_patches, len(model.blocks))


def estimate(plan: Plan, models: dict, bench_steps: int) -> dict:
    """Wall-time estimate of every stage: a short measured step per training stage on this
    machine (or, with bench_steps=0, FLOPs at ASSUMED_MFU of the device's bf16 peak); the
    evaluation at a third of its fine-tuning step per image (forward only); the conversion from
    a measured decode of a few source images. N GPUs are assumed to scale linearly."""
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
    peak = None
    if dev.type == "cuda":
        peak = known_peak(torch.cuda.get_device_name(dev))
    if peak is None:
        peak = known_peak("H100") if dev.type == "cpu" else measured_matmul_peak(dev)
    return ASSUMED_MFU * peak / stage_flops(stage, model)


def _decode_seconds(source: Source) -> float:
    """Measured seconds to decode + resize one source image (a few of them, one core)."""
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
