"""Patient-level splits: no patient's images in two splits, the same answer on every run and machine.

Images of one patient are correlated (same anatomy, same devices), so an image-level split leaks the test set into
training. A split is chosen per patient from a SHA-256 of (seed, patient_id), not Python's `hash()`, which is salted
per process. Rows without a patient_id fall back to their image_id (each such image is its own "patient").
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping

import pandas as pd

from cfgen.io.schema import id_str, normalize_split, string_series

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_FRACTIONS", "patient_split", "assert_no_patient_leak", "split_of"]

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "validate": 0.1, "test": 0.1}
_SCALE = float(2**64)


def split_of(key: str, fractions: Mapping[str, float], seed: int = 0) -> str:
    """The split of one patient key: a uniform number in [0, 1) from SHA-256, bucketed by cumulative fraction."""
    digest = hashlib.sha256(f"cfgen-split:{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / _SCALE
    cumulative = 0.0
    names = list(fractions)
    for name in names:
        cumulative += fractions[name]
        if u < cumulative:
            return name
    return names[-1]  # rounding of the cumulative sum


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    if not fractions or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions {dict(fractions)} must be non-negative and non-empty")
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions {dict(fractions)} sum to {total}, not 1")
    return {normalize_split(k): float(v) for k, v in fractions.items()}


def _patient_keys(df: pd.DataFrame) -> list[str]:
    patients = df["patient_id"].tolist() if "patient_id" in df.columns else [None] * len(df)
    images = df["image_id"].tolist() if "image_id" in df.columns else [None] * len(df)
    keys = []
    for i, (patient, image) in enumerate(zip(patients, images)):
        patient, image = id_str(patient), id_str(image)
        keys.append(f"patient:{patient}" if patient else f"image:{image}" if image else f"row:{i}")
    return keys


def patient_split(
    df: pd.DataFrame,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    keep_existing: bool = True,
) -> pd.DataFrame:
    """A copy of `df` with a `split` column assigned per patient.

    With `keep_existing`, rows that already have a split (e.g. MIMIC's official one) keep it, and a patient's
    unsplit rows join that patient's existing split, so adding rows never creates a leak. Patients whose existing
    rows already disagree are left as they are (and logged): `assert_no_patient_leak` will name them.
    """
    fractions = _check_fractions(fractions or DEFAULT_FRACTIONS)
    keys = _patient_keys(df)
    existing = (
        [normalize_split(v) for v in df["split"]] if keep_existing and "split" in df.columns else [None] * len(df)
    )
    known: dict[str, str] = {}
    conflicts = set()
    for key, split in zip(keys, existing):
        if split is None:
            continue
        if known.setdefault(key, split) != split:
            conflicts.add(key)
    if conflicts:
        logger.warning("%d patients already have rows in more than one split; kept as given", len(conflicts))

    cache: dict[str, str] = {}
    out = []
    for key, split in zip(keys, existing):
        if split is None:
            split = known.get(key) or cache.get(key)
            if split is None:
                split = cache[key] = split_of(key, fractions, seed)
        out.append(split)
    result = df.copy()
    result["split"] = string_series(out, result.index)
    return result


def assert_no_patient_leak(df: pd.DataFrame) -> None:
    """Raise AssertionError naming patients whose images sit in more than one split (rows without ids ignored)."""
    if "split" not in df.columns or "patient_id" not in df.columns:
        return
    pairs = pd.DataFrame(
        {"patient_id": [id_str(v) for v in df["patient_id"]], "split": [normalize_split(v) for v in df["split"]]}
    ).dropna()
    counts = pairs.drop_duplicates().groupby("patient_id")["split"].nunique()
    leaked = counts[counts > 1].index.tolist()
    if leaked:
        shown = ", ".join(map(str, leaked[:10])) + (" ..." if len(leaked) > 10 else "")
        raise AssertionError(f"{len(leaked)} patients appear in more than one split: {shown}")
