"""Render a phantom subject as a frontal (PA) chest X-ray with its lung mask.

Presentation is MONOCHROME2 (bright = dense: bone, heart, fluid, metal) in [0, 1]. Geometry lives in normalised
image coordinates (x to the image right, y down, both in [0, 1]), so a subject looks the same at 64 and at 512 pixels.
PA display convention: the patient's left is the image right, so the heart and the pacemaker sit right of centre.

The image is a sum of layers, each caused by named attributes and the subject's exogenous noise:

    anatomy (sex, age, cardiomegaly, noise) x gain  +  smoking shift (lung mask)  +  pleural fluid  +  device
    +  acquisition noise (seeded by the subject, identical in every counterfactual)  ->  clip to [0, 1]

Findings are added in absolute intensity units (not scaled by the gain) so that a planted effect in the image has
exactly the size set in `PhantomEffects`. A counterfactual therefore changes only the pixels of the layers its
intervention reaches: do(support_devices=0) only device pixels, do(smoking=1) only lung-mask pixels.

Lung mask choice: the lung *field* as segmentation data sets draw it (JSRT/SCR style): the anatomical lung outline
minus the heart shadow. Pleural fluid does not remove lung from the mask (the mask stays anatomical, so it is the
same with and without effusion); cardiomegaly does shrink it, as an enlarged heart covers more of the lung field.
"""

from __future__ import annotations

import math

import numpy as np

from cfgen.config import PhantomEffects
from cfgen.phantoms.scm import Subject

# Intensities (MONOCHROME2, 0..1) of the anatomy before gain.
_AIR = 0.03
_TISSUE_EDGE, _TISSUE_CORE = 0.30, 0.14  # soft tissue is thicker (brighter) towards the midline
_LUNG_AIR = 0.27  # how much darker aerated lung is than soft tissue
_HEART = 0.04  # heart over mediastinum; over the lungs it mainly restores soft-tissue density
_SPINE, _CLAVICLE, _RIB, _BREAST = 0.10, 0.12, 0.075, 0.05
_FLUID = 0.30  # pleural fluid is water-dense: it cancels the lung's air darkening
_NOISE_SD = 0.01
_EDGE = 0.004  # soft edge width of anatomy, in normalised units


