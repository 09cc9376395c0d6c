"""Held-out performance of the classifier: AUROC per binary attribute with a bootstrap 95% CI, MAE of age.

AUROC comes from torchmetrics; the CI is the percentile interval over resamples of the test images (a resample
with one class only is skipped, as AUROC is undefined there).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cfgen.metrics.effectiveness import REGRESSION_ATTRIBUTES


def auroc(probs: np.ndarray, targets: np.ndarray) -> float:
    from torchmetrics.functional.classification import binary_auroc

    if len(np.unique(targets)) < 2:
        return float("nan")
    return float(binary_auroc(torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(targets).long()))


def bootstrap_auroc(probs: np.ndarray, targets: np.ndarray, resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of AUROC over `resamples` bootstrap draws of the images."""
    if resamples <= 0 or len(np.unique(targets)) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n = len(probs)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        if targets[idx].min() != targets[idx].max():
            values.append(auroc(probs[idx], targets[idx]))
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def evaluate(predictions: dict[str, np.ndarray], targets: np.ndarray, known: np.ndarray, attributes: list[str],
             resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per attribute: n, positives, AUROC and its 95% CI (binary), or MAE in years (age)."""
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(attributes):
        sel = known[:, k]
        p, y = predictions[name][sel], targets[sel, k]
        if name in REGRESSION_ATTRIBUTES:
            out[name] = {"n": int(sel.sum()), "mae_years": float(np.abs(p - y).mean()) if len(y) else float("nan")}
            continue
        lo, hi = bootstrap_auroc(p, y, resamples, seed)
        out[name] = {"n": int(sel.sum()), "positives": int(y.sum()), "auroc": auroc(p, y),
                     "auroc_ci_low": lo, "auroc_ci_high": hi}
    return out
