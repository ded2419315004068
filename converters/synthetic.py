"""SYNTHETIC chest-radiograph phantoms, written in the NIH ChestX-ray14 or the CheXpert source layout.

They are procedurally drawn, not real radiographs: a soft-tissue body, two dark lung fields with
vessel texture and ribs, mediastinum and spine, the heart, domed diaphragms, noise. Each of the
14 NIH findings has its own visible, localised sign, large and contrasty enough to see at 64 px
(what the demo trains on), at prevalences between 5% and 20% so every per-label AUC is defined
on a few hundred test images. Findings are drawn independently per image, so an image often
carries several.

`generate_phantoms(out, n, seed)` writes `Data_Entry_2017_v2020.csv`, `images/*.png`,
`train_val_list.txt`, `test_list.txt` (patient-wise, as NIH's) and a `README.txt` saying SYNTHETIC;
`fasttrain convert nih` then packs them like the real dataset (and marks the manifest synthetic).
`layout="chexpert"` writes the CheXpert-v1.0-small release instead (`generate_chexpert_layout`):
`out/CheXpert-v1.0-small/{train,valid}.csv` and `{train,valid}/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg`,
packed unchanged by `fasttrain convert chexpert`.
Deterministic: image i depends only on (seed, i, size, its patient's sex); patients, their sex,
age and views, and the splits only on (seed, n).

A deliberate subgroup effect (SUBGROUP_EFFECT): the findings' signs on female patients' images are
drawn at FEMALE_SIGN_CONTRAST of their contrast, so a model trained on the phantoms separates
findings less well on women. It exists only so that `fasttrain evaluate --by sex` has a gap to
show on synthetic data; it models no real anatomy.

Drawing is vectorised numpy over precomputed coordinate grids; local signs touch only their
bounding box, so a 256-px phantom costs a few milliseconds on one core.
"""
from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from fasttrain.pool import bounded_imap, default_workers
from fasttrain.pool import progress as progress_bar

from .chexpert import CHEXPERT_ALL, RELEASE_PREFIXES
from .common import AtomicDir, ConvertError, convert_errors
from .nih import NIH_LABELS, NO_FINDING

# Prevalence per finding: NIH's ranking (Infiltration, Effusion, Atelectasis most common), floored
# at 5% so that a few-hundred-image test split has positives for every label.
PREVALENCE = {
    "Atelectasis": 0.13, "Cardiomegaly": 0.08, "Effusion": 0.15, "Infiltration": 0.18, "Mass": 0.09,
    "Nodule": 0.10, "Pneumonia": 0.06, "Pneumothorax": 0.08, "Consolidation": 0.08, "Edema": 0.07,
    "Emphysema": 0.06, "Fibrosis": 0.06, "Pleural_Thickening": 0.07, "Hernia": 0.05,
}
SIGNS = {
    "Atelectasis": "plate-like linear band opacity in the mid/lower zone of one lung",
    "Cardiomegaly": "heart widened to a cardiothoracic ratio > 0.5",
    "Effusion": "dense fluid at one lung base with a meniscus, blunting the costophrenic angle",
    "Infiltration": "several hazy patchy opacities in the lungs",
    "Mass": "one large round dense opacity",
    "Nodule": "one to three small round dense spots",
    "Pneumonia": "large fuzzy airspace cloud in one lower zone",
    "Pneumothorax": "dark apical/lateral band without lung markings beyond a thin bright pleural line",
    "Consolidation": "homogeneous sharply bounded dense upper zone of one lung",
    "Edema": "bilateral perihilar (bat-wing) haze",
    "Emphysema": "hyperinflated, darker lungs with flattened low diaphragms",
    "Fibrosis": "coarse reticular net in both lower zones",
    "Pleural_Thickening": "dense band along the lateral chest wall of one lung",
    "Hernia": "retrocardiac round structure with an air-fluid level",
}
# at 0.25 a logistic-regression probe of 32-px phantoms reaches mAUC 0.85 on men, 0.78 on women
FEMALE_SIGN_CONTRAST = 0.25
SUBGROUP_EFFECT = (f"the localised signs of every finding are drawn at {FEMALE_SIGN_CONTRAST:.0%} contrast on "
                   "female patients' images (a deliberate, synthetic subgroup gap for evaluate --by sex)")