def _soft_inside(d: np.ndarray, radius: float) -> np.ndarray:
    """Coverage of a shape with normalised radius d (1 on the boundary) and a smoothstep edge 2*_EDGE wide.

    The edge has compact support (exactly 0 and 1 outside it), so a layer changes no pixel beyond its region mask.
    """
    t = np.clip(0.5 + (1.0 - d) * radius / (2.0 * _EDGE), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    return c[None, :], c[:, None]


def _lung_geometry(subject: Subject, side: int, effects: PhantomEffects) -> dict[str, float]:
    """Lung centre and size; side -1 is the patient's right lung (image left), +1 the left lung (image right)."""
    u = subject.noise
    male = subject.sex == "M"
    shrink = 1.0 - effects.age_lung_shrink * (subject.age - 20) / 70.0
    a = 0.132 * (1.03 if male else 1.0) * (1.0 + 0.04 * u.lung_width)
    height = 0.56 * (1.04 if male else 1.0) * shrink * (1.0 + 0.03 * u.lung_height)
    apex = 0.14 + 0.008 * u.lung_apex
    cx = 0.5 + side * (0.158 + (0.008 if male else 0.0))
    return {"cx": cx, "a": a, "b": height / 2.0, "cy": apex + height / 2.0, "apex": apex, "height": height}


def _lung_shape(x, y, g: dict[str, float], side: int, shape: tuple[float, ...]):
    """Normalised radius d (inside where d < 1): narrow apex, lateral costophrenic angle lower than the medial base."""
    lateral = side * (x - g["cx"]) / g["a"]
    v = (y - g["cy"]) / g["b"]
    width = 0.55 + 0.45 * np.sqrt(np.clip((v + 1.0) / 1.6, 0.0, 1.0))
    uu = lateral / width * np.where(lateral < 0, 1.15, 1.0)  # flatter medial border
    vv = v - 0.12 * lateral
    d = (np.abs(uu) ** 2.3 + np.abs(vv) ** np.where(vv > 0, 3.0, 2.0)) ** (1 / 2.3)  # round apex, flat base
    theta = np.arctan2(vv, uu)
    r = np.ones_like(d)
    coef = shape[:6] if side < 0 else shape[6:12]
    for k, (c, s) in zip((2, 3, 4), zip(coef[0::2], coef[1::2])):
        r = r + 0.02 * (c * np.cos(k * theta) + s * np.sin(k * theta))
    return d / r


def _heart_geometry(subject: Subject, effects: PhantomEffects) -> dict[str, float]:
    u = subject.noise
    scale = effects.cardiomegaly_scale if subject.cardiomegaly else 1.0
    hw0 = 0.135 * (1.0 + 0.05 * u.heart_size)
    hw = hw0 * scale
    # an enlarged heart grows mostly towards the apex (patient's left = image right)
    hx = 0.53 + 0.012 * u.heart_x + 0.4 * (hw - hw0)
    hy = 0.585 + 0.012 * u.heart_y
    hh = 0.095 * (1.0 + 0.05 * u.heart_size) * (1.0 + 0.4 * (scale - 1.0))
    return {"hx": hx, "hy": hy, "hw": hw, "hh": hh, "angle": 0.45}


def _heart_shape(x, y, h: dict[str, float]):
    dx, dy = x - h["hx"], y - h["hy"]
    ca, sa = math.cos(h["angle"]), math.sin(h["angle"])
    p = dx * ca + dy * sa  # long axis from upper left to lower right (towards the apex)
    q = -dx * sa + dy * ca
    return np.sqrt((p / h["hw"]) ** 2 + (q / h["hh"]) ** 2)


def _segment_distance(x, y, p0, p1):
    (x0, y0), (x1, y1) = p0, p1
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * vx + (y - y0) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    return np.hypot(x - (x0 + t * vx), y - (y0 + t * vy))


def _device_mask(subject: Subject, size: int, heart: dict[str, float], x, y) -> np.ndarray:
    """A pacemaker generator in the left infraclavicular pocket and its lead through the SVC to the right ventricle."""
    u = subject.noise
    bx, by = 0.715 + 0.015 * u.device_x, 0.215 + 0.012 * u.device_y
    half_w, half_h = 0.038, 0.026
    mask = (np.abs(x - bx) <= half_w) & (np.abs(y - by) <= half_h)
    # cubic Bezier lead, stamped as disks: exact enough and cheap at any size
    p = np.array(
        [
            (bx - half_w, by + 0.005),
            (0.56, by - 0.03 + 0.01 * u.lead_bend),
            (0.45 + 0.01 * u.lead_bend, 0.40),
            (heart["hx"] + 0.02, heart["hy"] + 0.035),
        ]
    )
    t = np.linspace(0.0, 1.0, 400)[:, None]
    curve = (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]
    radius = max(0.0035, 0.6 / size)
    lead = np.zeros((size, size), dtype=bool)
    cols = (np.arange(size) + 0.5) / size
    reach = int(math.ceil(radius * size)) + 1
    for cx, cy in curve:
        i0, j0 = int(cy * size), int(cx * size)
        rs = slice(max(0, i0 - reach), min(size, i0 + reach + 1))
        cs = slice(max(0, j0 - reach), min(size, j0 + reach + 1))
        lead[rs, cs] |= (cols[rs, None] - cy) ** 2 + (cols[None, cs] - cx) ** 2 <= radius**2
    return mask | lead


def _effusion_layer(subject, x, y, lungs: dict[int, dict], aerated: np.ndarray, effects: PhantomEffects):
    """Water-dense fluid at the lung base(s) with a meniscus rising towards the lateral chest wall (concave up)."""
    u = subject.noise
    if effects.effusion_height <= 0:
        return np.zeros_like(aerated)
    sides = (-1, 1) if u.u_effusion_side < 0.4 else ((-1,) if u.u_effusion_side < 0.75 else (1,))
    fluid = np.zeros_like(aerated)
    fade = 0.015
    for side in sides:
        g = lungs[side]
        depth = effects.effusion_height * g["height"]
        level = g["apex"] + g["height"] - depth
        lateral01 = np.clip((side * (x - g["cx"]) / g["a"] + 1.0) / 2.0, 0.0, 1.0)
        top = level - depth * 0.35 * (lateral01**2 - 0.3) * (1.0 + 0.15 * u.meniscus)
        ramp = np.clip((y - top) / fade, 0.0, 1.0)
        own_side = (x - 0.5) * side > 0
        fluid = np.maximum(fluid, ramp * own_side)
    return fluid * aerated


def _compose(subject: Subject, size: int, effects: PhantomEffects) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if size < 16:
        raise ValueError(f"phantom size must be at least 16 pixels, got {size}")
    u = subject.noise
    x, y = _grid(size)
    male = subject.sex == "M"

    # body outline: a superellipse running off the bottom of the image, plus the neck
    body_w = (0.40 + (0.03 if male else 0.0)) * (1.0 + 0.03 * u.body_width)
    bx, by = (x - 0.5) / body_w, (y - 0.62) / 0.62
    body = _soft_inside((bx**4 + by**4) ** 0.25, body_w)
    neck = _soft_inside(np.abs(x - 0.5) / 0.085, 0.085) * (y < 0.2)
    body = np.maximum(body, neck)
    anatomy = _AIR + body * (_TISSUE_EDGE + _TISSUE_CORE * np.clip(1.0 - bx**2, 0.0, 1.0))
    if not male:
        for side in (-1, 1):
            d = np.hypot((x - 0.5 - side * 0.22) / 0.14, (y - 0.72) / 0.09)
            anatomy = anatomy + _BREAST * _soft_inside(d, 0.09) * body

    # lungs and heart: the heart is soft-tissue dense, so over the lungs it cancels their air darkening
    lungs = {side: _lung_geometry(subject, side, effects) for side in (-1, 1)}
    lung_d = np.minimum(*(_lung_shape(x, y, lungs[s], s, u.lung_shape) for s in (-1, 1)))
    heart = _heart_geometry(subject, effects)
    heart_d = _heart_shape(x, y, heart)
    lung_soft = _soft_inside(lung_d, lungs[1]["a"])
    heart_soft = _soft_inside(heart_d, heart["hh"])
    aerated = lung_soft * (1.0 - heart_soft)
    anatomy = anatomy - _LUNG_AIR * aerated + _HEART * heart_soft

    # bones: spine with vertebral bodies, clavicles, posterior ribs arching over the lungs
    spine = _soft_inside(np.abs(x - 0.5) / 0.032, 0.032) * (1.0 + 0.25 * np.cos(2 * np.pi * y / 0.045))
    anatomy = anatomy + _SPINE * spine * body
    for side in (-1, 1):
        d = _segment_distance(x, y, (0.5 + side * 0.05, 0.155), (0.5 + side * 0.30, 0.10))
        anatomy = anatomy + _CLAVICLE * _soft_inside(d / 0.013, 0.013)
    t = np.abs(x - 0.5)
    spacing = 0.068 * (1.0 + 0.04 * u.rib_spacing)
    phase = (y + 0.2 * t - 1.2 * t**2) / spacing + u.rib_phase
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 8
    thorax = _soft_inside(t / (0.92 * body_w), body_w) * (y > 0.09) * (y < 0.78)
    anatomy = anatomy + _RIB * ribs * thorax * (0.35 + 0.65 * lung_soft)

    anatomy = anatomy * (1.0 + 0.03 * u.intensity_gain)

    # findings, in absolute intensity units
    lung_field = (lung_d < 1.0) & ~(heart_d < 1.0)
    image = anatomy
    if subject.smoking:
        image = image + effects.smoking_lung_shift * lung_field
    effusion = np.zeros_like(image)
    if subject.pleural_effusion:
        # fluid replaces air wherever the lung is aerated (soft edge included), so no dark rim is left around it
        effusion = _effusion_layer(subject, x, y, lungs, aerated, effects)
        image = image + _FLUID * effusion
    device = np.zeros((size, size), dtype=bool)
    if subject.support_devices:
        device = _device_mask(subject, size, heart, x, y)
        image = image + effects.device_contrast * device

    noise = np.random.default_rng(subject.noise_seed).standard_normal((size, size)) * _NOISE_SD
    image = np.clip(image + noise, 0.0, 1.0).astype(np.float32)
    regions = {
        "lungs": lung_field,
        "heart": heart_d < 1.0,
        "device": device,
        "effusion": effusion > 0,
        "body": body >= 0.5,
        "ribs": ribs * thorax > 0.3,
    }
    return image, regions


def render(subject: Subject, size: int, effects: PhantomEffects | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The phantom CXR (float32 HxW in [0, 1], MONOCHROME2) and its lung mask (uint8 0/1), deterministic per subject."""
    image, regions = _compose(subject, int(size), effects or PhantomEffects())
    return image, regions["lungs"].astype(np.uint8)


def render_regions(subject: Subject, size: int, effects: PhantomEffects | None = None) -> dict[str, np.ndarray]:
    """Boolean masks of the regions an attribute can change: lungs, heart, device, effusion (and body, ribs)."""
    return _compose(subject, int(size), effects or PhantomEffects())[1]
