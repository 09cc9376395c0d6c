"""Every per-edit measure of a batch of counterfactuals, as one offline function (the generation job's metric stage
calls it, and so can a notebook on saved images).

Inputs are plain arrays: factual images, counterfactuals, optional null edits, edit-backs and edit regions, the
classifier's reads of each (`AttributeClassifier.predict`), and the edited attribute's factual state per row.
A row the classifier cannot score (an edit of an attribute it has no head for, a multi-attribute edit) gets NaN
classifier columns and a reason in `metric_error`, never an exception.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cfgen.metrics.effectiveness import row_scores
from cfgen.metrics.image import l1, minimality, preservation

#: Classifier columns every scored row carries (NaN where it cannot be scored).
CLASSIFIER_COLUMNS = ("target_before", "target_after", "target_shift", "needs_change", "reached_target",
                      "max_abs_off_target_shift", "feature_distance")


def image_metrics(
    factual: np.ndarray, counterfactual: np.ndarray, null_edit: np.ndarray | None = None,
    edit_back: np.ndarray | None = None, region: np.ndarray | None = None,
) -> dict[str, float]:
    """Preservation (null edit vs input), minimality (outside the region, whole-image SSIM) and reversibility
    (edit, then edit back, vs input) for one image; NaN for what was not given."""
    nan = float("nan")
    out = preservation(factual, null_edit) if null_edit is not None else {"null_l1": nan, "null_ssim": nan,
                                                                           "null_psnr": nan}
    out.update(minimality(factual, counterfactual, region))
    out["reversibility_l1"] = l1(factual, edit_back) if edit_back is not None else nan
    return out


def classifier_metrics(
    before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray], edits: Sequence[Mapping[str, Any]],
    factual_state: np.ndarray,
) -> tuple[dict[str, np.ndarray], list[str | None]]:
    """Rows may carry different edits: they are scored edit by edit. Returns the columns (`CLASSIFIER_COLUMNS`,
    `p_before__A` / `p_after__A` for every head) and a reason per row where scoring was impossible."""
    n = len(edits)
    heads = [a for a in before if a != "features"]
    cols: dict[str, np.ndarray] = {c: np.full(n, np.nan) for c in CLASSIFIER_COLUMNS}
    for a in heads:
        cols[f"p_before__{a}"] = np.asarray(before[a], np.float64)
        cols[f"p_after__{a}"] = np.asarray(after[a], np.float64)
    reasons: list[str | None] = [None] * n
    keys = [tuple(sorted(e.items())) for e in edits]
    for key in dict.fromkeys(keys):
        rows = np.array([k == key for k in keys])
        edit = dict(key)
        sub = lambda d: {a: np.asarray(v)[rows] for a, v in d.items()}  # noqa: E731
        try:
            scores = row_scores(sub(before), sub(after), edit, np.asarray(factual_state, np.float64)[rows])
        except ValueError as err:
            for i in np.flatnonzero(rows):
                reasons[i] = f"unscorable_edit: {err}"
            continue
        for c in CLASSIFIER_COLUMNS:
            if c in scores:
                cols[c][rows] = np.asarray(scores[c], np.float64)
    return cols, reasons