CSV_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
README = """SYNTHETIC DATA - NOT REAL RADIOGRAPHS

These {n} images are procedurally generated chest-radiograph phantoms written by fasttrain
(`fasttrain convert synthetic`, seed {seed}, {size} px). They follow the NIH ChestX-ray14 file
layout (Data_Entry_2017_v2020.csv, images/, train_val_list.txt, test_list.txt) only so that the
real NIH converter can read them. Findings are drawn signs, not disease; patients, ages and
genders are random. Deliberate subgroup effect: {effect}.
Never report results on them as results on real data.
"""


@lru_cache(maxsize=4)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: U horizontal (image right = patient's left), V down."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)  # [S, S] each


def _box(size: int, cx: float, cy: float, rx: float, ry: float):
    """Bounding box (slices) of [cx +- rx, cy +- ry] in pixels, clipped to the image."""
    x0 = int(max(0, np.floor((cx - rx + 1) / 2 * size)))
    x1 = int(min(size, np.ceil((cx + rx + 1) / 2 * size) + 1))
    y0 = int(max(0, np.floor((cy - ry + 1) / 2 * size)))
    y1 = int(min(size, np.ceil((cy + ry + 1) / 2 * size) + 1))
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def ellipse(U, V, cx, cy, rx, ry, soft, angle=0.0):
    """Soft ellipse mask in [0, 1]: 1 inside, falling to 0 over `soft` (relative radius)."""
    du, dv = U - cx, V - cy
    if angle:
        ca, sa = np.cos(angle), np.sin(angle)
        du, dv = ca * du + sa * dv, -sa * du + ca * dv
    r = np.sqrt((du / rx) ** 2 + (dv / ry) ** 2)
    return np.clip((1.0 - r) / soft + 0.5, 0.0, 1.0)


def gauss(U, V, cx, cy, sx, sy):
    return np.exp(-0.5 * (((U - cx) / sx) ** 2 + ((V - cy) / sy) ** 2))


def _add_local(img, U, V, cx, cy, rx, ry, fn):
    """img[box] += fn(U[box], V[box]): local signs only touch their bounding box."""
    sl = _box(img.shape[0], cx, cy, rx, ry)
    if sl[0].stop > sl[0].start and sl[1].stop > sl[1].start:
        img[sl] += fn(U[sl], V[sl])


@dataclass
class Phantom:
    image: np.ndarray  # uint8 [S, S]
    labels: np.ndarray  # float32 [14]


@lru_cache(maxsize=2)
def noise_bank(size: int) -> np.ndarray:
    """A fixed [2S, 2S] bank of unit Gaussian noise; each phantom takes a random window of it.
    Drawing fresh noise costs ~1.4 ms per 256-px image, more than the whole drawing."""
    return np.random.default_rng(0x0150).standard_normal((2 * size, 2 * size), dtype=np.float32)


# Anatomy and signs are smooth: draw at most at 128 px, upsample, then add full-resolution noise.
# Drawing cost falls 4x at 256 px; the blur applied afterwards would remove the difference anyway.
DRAW_RES = 128


def lung_fields(U, V, lcx, lung_cy, lung_rx, lung_ry, dome_base, dome_curv) -> np.ndarray:
    """Both lung fields [W, W] in 0..1: ellipses centred at x in `lcx`, cut below by domed
    diaphragms (dome height at each lung's centre `dome_base`, curvature `dome_curv`)."""
    lungs = np.zeros_like(U)
    for cx in lcx:
        lung = ellipse(U, V, cx, lung_cy, lung_rx, lung_ry, 0.06)
        dome = dome_base - dome_curv * np.clip(1 - ((U - cx) / lung_rx) ** 2, 0, 1) * lung_ry * 0.35
        lungs += lung * np.clip((dome - V) / 0.02 + 0.5, 0, 1)
    return np.clip(lungs, 0, 1)


def finish(img: np.ndarray, size: int, work: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A phantom drawn at `work` px (float, ~0..1) -> uint8 [size, size]: resized, film noise of
    std `sigma` (a window of the shared noise bank up to 1024 px), quantised. Draws from `rng`."""
    import cv2
    if size != work:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)  # [S, S]
    if size <= 1024:
        oy, ox = rng.integers(0, size, 2)
        img += noise_bank(size)[oy:oy + size, ox:ox + size] * sigma
    else:
        img += rng.standard_normal((size, size), dtype=np.float32) * sigma
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def draw_phantom(seed: int, index: int, size: int = 256, sign_contrast: float = 1.0) -> Phantom:
    """Draw phantom `index` of the set with `seed`: same (seed, index, size, sign_contrast) -> same
    pixels. `sign_contrast` scales what the localised finding signs add to the anatomy."""
    import cv2
    rng = np.random.default_rng([int(seed), int(index), 0x9E3779B1])
    work = min(size, DRAW_RES)
    U, V = grid(work)  # [W, W] each
    y = np.array([rng.random() < PREVALENCE[name] for name in NIH_LABELS], np.float32)  # [14]
    has = dict(zip(NIH_LABELS, y.astype(bool)))

    # ---- anatomy (nuisance variation: position, body and lung size, heart size, exposure)
    dx, dy = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)
    body_w = rng.uniform(0.82, 0.95)
    lung_rx, lung_ry = rng.uniform(0.25, 0.30), rng.uniform(0.55, 0.64)
    lung_cy = -0.08 + dy
    if has["Emphysema"]:
        lung_rx, lung_ry = lung_rx * 1.08, lung_ry * 1.12
    lcx = np.array([-0.38, 0.38], np.float32) * (body_w / 0.9) + dx  # lung centres (image left, right)

    img = 0.06 + 0.50 * ellipse(U, V, dx, 0.12 + dy, body_w, 1.15, 0.08)  # body soft tissue
    img += 0.10 * np.clip(1.0 - np.abs(U - dx) / 0.10, 0, 1)  # spine / mediastinum

    # diaphragm domes: lung ends below at v = dome(u); emphysema flattens and lowers them
    dome_base = lung_cy + lung_ry * (0.80 if not has["Emphysema"] else 0.98)
    dome_curv = 0.35 if not has["Emphysema"] else 0.08
    lungs = lung_fields(U, V, lcx, lung_cy, lung_rx, lung_ry, dome_base, dome_curv)

    # vessel markings: smooth noise, stronger toward the hila; absent beyond a pneumothorax edge
    small = rng.standard_normal((8, 8)).astype(np.float32)
    markings = cv2.resize(small, (work, work), interpolation=cv2.INTER_CUBIC)
    markings *= 0.035 * (1.2 - np.minimum(np.abs(np.abs(U - dx) - 0.22) / 0.3, 1.0))
    # ribs: curved bright bands across each lung
    rib_period = rng.uniform(0.15, 0.19)
    rib_phase = rng.uniform(0, 1)
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * ((V + 0.45 * (U - dx) ** 2) / rib_period + rib_phase))
    ribs = np.clip((ribs - 0.55) * 3.0, 0, 1) * 0.07

    lung_dark = 0.36 + (0.10 if has["Emphysema"] else 0.0)
    ptx_mask = None
    if has["Pneumothorax"]:
        side = rng.integers(2)
        cx = lcx[side]
        shrink = rng.uniform(0.55, 0.66)
        # collapsed lung: a smaller ellipse pulled toward the hilum; beyond it, air only
        lateral_sign = side * 2 - 1  # image-left lung's lateral wall is at -u
        inner = ellipse(U, V, cx - lateral_sign * lung_rx * (1 - shrink) * 0.9,
                         lung_cy + lung_ry * (1 - shrink) * 0.6, lung_rx * shrink, lung_ry * shrink * 1.05, 0.03)
        side_mask = (U - dx) * (side * 2 - 1) > 0  # only the chosen lung
        ptx_mask = np.where(side_mask, lungs * (1 - inner), 0).astype(np.float32)
        edge = np.where(side_mask, np.clip(1 - np.abs(inner - 0.5) * 2.2, 0, 1), 0) * lungs
        markings = markings * (1 - ptx_mask)
        img += 0.35 * edge  # visceral pleural line
    img -= lung_dark * lungs
    if ptx_mask is not None:
        img -= 0.20 * ptx_mask
    img += lungs * (markings + ribs)

    heart_rx = rng.uniform(0.22, 0.27) * (1.65 if has["Cardiomegaly"] else 1.0)
    heart_ry = rng.uniform(0.20, 0.24) * (1.15 if has["Cardiomegaly"] else 1.0)
    hcx, hcy = dx + 0.10 + (0.06 if has["Cardiomegaly"] else 0.0), lung_cy + lung_ry * 0.42
    # the heart is soft tissue: where it overlaps a lung it replaces the lung's darkness
    sl = _box(work, hcx, hcy, heart_rx * 1.1, heart_ry * 1.1)
    img[sl] += ellipse(U[sl], V[sl], hcx, hcy, heart_rx, heart_ry, 0.10) * (0.12 + lung_dark * lungs[sl])

    def lung_point(side, vlo, vhi, margin=0.7):
        """A random point inside lung `side` between relative heights vlo..vhi."""
        t = rng.uniform(vlo, vhi)
        vv = lung_cy + t * lung_ry
        half = lung_rx * np.sqrt(max(0.05, 1 - t * t)) * margin
        return lcx[side] + rng.uniform(-half, half), vv

    # ---- findings
    anatomy = img.copy() if sign_contrast != 1.0 else None  # [W, W] before the signs
    if has["Atelectasis"]:
        side = rng.integers(2)
        cx, cy = lung_point(side, -0.1, 0.35, 0.3)
        cx += (side * 2 - 1) * lung_rx * 0.25  # lateral: clear of the heart
        ang = rng.uniform(-0.35, 0.35)
        _add_local(img, U, V, cx, cy, 0.22, 0.22,
                   lambda u, v: 0.38 * ellipse(u, v, cx, cy, 0.22, 0.05, 0.3, ang))
    if has["Effusion"]:
        side = rng.integers(2)
        cx = lcx[side]
        level = lung_cy + lung_ry * rng.uniform(0.12, 0.35)
        lateral = (U - cx) * (side * 2 - 1) / lung_rx  # 1 at the lateral wall
        meniscus = level - 0.18 * np.clip(lateral, 0, 1) ** 2  # fluid climbs the lateral wall
        fluid = np.clip((V - meniscus) / 0.03, 0, 1) * np.clip(1 - np.abs(U - cx) / (lung_rx * 1.15), 0, 1) ** 0.3
        img += 0.40 * fluid * lungs
    if has["Infiltration"]:
        for _ in range(rng.integers(4, 8)):
            side = rng.integers(2)
            cx, cy = lung_point(side, -0.6, 0.6)
            s = rng.uniform(0.06, 0.09)
            _add_local(img, U, V, cx, cy, 3 * s, 3 * s, lambda u, v: 0.24 * gauss(u, v, cx, cy, s, s))
    if has["Mass"]:
        side = rng.integers(2)
        cx, cy = lung_point(side, -0.5, 0.4, 0.5)
        r = rng.uniform(0.12, 0.17)
        _add_local(img, U, V, cx, cy, r * 1.3, r * 1.3,
                   lambda u, v: 0.42 * ellipse(u, v, cx, cy, r, r * rng.uniform(0.85, 1.1), 0.25))
    if has["Nodule"]:
        for _ in range(rng.integers(2, 5)):
            side = rng.integers(2)
            cx, cy = lung_point(side, -0.7, 0.5)
            r = rng.uniform(0.055, 0.07)
            _add_local(img, U, V, cx, cy, r * 1.5, r * 1.5,
                       lambda u, v: 0.48 * ellipse(u, v, cx, cy, r, r, 0.35))
    if has["Pneumonia"]:
        side = rng.integers(2)
        cx, cy = lung_point(side, 0.15, 0.45, 0.3)
        s = rng.uniform(0.14, 0.18)
        _add_local(img, U, V, cx, cy, 3 * s, 3 * s,
                   lambda u, v: 0.42 * gauss(u, v, cx, cy, s, s * 0.8) * lungs[_box(work, cx, cy, 3 * s, 3 * s)])
    if has["Consolidation"]:
        side = rng.integers(2)
        fissure = lung_cy + lung_ry * rng.uniform(-0.35, -0.1)
        sl = _box(work, lcx[side], lung_cy, lung_rx * 1.1, lung_ry * 1.1)
        img[sl] += 0.36 * lungs[sl] * np.clip((fissure - V[sl]) / 0.015, 0, 1) * \
            (np.abs(U[sl] - lcx[side]) < lung_rx * 1.1)
    if has["Edema"]:
        s = rng.uniform(0.14, 0.18)
        for cx in (dx - 0.24, dx + 0.24):
            cy = lung_cy + lung_ry * 0.1
            _add_local(img, U, V, cx, cy, 3 * s, 3 * s,
                       lambda u, v: 0.36 * gauss(u, v, cx, cy, s, s * 1.3) * lungs[_box(work, cx, cy, 3 * s, 3 * s)])
    if has["Fibrosis"]:
        period = 0.12
        net = (np.abs(np.sin(np.pi * (U - dx) / period)) < 0.35) | (np.abs(np.sin(np.pi * V / period)) < 0.35)
        zone = np.clip((V - (lung_cy - lung_ry * 0.1)) / 0.1, 0, 1)
        img += 0.22 * net * zone * lungs
    if has["Pleural_Thickening"]:
        side = rng.integers(2)
        cx = lcx[side]
        sl = _box(work, cx, lung_cy, lung_rx * 1.2, lung_ry * 1.1)
        u, v = U[sl], V[sl]
        r = np.sqrt(((u - cx) / lung_rx) ** 2 + ((v - lung_cy) / lung_ry) ** 2)
        band = np.clip(1 - np.abs(r - 0.84) / 0.16, 0, 1) * ((u - cx) * (side * 2 - 1) > 0) * (v < lung_cy + 0.35)
        img[sl] += 0.40 * band
    if has["Hernia"]:
        cx, cy = dx - 0.02, hcy + heart_ry * 0.35
        r = rng.uniform(0.11, 0.13)

        def hernia(u, v):
            disk = ellipse(u, v, cx, cy, r, r * 0.9, 0.2)
            air = np.clip((cy - 0.01 - v) / 0.01, 0, 1)  # gas above the fluid level
            return disk * (0.15 - 0.60 * air)
        _add_local(img, U, V, cx, cy, r * 1.3, r * 1.3, hernia)
    if anatomy is not None:
        img = anatomy + sign_contrast * (img - anatomy)

    # ---- exposure, blur, noise, quantisation
    gain, offset = rng.uniform(0.9, 1.05), rng.uniform(-0.03, 0.03)
    img = img * gain + offset
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=0.6)
    return Phantom(image=finish(img, size, work, rng.uniform(0.01, 0.02), rng), labels=y)


@dataclass
class _PatientPlan:
    names: list[str]
    rows: list[list]
    test_patients: set


def _plan(n: int, seed: int, size: int, test_fraction: float) -> _PatientPlan:
    """Patients (1-4 follow-ups each, as NIH's), their metadata, and the patient-wise test set."""
    rng = np.random.default_rng([int(seed), 0x5EED])
    names, rows, pid = [], [], 0
    while len(names) < n:
        pid += 1
        age, sex = int(rng.integers(18, 90)), ("M" if rng.random() < 0.56 else "F")
        for fu in range(int(rng.integers(1, 5))):
            if len(names) >= n:
                break
            name = f"{pid:08d}_{fu:03d}.png"
            names.append(name)
            rows.append([name, None, fu, pid, age, sex, "PA" if rng.random() < 0.6 else "AP", size, size,
                         round(0.143 * 1024 / size, 4), round(0.143 * 1024 / size, 4)])
    patients = np.arange(1, pid + 1)
    rng.shuffle(patients)
    n_test = int(round(test_fraction * pid))
    if pid >= 2:
        n_test = min(max(n_test, 1), pid - 1)
    return _PatientPlan(names, rows, set(int(p) for p in patients[:n_test]))


def _draw_and_write(args) -> np.ndarray:
    """Draw phantoms `indices` and write each to its file (PNG or JPEG by suffix) under `root`."""
    import cv2
    seed, indices, size, root, rels, jpeg_quality, contrasts, draw = args
    labels = []
    for i, rel, contrast in zip(indices, rels, contrasts):
        ph = draw(seed, i, size, contrast)
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if rel.endswith(".jpg"):
            params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        else:  # low compression: PNG encoding would otherwise cost more than drawing
            params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
        if not cv2.imwrite(path, ph.image, params):
            raise OSError(f"could not write {path}")
        labels.append(ph.labels)
    return np.stack(labels)


def has_subgroup_effect(draw: Callable) -> bool:
    """Whether phantoms drawn by `draw` carry the deliberate subgroup effect: the easy family does; a
    family may opt out with a `subgroup_effect = False` attribute (its figures calibrated without one)."""
    return bool(getattr(getattr(draw, "func", draw), "subgroup_effect", True))


def subgroup_effect_text(draw: Callable) -> str:
    return SUBGROUP_EFFECT if has_subgroup_effect(draw) else "none (every patient's signs at full contrast)"


def sign_contrast(sex: str) -> float:
    """The deliberate subgroup effect: signs' contrast for a patient of `sex` ('F' / 'Female' fainter)."""
    return FEMALE_SIGN_CONTRAST if sex in ("F", "Female") else 1.0


def _draw_all(seed: int, size: int, root: Path, rels: list[str], workers: Optional[int], progress: bool,
              sexes: list[str], jpeg_quality: int = 95, draw: Callable = draw_phantom) -> np.ndarray:
    """Draw phantom i (of a patient of sex sexes[i]) into root/rels[i] for every i with `draw` (a
    module-level function, so that worker processes can take it), in chunks over `workers`
    processes: labels [n, 14]."""
    n, chunk = len(rels), 64
    effect = has_subgroup_effect(draw)
    contrasts = [sign_contrast(x) if effect else 1.0 for x in sexes]
    tasks = ((seed, range(s, min(s + chunk, n)), size, str(root), rels[s:s + chunk], jpeg_quality,
              contrasts[s:s + chunk], draw)
             for s in range(0, n, chunk))
    labels = []
    bar = progress_bar(n, "phantoms (SYNTHETIC)", progress)
    try:
        with convert_errors():  # a dead worker
            for lab in bounded_imap(_draw_and_write, tasks, default_workers(workers)):
                labels.append(lab)
                bar.update(len(lab))
    finally:
        bar.close()
    return np.concatenate(labels)  # [n, 14]


def _check_args(n: int, size: int, test_fraction: float) -> None:
    if n < 2:
        raise ConvertError(f"--n must be >= 2 (a train and a test patient), got {n}")
    if not 16 <= size <= 4096:
        raise ConvertError(f"--size must be in 16..4096, got {size}")
    if not 0 < test_fraction < 1:
        raise ConvertError(f"--test-fraction must be in (0, 1), got {test_fraction}")


LAYOUTS = ("nih", "chexpert")


def generate_phantoms(out_dir, n: int, seed: int = 0, size: int = 256, test_fraction: float = 0.2,
                      workers: Optional[int] = 1, progress: bool = True, layout: str = "nih",
                      draw: Callable = draw_phantom) -> Path:
    """Write `n` SYNTHETIC phantoms in the NIH (or, layout="chexpert", the CheXpert) source layout
    under `out_dir` (which must not exist), drawn by `draw` (draw_phantom: the easy family;
    synthetic_hard.drawer(difficulty) picks a family by name)."""
    if layout == "chexpert":
        return generate_chexpert_layout(out_dir, n, seed=seed, size=size, test_fraction=test_fraction,
                                        workers=workers, progress=progress, draw=draw)
    if layout != "nih":
        raise ConvertError(f"--layout must be one of {list(LAYOUTS)}, got {layout!r}")
    _check_args(n, size, test_fraction)
    plan = _plan(n, seed, size, test_fraction)
    t0 = time.perf_counter()
    with AtomicDir(Path(out_dir)) as tmp:
        (tmp / "images").mkdir()
        labels = _draw_all(seed, size, tmp, [f"images/{nm}" for nm in plan.names], workers, progress,
                           [row[5] for row in plan.rows], draw=draw)
        with open(tmp / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
            f.write(CSV_HEADER + "\n")
            w = csv.writer(f, lineterminator="\n")
            for row, y in zip(plan.rows, labels):
                found = [NIH_LABELS[j] for j in np.flatnonzero(y)]
                row[1] = "|".join(found) if found else NO_FINDING
                w.writerow(row)
        test = [nm for nm, row in zip(plan.names, plan.rows) if row[3] in plan.test_patients]
        train = [nm for nm, row in zip(plan.names, plan.rows) if row[3] not in plan.test_patients]
        (tmp / "train_val_list.txt").write_text("".join(x + "\n" for x in train))
        (tmp / "test_list.txt").write_text("".join(x + "\n" for x in test))
        fn = getattr(draw, "func", draw)  # a functools.partial draws with its function's signs
        signs = getattr(fn, "signs", SIGNS)  # a drawing function may carry its own descriptions
        readme = README.format(n=n, seed=seed, size=size, effect=subgroup_effect_text(draw))
        (tmp / "README.txt").write_text(readme +
                                        f"\nSigns drawn per finding ({getattr(fn, '__name__', fn)}):\n" +
                                        "".join(f"  {k} ({PREVALENCE[k]:.0%}): {signs[k]}\n" for k in NIH_LABELS))
    dt = time.perf_counter() - t0
    if progress:
        print(f"wrote {n} SYNTHETIC phantoms to {out_dir} in {dt:.1f} s ({n / dt:.0f} img/s)")
    return Path(out_dir).absolute()


# ----------------------------------------------------------------------------- CheXpert layout

CHEXPERT_RELEASE = RELEASE_PREFIXES[0]  # CheXpert-v1.0-small, the downsampled release
CHEXPERT_COLUMNS = CHEXPERT_ALL
# The CheXpert observation each drawn NIH sign is reported as (Emphysema, Fibrosis and Hernia have
# no CheXpert column: in this layout they are drawn but unlabelled, as in a real report).
NIH_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema",
    "Pleural_Thickening": "Pleural Other",
}
LATERAL_FRACTION = 0.145  # CheXpert train: 32,387 lateral of 223,414 images
UNCERTAIN_FRACTION = 0.1  # train.csv: share of positive mentions written as uncertain (-1.0)
EXPLICIT_NEGATIVE = 0.3  # train.csv: share of absent findings written 0.0 (the rest blank, as the labeller)
CHEXPERT_README = """SYNTHETIC DATA - NOT REAL RADIOGRAPHS

These {n} images are procedurally generated chest-radiograph phantoms written by fasttrain
(`fasttrain convert synthetic --layout chexpert`, seed {seed}, {size} px). They follow the
CheXpert-v1.0-small file layout (train.csv, valid.csv, train/patientNNNNN/studyN/viewN_frontal.jpg,
valid/...) only so that the real CheXpert converter can read them. Findings are drawn signs, not
disease; "lateral" views are more frontal phantoms; patients, ages and sexes are random. Deliberate
subgroup effect: {effect}. Never report results on them as results on real data.
"""


def _chexpert_plan(n: int, seed: int, test_fraction: float):
    """Rows (patient, study, view, frontal?) in writing order and the set of valid (test) patients."""
    rng = np.random.default_rng([int(seed), 0xC4E])
    rows, pid = [], 0
    while len(rows) < n:
        pid += 1
        age, sex = int(rng.integers(18, 90)), ("Male" if rng.random() < 0.56 else "Female")
        for study in range(1, int(rng.integers(1, 4)) + 1):
            ap = "AP" if rng.random() < 0.7 else "PA"
            views = ["frontal"] + (["lateral"] if rng.random() < LATERAL_FRACTION / (1 - LATERAL_FRACTION) else [])
            for v, kind in enumerate(views, 1):
                # the first patient leaves a row for a second one: a train and a valid patient
                # whatever n >= 2 (one patient can hold up to 6 rows)
                if len(rows) < n - (pid == 1):
                    rows.append(dict(patient=pid, study=study, view=v, kind=kind, age=age, sex=sex, ap=ap))
    patients = np.arange(1, pid + 1)
    rng.shuffle(patients)
    n_test = min(max(int(round(test_fraction * pid)), 1), pid - 1) if pid >= 2 else 0
    return rows, set(int(p) for p in patients[:n_test])


def _chexpert_cells(y_nih: np.ndarray, rng: np.random.Generator, valid: bool) -> list[str]:
    """14 CheXpert observation cells from a phantom's NIH findings: '1.0' / '0.0' / '-1.0' / ''.
    valid.csv (radiologist labels) has 0.0 / 1.0 only; train.csv blanks, negatives and uncertain."""
    pos = {NIH_TO_CHEXPERT[name] for name, v in zip(NIH_LABELS, y_nih) if v and name in NIH_TO_CHEXPERT}
    cells = []
    for col in CHEXPERT_COLUMNS:
        if col == "No Finding":
            present = not y_nih.any()
        else:
            present = col in pos
        if valid:
            cells.append("1.0" if present else "0.0")
        elif present:
            cells.append("-1.0" if col != "No Finding" and rng.random() < UNCERTAIN_FRACTION else "1.0")
        else:
            cells.append("0.0" if col != "No Finding" and rng.random() < EXPLICIT_NEGATIVE else "")
    return cells


def generate_chexpert_layout(out_dir, n: int, seed: int = 0, size: int = 256, test_fraction: float = 0.2,
                             workers: Optional[int] = 1, progress: bool = True,
                             draw: Callable = draw_phantom) -> Path:
    """Write `n` SYNTHETIC phantoms as `out_dir/CheXpert-v1.0-small/` (train.csv, valid.csv, train/,
    valid/, README.txt); the valid patients (`test_fraction` of them) go to valid.csv.
    Returns `out_dir` (what `fasttrain convert chexpert --src` takes)."""
    _check_args(n, size, test_fraction)
    rows, valid_patients = _chexpert_plan(n, seed, test_fraction)
    rels = []
    for r in rows:
        split = "valid" if r["patient"] in valid_patients else "train"
        rels.append(f"{split}/patient{r['patient']:05d}/study{r['study']}/view{r['view']}_{r['kind']}.jpg")
    t0 = time.perf_counter()
    with AtomicDir(Path(out_dir)) as tmp:
        root = tmp / CHEXPERT_RELEASE
        root.mkdir()
        labels = _draw_all(seed, size, root, rels, workers, progress, [r["sex"] for r in rows],
                           draw=draw)  # [n, 14] NIH findings
        header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS]
        rng = np.random.default_rng([int(seed), 0xCE11])
        study_cells: dict = {}
        with open(root / "train.csv", "w", newline="") as ft, open(root / "valid.csv", "w", newline="") as fv:
            wt, wv = csv.writer(ft, lineterminator="\n"), csv.writer(fv, lineterminator="\n")
            wt.writerow(header)
            wv.writerow(header)
            for r, rel, y in zip(rows, rels, labels):
                valid = rel.startswith("valid/")
                key = (r["patient"], r["study"])
                if key not in study_cells:  # labels are per study: a lateral view repeats its frontal's
                    study_cells[key] = _chexpert_cells(y, rng, valid)
                (wv if valid else wt).writerow(
                    [f"{CHEXPERT_RELEASE}/{rel}", r["sex"], r["age"], r["kind"].capitalize(),
                     r["ap"] if r["kind"] == "frontal" else "", *study_cells[key]])
        (root / "README.txt").write_text(CHEXPERT_README.format(n=n, seed=seed, size=size, effect=subgroup_effect_text(draw)))
    dt = time.perf_counter() - t0
    if progress:
        print(f"wrote {n} SYNTHETIC phantoms (CheXpert layout) to {out_dir} in {dt:.1f} s ({n / dt:.0f} img/s)")
    return Path(out_dir).absolute()
