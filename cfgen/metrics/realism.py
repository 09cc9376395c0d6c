"""Realism as a Frechet distance between feature distributions (Heusel et al. 2017's FID formula).

The features are the project's own CXR classifier's pooled trunk features (Inception weights cannot be had here,
DESIGN.md §2), so the figure is "FD on cfgen-classifier features", not FID, and is comparable only between sets of
the same size scored by the same classifier: the distance is biased upwards at small n. Every figure is therefore
reported beside the distance between two real samples of the same size (`real_baseline`).
"""

from __future__ import annotations

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) for feature sets [n_a, D] and [n_b, D] (n >= 2)."""
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [n, D] with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as the FID reference code does
        eps = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = np.real(covmean)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))
    return max(value, 0.0)


def real_baseline(pool: np.ndarray, reference: np.ndarray, n: int, seed: int = 0, draws: int = 5) -> float:
    """The mean distance between `n` real features drawn from `pool` and the `reference` set: what a perfectly
    realistic set of `n` images would score against the same reference."""
    pool = np.asarray(pool)
    n = min(n, len(pool))
    if n < 2 or len(reference) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.mean([frechet_distance(pool[rng.choice(len(pool), n, replace=False)], reference)
                          for _ in range(draws)]))


def realism_against(real: np.ndarray, generated: np.ndarray, seed: int = 0) -> tuple[float, float, int]:
    """(distance of `generated` to real, the same for a real sample of the same size, n) from one pool of real
    features: half the real set is the reference, the other half the real sample, and both sets are cut to the
    same n, so the two distances carry the same small-sample bias. NaNs when fewer than 2 of either remain."""
    real, generated = np.asarray(real), np.asarray(generated)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real))
    reference, pool = real[order[: len(real) // 2]], real[order[len(real) // 2:]]
    n = int(min(len(generated), len(pool)))
    if n < 2 or len(reference) < 2:
        return float("nan"), float("nan"), n
    picked = generated[rng.choice(len(generated), n, replace=False)]
    return frechet_distance(picked, reference), real_baseline(pool, reference, n, seed=seed), n
