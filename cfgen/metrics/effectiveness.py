"""What the classifier reads in a counterfactual: did the edited attribute move to its target, and what else moved.

Inputs are the classifier's calibrated outputs on the factual and on the counterfactual images (probabilities for
binary attributes, years for age) and, where known, each row's factual state of the edited attribute (a label or
the phantom's truth; the classifier's own decision where the label is missing). Outputs are per-row arrays, then
a set summary: flip rate toward the target, mean shift toward it, and the mean shift of every other attribute
(entanglement: an edit of A should leave B's probability where it was).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


#: Attributes the classifier regresses (in years) rather than classifies.
REGRESSION_ATTRIBUTES = ("age",)

#: An age edit has "reached" its target when the predicted age is within this many years of it.
AGE_TOLERANCE_YEARS = 5.0


def edit_target(edit: Mapping[str, Any], attributes: list[str]) -> tuple[str, float]:
    """(attribute, target) of a single-attribute edit the classifier can read; a clear error otherwise."""
    if len(edit) != 1:
        raise ValueError(f"effectiveness reads single-attribute edits, got {dict(edit)}")
    (name, value), = edit.items()
    if name not in attributes:
        raise ValueError(f"the classifier has no head for {name!r} (it reads {attributes}): add it to "
                         "classifier.attributes and retrain, or turn metrics off for this edit")
    return name, target_value(name, value)


def _reached(name: str, values: np.ndarray, target: float) -> np.ndarray:
    if name in REGRESSION_ATTRIBUTES:
        return np.abs(values - target) <= AGE_TOLERANCE_YEARS
    return (values >= 0.5) == bool(target >= 0.5)


def row_scores(
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    edit: Mapping[str, Any],
    factual_state: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-row effectiveness and off-target columns for one edit over a set of images.

    `before`/`after`: {attribute: [N]} (plus "features": [N, D]). `factual_state`: the edited attribute's
    factual value per row (NaN where unknown). `needs_change` marks rows whose factual state differs from the
    target: only they can flip, and summaries are taken over them."""
    attributes = [a for a in before if a != "features"]
    name, target = edit_target(edit, attributes)
    b, a = np.asarray(before[name], dtype=np.float64), np.asarray(after[name], dtype=np.float64)
    n = len(b)
    state = np.full(n, np.nan) if factual_state is None else np.asarray(factual_state, dtype=np.float64)
    if name in REGRESSION_ATTRIBUTES:
        guess, direction = b, np.sign(target - np.where(np.isnan(state), b, state))
        needs = np.abs(target - np.where(np.isnan(state), guess, state)) > AGE_TOLERANCE_YEARS
    else:
        guess = (b >= 0.5).astype(np.float64)
        known = np.where(np.isnan(state), guess, state)
        needs = known != target
        direction = np.full(n, 1.0 if target >= 0.5 else -1.0)
    cols: dict[str, np.ndarray] = {
        "target_before": b,
        "target_after": a,
        "target_shift": (a - b) * direction,
        "needs_change": needs,
        "flipped": _reached(name, a, target) & ~_reached(name, b, target),
        "reached_target": _reached(name, a, target),
    }
    off = [o for o in attributes if o != name and o not in REGRESSION_ATTRIBUTES]
    shifts = np.stack([np.asarray(after[o], np.float64) - np.asarray(before[o], np.float64) for o in off], 1) \
        if off else np.zeros((n, 0))
    for j, o in enumerate(off):
        cols[f"shift__{o}"] = shifts[:, j]
    for o in attributes:
        if o != name and o in REGRESSION_ATTRIBUTES:
            cols[f"shift__{o}"] = np.asarray(after[o], np.float64) - np.asarray(before[o], np.float64)
    cols["max_abs_off_target_shift"] = np.abs(shifts).max(1) if off else np.zeros(n)
    if "features" in before and "features" in after:
        fb, fa = np.asarray(before["features"], np.float64), np.asarray(after["features"], np.float64)
        cols["feature_distance"] = np.linalg.norm(fa - fb, axis=1) / np.maximum(np.linalg.norm(fb, axis=1), 1e-8)
    return cols


def summarize_scores(cols: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Set figures over the rows that need a change: flip rate (reached the target from the other side), mean
    shift toward the target, the mean shift of each other attribute and the largest of those in absolute value."""
    needs = np.asarray(cols["needs_change"], dtype=bool)
    out: dict[str, float] = {"n": int(needs.sum())}
    if not needs.any():
        return {**out, "flip_rate": float("nan"), "mean_target_shift": float("nan"),
                "max_off_target_shift": float("nan")}
    out["flip_rate"] = float(np.mean(np.asarray(cols["reached_target"])[needs]))
    out["mean_target_shift"] = float(np.mean(np.asarray(cols["target_shift"])[needs]))
    off = {k.removeprefix("shift__"): float(np.mean(np.asarray(v)[needs])) for k, v in cols.items()
           if k.startswith("shift__")}
    binary_off = {k: v for k, v in off.items() if k not in REGRESSION_ATTRIBUTES}
    out["max_off_target_shift"] = max((abs(v) for v in binary_off.values()), default=0.0)
    out["off_target_attribute"] = max(binary_off, key=lambda k: abs(binary_off[k])) if binary_off else ""
    out.update({f"off_target_shift__{k}": v for k, v in off.items()})
    if "feature_distance" in cols:
        out["mean_feature_distance"] = float(np.mean(np.asarray(cols["feature_distance"])[needs]))
    return out


def target_value(attribute: str, value: Any) -> float:
    """An edit's target as the classifier reads it: sex 'M' -> 1.0, 'F' -> 0.0; a binary 0/1 as it is; age in
    years."""
    if attribute == "sex":
        if isinstance(value, str) and value.strip().upper()[:1] in ("M", "F"):
            return float(value.strip().upper()[:1] == "M")
        raise ValueError(f"sex edit {value!r}: give 'M' or 'F'")
    return float(value)
