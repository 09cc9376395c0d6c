"""Per-image measures of an edit, on float images in [0,1] (pure numpy: no model, no Ray).

`identity_error` is the error of doing nothing (factual vs true counterfactual): a counterfactual is only useful
where its error against the truth is below that baseline.
"""

from __future__ import annotations

import numpy as np


def as_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8/uint16/float -> float32 in [0,1]."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    return arr.astype(np.float32)


def l1(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute difference, optionally inside a boolean mask (NaN for an empty mask)."""
    diff = np.abs(as_unit_float(a) - as_unit_float(b))
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        return float(diff[mask].mean()) if mask.any() else float("nan")
    return float(diff.mean())


def difference_map(factual: np.ndarray, counterfactual: np.ndarray) -> np.ndarray:
    """Signed counterfactual-minus-factual map in [-1,1]."""
    return as_unit_float(counterfactual) - as_unit_float(factual)


def effect_ratio(factual: np.ndarray, counterfactual: np.ndarray, truth: np.ndarray, threshold: float = 0.05) -> float:
    """How much of the true change the edit made where the truth changes (> `threshold`): 1 is the true effect,
    0 no effect, negative the wrong direction. NaN for a null edit (the truth does not change)."""
    f, c, t = as_unit_float(factual), as_unit_float(counterfactual), as_unit_float(truth)
    region = np.abs(t - f) > threshold
    if not region.any():
        return float("nan")
    return float((c - f)[region].mean() / (t - f)[region].mean())


def edit_metrics(
    factual: np.ndarray,
    counterfactual: np.ndarray,
    truth: np.ndarray | None = None,
    reconstruction: np.ndarray | None = None,
    autoencoded: np.ndarray | None = None,
) -> dict[str, float]:
    """The per-row numbers the demo and the generation job report (NaN where an input is missing, so every row
    has the same columns)."""
    nan = float("nan")
    return {
        "l1_factual_counterfactual": l1(factual, counterfactual),
        "cf_error_l1": l1(counterfactual, truth) if truth is not None else nan,
        "identity_error_l1": l1(factual, truth) if truth is not None else nan,
        "effect_ratio": effect_ratio(factual, counterfactual, truth) if truth is not None else nan,
        "reconstruction_l1": l1(factual, reconstruction) if reconstruction is not None else nan,
        "autoencoder_l1": l1(factual, autoencoded) if autoencoded is not None else nan,
    }


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity on [0,1] images (scikit-image, Gaussian-weighted as Wang et al. 2004)."""
    from skimage.metrics import structural_similarity

    x, y = as_unit_float(a).astype(np.float64), as_unit_float(b).astype(np.float64)
    side = min(x.shape)
    if side < 3:
        return float("nan")
    # the reference window is 11 pixels (sigma 1.5); smaller images get the largest odd window that fits
    win = min(11, side if side % 2 else side - 1)
    return float(structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, win_size=win,
                                       use_sample_covariance=False))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB on [0,1] images (scikit-image); inf for identical images."""
    from skimage.metrics import peak_signal_noise_ratio

    x, y = as_unit_float(a).astype(np.float64), as_unit_float(b).astype(np.float64)
    if np.array_equal(x, y):
        return float("inf")
    return float(peak_signal_noise_ratio(x, y, data_range=1.0))


def change_region(factual: np.ndarray, truth: np.ndarray, threshold: float = 0.02, dilation: int = 2) -> np.ndarray:
    """Where the true counterfactual differs from the factual image, grown by `dilation` pixels: the region an
    edit may touch. On phantoms the acquisition noise is the same in both, so this is exactly the changed
    layers (device, fluid, heart, lungs), whatever the planted effect."""
    from scipy.ndimage import binary_dilation

    region = np.abs(as_unit_float(truth) - as_unit_float(factual)) > threshold
    return binary_dilation(region, iterations=dilation) if dilation and region.any() else region


def preservation(image: np.ndarray, null_edit: np.ndarray) -> dict[str, float]:
    """How well the null edit (the factual prompt in and out) reproduces the input."""
    return {"null_l1": l1(image, null_edit), "null_ssim": ssim(image, null_edit), "null_psnr": psnr(image, null_edit)}


def minimality(image: np.ndarray, counterfactual: np.ndarray, region: np.ndarray | None) -> dict[str, float]:
    """How little the edit changed beyond its region: L1 outside it (NaN without a region), and SSIM of the whole
    counterfactual to the input."""
    outside = None if region is None else ~np.asarray(region, dtype=bool)
    return {"l1_outside_region": l1(image, counterfactual, outside) if outside is not None else float("nan"),
            "ssim_to_input": ssim(image, counterfactual)}


def reconstruction_fidelity(images: np.ndarray, reconstructions: np.ndarray,
                            structures: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """An autoencoder's L1 over whole images and inside each named structure mask ([N,H,W] booleans), so a blurred
    rib or lead shows even when the image-wide figure looks fine. A structure absent from every image is NaN."""
    x, r = as_unit_float(images), as_unit_float(reconstructions)
    out = {"image": float(np.abs(x - r).mean())}
    for name, mask in (structures or {}).items():
        m = np.asarray(mask, dtype=bool)
        out[name] = float(np.abs(x - r)[m].mean()) if m.any() else float("nan")
    return out
