"""Temperature scaling (Guo et al. 2017) per binary attribute, fitted on the validate split.

A probability read off an edited image ("P(device) fell from 0.97 to 0.04") is only meaningful if the classifier's
probabilities are calibrated; one temperature per head keeps its ranking (and AUROC) and fixes over-confidence.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cfgen.metrics.effectiveness import REGRESSION_ATTRIBUTES


def fit_temperature(logits: np.ndarray, targets: np.ndarray, max_iter: int = 200) -> float:
    """The T > 0 minimising the NLL of sigmoid(logits / T) on known binary labels (1.0 when there are none)."""
    if len(logits) == 0 or len(np.unique(targets)) < 2:
        return 1.0
    z = torch.tensor(logits, dtype=torch.float64)
    y = torch.tensor(targets, dtype=torch.float64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins: the mean gap between confidence and accuracy, weighted by bin size."""
    if len(probs) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(probs[sel].mean() - targets[sel].mean())
    return float(ece)


@torch.no_grad()
def raw_logits(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The uncalibrated logits [N, K] (temperature scaling is fitted on these)."""
    model.eval()
    out = [model(x).cpu().numpy() for x in model.image_batches(images, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(model.attributes)), np.float32)


def calibrate(model, images: np.ndarray, targets: np.ndarray, known: np.ndarray) -> dict[str, dict[str, float]]:
    """Set `model.temperature` from validate images; returns per attribute T and ECE before and after."""
    logits = raw_logits(model, images)
    report: dict[str, dict[str, float]] = {}
    temps = model.temperature.clone()
    for k, name in enumerate(model.attributes):
        if name in REGRESSION_ATTRIBUTES:
            continue
        sel = known[:, k]
        z, y = logits[sel, k], targets[sel, k]
        t = fit_temperature(z, y)
        temps[k] = t
        report[name] = {
            "temperature": t,
            "n": int(sel.sum()),
            "ece_before": expected_calibration_error(1 / (1 + np.exp(-z)), y),
            "ece_after": expected_calibration_error(1 / (1 + np.exp(-z / t)), y),
        }
    model.temperature.copy_(temps)
    return report
