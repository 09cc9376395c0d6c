"""Metadata to classifier targets, with missing and uncertain labels masked out of the loss.

The same rows that become prompts become targets, and by the same policy: a missing value is never imputed (its
mask is 0), and CheXpert's uncertain -1 follows `ClassifierConfig.uncertain`, which defaults to the prompt's policy
(the prompt's "omit" and "uncertain" both mean: this image does not say, so it does not teach the classifier).
Sex is the binary target P(male); age is a regression target in years.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cfgen.config import ClassifierConfig, PromptConfig
from cfgen.io.prompts import KNOWN_ATTRIBUTES
from cfgen.metrics.effectiveness import REGRESSION_ATTRIBUTES

__all__ = ["REGRESSION_ATTRIBUTES", "label_targets", "uncertain_policy"]


def uncertain_policy(classifier: ClassifierConfig, prompt: PromptConfig) -> str:
    """mask | positive | negative: the classifier's reading of a -1 label."""
    if classifier.uncertain is not None:
        return classifier.uncertain
    return {"positive": "positive", "negative": "negative"}.get(prompt.uncertain, "mask")


def _column(columns: Mapping[str, Any], name: str, n: int) -> np.ndarray:
    values = columns.get(name)
    if values is None:
        return np.full(n, np.nan, dtype=object)
    return np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=object)


def _number(value: Any) -> float | None:
    """A finite number, or None for anything missing or unreadable."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(x) else x


def _binary(values: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros(len(values), dtype=np.float32)
    mask = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        x = _number(v)
        if x == -1.0 and policy != "mask":
            x = 1.0 if policy == "positive" else 0.0
        if x in (0.0, 1.0):
            target[i], mask[i] = x, True
    return target, mask


def _sex(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros(len(values), dtype=np.float32)
    mask = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            v = v.decode()
        if v in ("M", "F"):
            target[i], mask[i] = float(v == "M"), True
    return target, mask


def _age(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    numbers = [_number(v) for v in values]
    mask = np.array([x is not None for x in numbers], dtype=bool)
    return np.array([x if x is not None else 0.0 for x in numbers], dtype=np.float32), mask


def label_targets(
    columns: Mapping[str, Any], attributes: Sequence[str], policy: str = "mask"
) -> tuple[np.ndarray, np.ndarray]:
    """(targets float32 [N, K], known bool [N, K]) for a batch given as column name -> values (a Ray numpy batch,
    a pandas DataFrame or a dict of lists). A column the batch lacks is all-unknown."""
    unknown = [a for a in attributes if a not in KNOWN_ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown classifier attributes {unknown}; known: {list(KNOWN_ATTRIBUTES)}")
    if hasattr(columns, "to_dict") and hasattr(columns, "columns"):  # a pandas DataFrame
        columns = {c: columns[c].to_numpy() for c in columns.columns}
    n = len(next(iter(columns.values()))) if len(columns) else 0
    targets = np.zeros((n, len(attributes)), dtype=np.float32)
    known = np.zeros((n, len(attributes)), dtype=bool)
    for k, name in enumerate(attributes):
        values = _column(columns, name, n)
        if name == "sex":
            targets[:, k], known[:, k] = _sex(values)
        elif name == "age":
            targets[:, k], known[:, k] = _age(values)
        else:
            targets[:, k], known[:, k] = _binary(values, policy)
    return targets, known


def matching_covariates(reads: Mapping[str, np.ndarray], labels: Mapping[str, Any] | None, exclude: str,
                        policy: str = "mask") -> np.ndarray:
    """Covariates [N, C] to match a counterfactual population on: every classifier head but `exclude`, its label
    where the row has one (sex as 1 = male, age in years, findings 0/1) and the classifier's read where not."""
    names = [a for a in reads if a not in ("features", exclude)]
    reads_matrix = np.stack([np.asarray(reads[a], np.float64) for a in names], 1) if names else None
    if reads_matrix is None:
        return np.zeros((len(reads.get("features", [])), 0))
    if labels is None:
        return reads_matrix
    targets, known = label_targets(labels, names, policy)
    return np.where(known, targets, reads_matrix)
