"""Realism as a Frechet distance between feature distributions (Heusel et al. 2017's FID formula).

The features are the project's own CXR classifier's pooled trunk features (Inception weights cannot be had here,
DESIGN.md §2), so the figure is "FD on cfgen-classifier features", not FID, and is comparable only between sets of
the same size scored by the same classifier: the distance is biased upwards at small n. Every figure is therefore
reported beside the distance between two real samples of the same size (`real_baseline`).

Matching (`matched_realism`): the counterfactuals of do(A=a) keep their subjects' other attributes, and those
differ from the real A=a group's wherever A is correlated with anything (devices with effusion, cardiomegaly with
age). An unmatched distance then measures that population difference, not realism: on the phantom benchmark the
true counterfactuals of do(support_devices=0) scored 10x the real-vs-real distance. So the real reference is
reweighted (propensity weights on the other attributes) to the counterfactual population before comparing.
"""

from __future__ import annotations

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) for feature sets [n_a, D] and [n_b, D] (n >= 2)."""
    return weighted_frechet_distance(a, b, np.ones(len(b)))


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


def realism_against(real: np.ndarray, generated: np.ndarray, seed: int = 0, real_covariates: np.ndarray | None = None,
                    generated_covariates: np.ndarray | None = None) -> tuple[float, float, int]:
    """(distance of `generated` to real, the same for a real sample of the same size, n) from one set of real
    features: half of it is the reference, the other half the real sample, and both sets are cut to the same n,
    so the two distances carry the same small-sample bias. With covariates, both halves are matched to the
    generated set (`matched_realism`). NaNs when fewer than 2 of either remain."""
    real, generated = np.asarray(real), np.asarray(generated)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real))
    ref, pool = order[: len(real) // 2], order[len(real) // 2:]
    if real_covariates is None or generated_covariates is None:
        zero = np.zeros((len(real), 0))
        real_covariates, generated_covariates = zero, np.zeros((len(generated), 0))
    real_covariates = np.asarray(real_covariates)
    return matched_realism(generated, generated_covariates, real[ref], real_covariates[ref], real[pool],
                           real_covariates[pool], seed=seed)


def propensity_weights(target: np.ndarray, reference: np.ndarray, l2: float = 1.0, clip: float = 20.0) -> np.ndarray:
    """Weights for the `reference` rows that make their covariates [n_ref, C] distributed like `target`'s
    [n_t, C]: a ridge logistic regression of membership (target 1, reference 0), w = p / (1 - p), clipped and
    normalised to mean 1. Covariates are standardised on the pooled rows; NaNs are set to the pooled mean."""
    t, r = np.asarray(target, np.float64), np.asarray(reference, np.float64)
    if t.ndim != 2 or r.ndim != 2 or t.shape[1] != r.shape[1]:
        raise ValueError(f"covariates must be [n, C] with the same C, got {t.shape} and {r.shape}")
    if t.shape[1] == 0 or len(t) == 0 or len(r) == 0:
        return np.ones(len(r))
    x = np.concatenate([t, r])
    mean = np.nanmean(x, 0)
    x = np.where(np.isnan(x), mean, x)
    sd = x.std(0)
    x = np.concatenate([np.ones((len(x), 1)), (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)], 1)
    y = np.concatenate([np.ones(len(t)), np.zeros(len(r))])
    beta = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], l2)
    penalty[0] = 0.0  # no shrinkage of the intercept
    for _ in range(50):  # Newton-Raphson (IRLS)
        p = 1 / (1 + np.exp(-np.clip(x @ beta, -30, 30)))
        grad = x.T @ (p - y) + penalty * beta
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    p_ref = 1 / (1 + np.exp(-np.clip(x[len(t):] @ beta, -30, 30)))
    w = np.clip(p_ref / (1 - p_ref), 1e-6, None)
    w = np.minimum(w / w.mean(), clip)
    return w / w.mean()


def weighted_frechet_distance(a: np.ndarray, b: np.ndarray, b_weights: np.ndarray) -> float:
    """The Frechet distance of `a` to `b` with `b`'s mean and covariance taken under `b_weights`."""
    from scipy import linalg

    a, b, w = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(b_weights, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [n, D] with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu_a, mu_b = a.mean(0), np.average(b, axis=0, weights=w)
    s_a = np.cov(a, rowvar=False)
    s_b = np.cov(b, rowvar=False, aweights=w)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as the FID reference code does
        eps = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = np.real(covmean)
    return max(float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)), 0.0)


def matched_realism(
    generated: np.ndarray, generated_covariates: np.ndarray,
    reference: np.ndarray, reference_covariates: np.ndarray,
    pool: np.ndarray, pool_covariates: np.ndarray,
    seed: int = 0, draws: int = 5,
) -> tuple[float, float, int]:
    """(distance of `generated` to the real `reference`, the same for `n` real images drawn from `pool`, n), with
    reference and pool reweighted to the generated set's covariates. `reference` and `pool` are disjoint real
    sets of the target group (e.g. two splits); n = min(len(generated), len(pool)). The real sample is drawn with
    replacement in proportion to its weights: a pool with few subjects like the generated ones (few effusions
    among patients without devices) is then resampled rather than filled up with unlike ones."""
    generated, pool = np.asarray(generated), np.asarray(pool)
    n = int(min(len(generated), len(pool)))
    if n < 2 or len(reference) < 2:
        return float("nan"), float("nan"), n
    rng = np.random.default_rng(seed)
    w_ref = propensity_weights(generated_covariates, reference_covariates)
    w_pool = propensity_weights(generated_covariates, pool_covariates)
    picked = generated[rng.choice(len(generated), n, replace=False)]
    distance = weighted_frechet_distance(picked, reference, w_ref)
    p = w_pool / w_pool.sum()
    baseline = float(np.mean([weighted_frechet_distance(pool[rng.choice(len(pool), n, replace=True, p=p)],
                                                        reference, w_ref) for _ in range(draws)]))
    return distance, baseline, n

