"""SYNTHETIC "hard" chest-radiograph phantoms: signs that need shape and context, not brightness.

The easy family (synthetic.py) draws each finding large and contrasty, so a randomly initialised
encoder's pooled features already separate them and every encoder scores alike. This family is
drawn so that representations can be told apart:

* signs are small or relational: nodules of two to four pixels at 64 px; cardiomegaly as a
  cardiothoracic width ratio > 0.5 under patient sizes that make absolute heart widths overlap
  between the classes; effusion as a meniscus at a lung base; fibrosis as a fine reticular net;
  each adds little to the image's intensity histogram, whose statistics then carry no label
  (tests/converters/test_synthetic_hard.py);
* strong nuisance variation drawn independently of the labels: exposure gain and offset, a
  gamma contrast curve, an exposure gradient, patient size, position and rotation, blur, noise,
  and support devices (endotracheal and nasogastric tubes, a central line, ECG leads and wires);
* findings co-occur as in NIH ChestX-ray14 (effusion with atelectasis, infiltration and
  cardiomegaly; mass with nodule; ...): a Gaussian copula over the 14 labels, with the easy
  family's prevalences as margins (CO_OCCURRENCE below).

The layouts, patients, metadata (sex, age, view) and splits are the easy family's
(`generate_phantoms(..., draw=draw_hard_phantom)`); only the pixels and labels differ.
Deterministic: image i depends only on (seed, i, size).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm

from .common import ConvertError
from .nih import NIH_LABELS
from .synthetic import DRAW_RES, PREVALENCE, Phantom, draw_phantom, ellipse, finish, gauss, grid, lung_fields

HARD_SALT = 0x4A5D  # separates the hard family's random streams from the easy family's
# Every sign's amplitude below is multiplied by this. Calibrated on 2,000 phantoms at the demo's
# scale (docs/results.md): at 1x an MAE teacher's linear probe rose only 0.055 mAUC above a random
# encoder's, at 2x 0.074, at 3x 0.087, while a logistic regression on global intensity statistics
# stayed at 0.50-0.55 mAUC (chance) and the random encoder's probe at 0.53-0.57.
SIGN_GAIN = 3.0

# Latent factors shared by findings (loadings in the Gaussian copula): fluid overload (effusion,
# cardiomegaly, edema), airspace disease (infiltration, pneumonia, consolidation, atelectasis,
# effusion), focal lesions (mass, nodule), chronic change (fibrosis, pleural thickening,
# emphysema). NIH's most frequent pairs (Effusion|Infiltration, Atelectasis|Effusion,
# Atelectasis|Infiltration, Cardiomegaly|Effusion, Mass|Nodule) are the strongest here.
CO_OCCURRENCE = {
    "fluid": {"Effusion": 0.5, "Cardiomegaly": 0.5, "Edema": 0.5, "Atelectasis": 0.25},
    "airspace": {"Infiltration": 0.55, "Pneumonia": 0.5, "Consolidation": 0.55, "Atelectasis": 0.5,
                 "Effusion": 0.45},
    "lesion": {"Mass": 0.5, "Nodule": 0.5},
    "chronic": {"Fibrosis": 0.45, "Pleural_Thickening": 0.45, "Emphysema": 0.35},
}
_LOADINGS = np.array([[CO_OCCURRENCE[f].get(name, 0.0) for f in CO_OCCURRENCE] for name in NIH_LABELS],
                     np.float64)  # [14, F]
_THRESHOLDS = norm.ppf(1.0 - np.array([PREVALENCE[name] for name in NIH_LABELS]))  # [14]

SIGNS_HARD = {
    "Atelectasis": "thin plate-like band in one lower zone",
    "Cardiomegaly": "heart wider than half the thorax (width ratio 0.52-0.62 vs 0.38-0.49)",
    "Effusion": "meniscus at one lung base climbing the lateral wall",
    "Infiltration": "a few small hazy patches",
    "Mass": "one mid-sized round opacity",
    "Nodule": "one to three small round spots",
    "Pneumonia": "a fuzzy cloud in one lower zone",
    "Pneumothorax": "collapsed lung edge: a thin pleural line with no markings beyond it",
    "Consolidation": "a dense upper zone of one lung bounded by a sharp fissure",
    "Edema": "bilateral perihilar haze",
    "Emphysema": "flattened, lowered diaphragm domes",
    "Fibrosis": "fine reticular net in both lower zones",
    "Pleural_Thickening": "thin band along the lateral chest wall of one lung",
    "Hernia": "retrocardiac round structure with an air-fluid level",
}
DIFFICULTIES = ("easy", "hard")


def hard_labels(rng: np.random.Generator) -> np.ndarray:
    """The 14 findings of one phantom from the copula: float32 [14], NIH_LABELS order."""
    f = rng.standard_normal(_LOADINGS.shape[1])  # [F] shared factors
    e = rng.standard_normal(len(NIH_LABELS))  # [14] own parts
    own = np.sqrt(1.0 - (_LOADINGS ** 2).sum(1))  # unit variance per latent
    z = _LOADINGS @ f + own * e  # [14]
    return (z > _THRESHOLDS).astype(np.float32)


def _line(U, V, pts, width):
    """Soft polyline mask in [0, 1] through `pts` (list of (u, v)), `width` its half-width."""
    d = np.full(U.shape, np.inf, np.float32)
    for (u0, v0), (u1, v1) in zip(pts[:-1], pts[1:]):
        du, dv = u1 - u0, v1 - v0
        t = np.clip(((U - u0) * du + (V - v0) * dv) / max(du * du + dv * dv, 1e-9), 0, 1)
        d = np.minimum(d, np.hypot(U - u0 - t * du, V - v0 - t * dv))
    return np.clip(1.0 - d / width, 0.0, 1.0)


def _devices(rng, U, V, Ui, Vi) -> np.ndarray:
    """Support devices, each present with its own probability and drawn independently of the
    findings: bright lines and rings in patient (U, V; midline at U = 0) or image (Ui, Vi) coordinates."""
    out = np.zeros_like(U)
    if rng.random() < 0.3:  # endotracheal tube: down the midline to above the carina
        tip = rng.uniform(-0.55, -0.35)
        out += rng.uniform(0.25, 0.45) * _line(U, V, [(0.0, -1.2), (rng.uniform(-0.03, 0.03), tip)], 0.025)
    if rng.random() < 0.2:  # nasogastric tube: midline, then left under the diaphragm
        out += rng.uniform(0.2, 0.4) * _line(U, V, [(-0.02, -1.2), (-0.01, 0.45),
                                                    (rng.uniform(0.15, 0.3), 0.75)], 0.018)
    if rng.random() < 0.25:  # central venous line from one shoulder
        s = rng.choice([-1.0, 1.0])
        out += rng.uniform(0.25, 0.45) * _line(U, V, [(s * 0.75, -0.75), (s * 0.3, -0.55),
                                                      (s * 0.05, rng.uniform(-0.25, -0.05))], 0.015)
    if rng.random() < 0.4:  # ECG electrodes (rings) with their wires, in image coordinates
        for _ in range(rng.integers(2, 6)):
            cu, cv = rng.uniform(-0.85, 0.85), rng.uniform(-0.9, 0.6)
            r = rng.uniform(0.04, 0.06)
            ring = np.clip(1.0 - np.abs(np.hypot(Ui - cu, Vi - cv) - r) / 0.02, 0, 1)
            end = (cu + rng.uniform(-0.6, 0.6), rng.choice([-1.1, 1.1]))
            mid = ((cu + end[0]) / 2 + rng.uniform(-0.2, 0.2), (cv + end[1]) / 2)
            out += rng.uniform(0.3, 0.5) * ring + rng.uniform(0.15, 0.3) * _line(Ui, Vi, [(cu, cv), mid, end], 0.012)
    return out


def draw_hard_phantom(seed: int, index: int, size: int = 256, sign_contrast: float = 1.0) -> Phantom:
    """Draw hard phantom `index` of the set with `seed`: same (seed, index, size, sign_contrast) ->
    same pixels. `sign_contrast` scales what the finding signs add to the anatomy."""
    import cv2
    rng = np.random.default_rng([int(seed), int(index), HARD_SALT])
    y = hard_labels(rng)  # [14]
    has = dict(zip(NIH_LABELS, y.astype(bool)))
    work = min(size, DRAW_RES)
    Ui, Vi = grid(work)  # [W, W] image coordinates in [-1, 1]

    # ---- patient pose and size (nuisance): everything anatomical is drawn in patient coordinates
    scale = rng.uniform(0.82, 1.12)
    px, py = rng.uniform(-0.07, 0.07), rng.uniform(-0.07, 0.07)
    rot = rng.uniform(-0.12, 0.12)
    ca, sa = np.cos(rot), np.sin(rot)
    U = ((Ui - px) * ca + (Vi - py) * sa) / scale  # [W, W]
    V = (-(Ui - px) * sa + (Vi - py) * ca) / scale

    lung_rx, lung_ry = rng.uniform(0.22, 0.30), rng.uniform(0.52, 0.64)
    lung_gap = rng.uniform(0.09, 0.13)  # mediastinum half-width
    lung_cy = -0.08
    lcx = np.array([-(lung_gap + lung_rx), lung_gap + lung_rx], np.float32)
    thorax_w = 2 * (lung_gap + 2 * lung_rx)  # outer lung edge to outer lung edge

    img = 0.06 + 0.50 * ellipse(U, V, 0.0, 0.12, lung_gap + 2 * lung_rx + rng.uniform(0.12, 0.22), 1.15, 0.08)
    img += 0.10 * np.clip(1.0 - np.abs(U) / 0.10, 0, 1)  # spine / mediastinum

    dome_base = lung_cy + lung_ry * (0.80 if not has["Emphysema"] else 0.95)
    dome_curv = rng.uniform(0.3, 0.4) if not has["Emphysema"] else rng.uniform(0.02, 0.08)
    lungs = lung_fields(U, V, lcx, lung_cy, lung_rx, lung_ry, dome_base, dome_curv)

    small = rng.standard_normal((10, 10)).astype(np.float32)
    markings = cv2.resize(small, (work, work), interpolation=cv2.INTER_CUBIC)
    markings *= 0.05 * (1.2 - np.minimum(np.abs(np.abs(U) - 0.22) / 0.3, 1.0))
    rib_period = rng.uniform(0.14, 0.2)
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * ((V + 0.45 * U ** 2) / rib_period + rng.uniform(0, 1)))
    ribs = np.clip((ribs - 0.55) * 3.0, 0, 1) * rng.uniform(0.05, 0.1)

    lung_dark = rng.uniform(0.32, 0.42)
    ptx_mask = None
    if has["Pneumothorax"]:
        side = rng.integers(2)
        cx = lcx[side]
        shrink = rng.uniform(0.65, 0.8)
        lateral_sign = side * 2 - 1
        inner = ellipse(U, V, cx - lateral_sign * lung_rx * (1 - shrink) * 0.9,
                        lung_cy + lung_ry * (1 - shrink) * 0.6, lung_rx * shrink, lung_ry * shrink * 1.05, 0.03)
        side_mask = U * lateral_sign > 0
        ptx_mask = np.where(side_mask, lungs * (1 - inner), 0).astype(np.float32)
        edge = np.where(side_mask, np.clip(1 - np.abs(inner - 0.5) * 2.2, 0, 1), 0) * lungs
        markings = markings * (1 - ptx_mask)
    img -= lung_dark * lungs
    img += lungs * (markings + ribs)

    # cardiomegaly is a ratio: heart width / thorax width, whatever the patient's size
    ctr = rng.uniform(0.52, 0.62) if has["Cardiomegaly"] else rng.uniform(0.38, 0.49)
    heart_rx = ctr * thorax_w / 2
    heart_ry = rng.uniform(0.18, 0.24)
    hcx, hcy = 0.08 * heart_rx / 0.25, lung_cy + lung_ry * 0.42
    img += ellipse(U, V, hcx, hcy, heart_rx, heart_ry, 0.10) * (0.12 + lung_dark * lungs)

    def lung_point(side, vlo, vhi, margin=0.7):
        t = rng.uniform(vlo, vhi)
        half = lung_rx * np.sqrt(max(0.05, 1 - t * t)) * margin
        return lcx[side] + rng.uniform(-half, half), lung_cy + t * lung_ry

    # ---- findings: signs are added to `sign` so that sign_contrast can scale them together
    sign = np.zeros_like(U)
    if ptx_mask is not None:
        sign += 0.22 * edge - 0.06 * ptx_mask
    if has["Atelectasis"]:
        side = rng.integers(2)
        cx, cy = lung_point(side, 0.0, 0.45, 0.3)
        cx += (side * 2 - 1) * lung_rx * 0.25
        sign += rng.uniform(0.12, 0.18) * ellipse(U, V, cx, cy, 0.18, 0.035, 0.3, rng.uniform(-0.35, 0.35))
    if has["Effusion"]:
        side = rng.integers(2)
        cx = lcx[side]
        level = lung_cy + lung_ry * rng.uniform(0.35, 0.55)
        lateral = (U - cx) * (side * 2 - 1) / lung_rx
        meniscus = level - 0.2 * np.clip(lateral, 0, 1) ** 2
        fluid = np.clip((V - meniscus) / 0.03, 0, 1) * np.clip(1 - np.abs(U - cx) / (lung_rx * 1.15), 0, 1) ** 0.3
        sign += rng.uniform(0.2, 0.28) * fluid * lungs
    if has["Infiltration"]:
        for _ in range(rng.integers(2, 5)):
            cx, cy = lung_point(rng.integers(2), -0.6, 0.6)
            s = rng.uniform(0.05, 0.08)
            sign += rng.uniform(0.08, 0.12) * gauss(U, V, cx, cy, s, s) * lungs
    if has["Mass"]:
        cx, cy = lung_point(rng.integers(2), -0.5, 0.4, 0.5)
        r = rng.uniform(0.08, 0.12)
        sign += rng.uniform(0.14, 0.2) * ellipse(U, V, cx, cy, r, r * rng.uniform(0.85, 1.1), 0.25)
    if has["Nodule"]:
        for _ in range(rng.integers(1, 4)):
            cx, cy = lung_point(rng.integers(2), -0.7, 0.5)
            r = rng.uniform(0.045, 0.065)
            sign += rng.uniform(0.14, 0.2) * ellipse(U, V, cx, cy, r, r, 0.35)
    if has["Pneumonia"]:
        cx, cy = lung_point(rng.integers(2), 0.15, 0.45, 0.3)
        s = rng.uniform(0.1, 0.14)
        sign += rng.uniform(0.14, 0.2) * gauss(U, V, cx, cy, s, s * 0.8) * lungs
    if has["Consolidation"]:
        side = rng.integers(2)
        fissure = lung_cy + lung_ry * rng.uniform(-0.45, -0.25)
        sign += rng.uniform(0.16, 0.22) * lungs * np.clip((fissure - V) / 0.015, 0, 1) * \
            (np.abs(U - lcx[side]) < lung_rx * 1.1)
    if has["Edema"]:
        s = rng.uniform(0.12, 0.16)
        for cx in (-lung_gap - 0.12, lung_gap + 0.12):
            sign += rng.uniform(0.1, 0.15) * gauss(U, V, cx, lung_cy + lung_ry * 0.1, s, s * 1.3) * lungs
    if has["Fibrosis"]:
        period, ang = rng.uniform(0.13, 0.17), rng.uniform(0, np.pi)
        a, b = U * np.cos(ang) + V * np.sin(ang), -U * np.sin(ang) + V * np.cos(ang)
        net = (np.abs(np.sin(np.pi * a / period)) < 0.3) | (np.abs(np.sin(np.pi * b / period)) < 0.3)
        zone = np.clip((V - (lung_cy + lung_ry * 0.1)) / 0.1, 0, 1)
        sign += rng.uniform(0.08, 0.12) * net * zone * lungs
    if has["Pleural_Thickening"]:
        side = rng.integers(2)
        cx = lcx[side]
        r = np.sqrt(((U - cx) / lung_rx) ** 2 + ((V - lung_cy) / lung_ry) ** 2)
        band = np.clip(1 - np.abs(r - 0.9) / 0.1, 0, 1) * ((U - cx) * (side * 2 - 1) > 0) * (V < lung_cy + 0.35)
        sign += rng.uniform(0.16, 0.22) * band
    if has["Hernia"]:
        cx, cy = -0.02, hcy + heart_ry * 0.35
        r = rng.uniform(0.09, 0.11)
        disk = ellipse(U, V, cx, cy, r, r * 0.9, 0.2)
        air = np.clip((cy - 0.01 - V) / 0.01, 0, 1)
        sign += disk * (0.1 - 0.35 * air)
    img += sign_contrast * SIGN_GAIN * sign
    img += _devices(rng, U, V, Ui, Vi)

    # ---- acquisition (nuisance): exposure gradient, gain/offset, contrast curve, blur, noise
    g_ang = rng.uniform(0, 2 * np.pi)
    img *= 1.0 + rng.uniform(0.0, 0.25) * (Ui * np.cos(g_ang) + Vi * np.sin(g_ang))
    img = np.clip(img * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1), 0.0, 1.0) ** rng.uniform(0.65, 1.5)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigmaX=rng.uniform(0.5, 1.0))
    return Phantom(image=finish(img, size, work, rng.uniform(0.015, 0.045), rng), labels=y)


draw_hard_phantom.signs = SIGNS_HARD  # what generate_phantoms writes into the source's README.txt
# no deliberate subgroup effect: every patient's signs at full contrast, as the hard family was
# calibrated (docs/results.md); the subgroup table's effect is the easy (demo) family's
draw_hard_phantom.subgroup_effect = False


def drawer(difficulty: str):
    """The phantom drawing function of a difficulty ('easy' or 'hard')."""
    if difficulty == "easy":
        return draw_phantom
    if difficulty == "hard":
        return draw_hard_phantom
    raise ConvertError(f"--difficulty must be one of {list(DIFFICULTIES)}, got {difficulty!r}")
