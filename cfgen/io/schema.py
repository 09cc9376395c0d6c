"""The cfgen manifest schema and its normalisation: the bottom layer of the manifest code.

`cfgen.io.adapters` (the released CheXpert/MIMIC layouts) and `cfgen.io.manifest` (the reader that dispatches to
them) build on this module; it imports neither. `normalize_manifest` types every column, validates every row and
routes bad rows to an errors table; `filter_manifest` keeps views, splits and a limit. Adapters rename and derive;
`normalize_manifest` is the single place where values are checked.

Schema (known columns; column order of `MANIFEST_SCHEMA`):

| column          | type    | required | meaning                                                                 |
|-----------------|---------|----------|-------------------------------------------------------------------------|
| row_id          | int64   | added    | position of the row in the source manifest; errors name it              |
| image_id        | string  | yes      | unique id of the image (CheXpert: patient_study_view; MIMIC: dicom_id)  |
| image_uri       | string  | yes      | absolute URI (s3://, gs://, /abs/path) or a path relative to image_root |
| patient_id      | string  | no       | groups images for leak-free splits                                      |
| study_id        | string  | no       | CheXpert: "studyN" (unique only within a patient); MIMIC: global id     |
| mask_uri        | string  | no       | segmentation mask (e.g. lungs), resolved like image_uri                 |
| view_position   | string  | no       | upper case, stripped: "PA", "AP", "LATERAL", "LL", "AP AXIAL", ...      |
| split           | string  | no       | "train", "validate", "test" ("valid"/"val"/"validation" -> "validate")  |
| sex             | string  | no       | "F", "M" or null ("Female"/"Male"/"Unknown" are mapped)                 |
| age             | float64 | no       | years, 0..130; null when unknown                                        |
| smoking         | float64 | no       | 1.0 smoker, 0.0 non-smoker, null unknown                                |
| <finding> x 14  | float64 | no       | `FINDINGS`, no_finding .. support_devices: 1.0 positive, 0.0 negative,  |
|                 |         |          | -1.0 uncertain, null blank (not mentioned)                              |

Any other column is kept untouched as extra metadata (e.g. `phantom_index`, `phantom_seed`, MIMIC's `StudyDate`).
Identifiers are always strings: CSVs are read with `dtype=str` so "00042" keeps its zeros, and integer ids from
Parquet become "10000032", never "10000032.0". Errors are values: a bad row lands in the errors table with the
columns `ERROR_COLUMNS` and `stage="manifest"`; `len(ok) + len(errors) == len(input)` always holds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from cfgen.io.storage import is_absolute_uri, is_remote, join_uri

__all__ = [
    "FINDINGS",
    "FINDING_COLUMNS",
    "STRING_COLUMNS",
    "FLOAT_COLUMNS",
    "MANIFEST_COLUMNS",
    "MANIFEST_SCHEMA",
    "ERROR_COLUMNS",
    "normalize_manifest",
    "filter_manifest",
    "manifest_to_arrow",
    "resolve_uri",
    "normalize_view_position",
    "normalize_split",
    "normalize_sex",
    "errors_frame",
    "with_row_id",
    "is_null",
    "id_str",
    "string_series",
    "parse_age",
    "coerce_float_column",
]

#: The 14 CheXpert observations, snake_case, in the order of the CheXpert CSV header.
FINDINGS: tuple[str, ...] = (
    "no_finding",
    "enlarged_cardiomediastinum",
    "cardiomegaly",
    "lung_opacity",
    "lung_lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural_effusion",
    "pleural_other",
    "fracture",
    "support_devices",
)
FINDING_COLUMNS = FINDINGS
STRING_COLUMNS: tuple[str, ...] = (
    "image_id", "image_uri", "patient_id", "study_id", "mask_uri", "view_position", "split", "sex",
)
FLOAT_COLUMNS: tuple[str, ...] = ("age", "smoking", *FINDINGS)
MANIFEST_COLUMNS: tuple[str, ...] = ("row_id", *STRING_COLUMNS, *FLOAT_COLUMNS)
REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "image_uri")

MANIFEST_SCHEMA = pa.schema(
    [pa.field("row_id", pa.int64(), nullable=False)]
    + [pa.field(c, pa.string(), nullable=c not in REQUIRED_COLUMNS) for c in STRING_COLUMNS]
    + [pa.field(c, pa.float64()) for c in FLOAT_COLUMNS]
)

ERROR_COLUMNS: tuple[str, ...] = ("row_id", "image_id", "image_uri", "stage", "reason")

# Spellings of "no value" seen in exported tables; ids are exempt (an id "NA" is an id).
_NULL_TOKENS = frozenset({"", "nan", "none", "null", "na", "n/a", "<na>"})
_LABEL_VALUES = frozenset({1.0, 0.0, -1.0})
_SEX = {"f": "F", "female": "F", "m": "M", "male": "M"}
_SEX_UNKNOWN = frozenset({"u", "unknown", "unk"})
_SMOKING = {"1": 1.0, "1.0": 1.0, "true": 1.0, "yes": 1.0, "smoker": 1.0,
            "0": 0.0, "0.0": 0.0, "false": 0.0, "no": 0.0, "non-smoker": 0.0}
_SPLITS = {"valid": "validate", "val": "validate", "validation": "validate", "dev": "validate"}
_VIEW_ALIASES = {"LAT": "LATERAL"}
_MAX_AGE = 130.0
_UNSEEN = object()


# ----------------------------------------------------------------------------------------------- value helpers
def is_null(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    if isinstance(value, (str, np.str_)):
        return value.strip().lower() in _NULL_TOKENS
    return False


def id_str(value: Any) -> str | None:
    """An identifier as text: 10000032 and 10000032.0 both give "10000032"; blank gives None."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, bytes):
        value = value.decode()
    text = str(value).strip()
    return text or None


def string_series(values: Iterable[Any], index: pd.Index) -> pd.Series:
    """Text with None for missing, in pandas' own string dtype where it has one (NaN as the missing value)."""
    series = pd.Series(list(values), index=index, dtype=object)
    if int(pd.__version__.split(".")[0]) >= 3:
        return series.astype("str")
    return series


def normalize_view_position(value: Any) -> str | None:
    """' pa ' -> 'PA', 'ap axial' -> 'AP AXIAL', blank -> None (DICOM ViewPosition, upper case)."""
    if is_null(value):
        return None
    text = " ".join(str(value).split()).upper()
    return _VIEW_ALIASES.get(text, text)


def normalize_split(value: Any) -> str | None:
    if is_null(value):
        return None
    text = str(value).strip().lower()
    return _SPLITS.get(text, text)


def normalize_sex(value: Any) -> str | None:
    """'Female'/'F' -> 'F', 'Male'/'M' -> 'M', 'Unknown'/blank -> None; ValueError for anything else."""
    if is_null(value):
        return None
    text = str(value).strip().lower()
    if text in _SEX:
        return _SEX[text]
    if text in _SEX_UNKNOWN:
        return None
    raise ValueError(f"unrecognised sex {value!r} (expected F/M/Female/Male/Unknown/blank)")


def _parse_label(value: Any) -> float:
    if is_null(value):
        return math.nan
    number = float(value)  # ValueError for text
    if number not in _LABEL_VALUES:
        raise ValueError(value)
    return number


def parse_age(value: Any) -> float:
    if is_null(value):
        return math.nan
    text = str(value).strip()
    # "90+" is how de-identified exports cap the oldest ages.
    number = float(text[:-1] if text.endswith("+") else text) if isinstance(value, str) else float(value)
    if math.isnan(number):
        return math.nan
    if not 0 <= number <= _MAX_AGE:
        raise ValueError(f"age {value!r} out of range 0..{_MAX_AGE:g}")
    return number


def _parse_smoking(value: Any) -> float:
    if is_null(value):
        return math.nan
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if float(value) in (0.0, 1.0):
            return float(value)
        raise ValueError(value)
    key = str(value).strip().lower()
    if key not in _SMOKING:
        raise ValueError(value)
    return _SMOKING[key]


def _parse_all(values: list[Any], parse) -> list[Any]:
    """`parse` of each value, or the exception it raised; parsed once per distinct value (labels have four)."""
    memo: dict[Any, Any] = {}
    null = parse(None)
    out = []
    for value in values:
        if value is None or value is pd.NA or (isinstance(value, float) and value != value):
            result = null  # NaN never equals a dict key: keep it out of the memo
        else:
            result = memo.get(value, _UNSEEN) if isinstance(value, (str, float, int)) else _UNSEEN
            if result is _UNSEEN:
                try:
                    result = parse(value)
                except (TypeError, ValueError) as err:
                    result = err
                if isinstance(value, (str, float, int)):
                    memo[value] = result
        out.append(result)
    return out


def coerce_float_column(series: pd.Series, parse=_parse_label) -> pd.Series:
    """Floats where every value parses; otherwise the raw values stay so `normalize_manifest` can report them."""
    parsed = _parse_all(series.tolist(), parse)
    if any(isinstance(v, Exception) for v in parsed):
        return series.astype(object)
    return pd.Series(parsed, index=series.index, dtype="float64")


def resolve_uri(path: Any, root: str | None) -> str | None:
    """Join a relative path to `root`; absolute URIs and absolute paths are returned unchanged.

    A relative local root is made absolute first, so resolving twice gives the same answer.
    """
    path = id_str(path)
    if path is None or root is None or is_absolute_uri(path):
        return path
    if not is_remote(root) and not root.startswith("file://"):
        root = os.path.abspath(root)
    return join_uri(root, path)


def with_row_id(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with a `row_id` column (each row's position) unless it has one."""
    if "row_id" not in df.columns:
        df = df.copy()
        df.insert(0, "row_id", np.arange(len(df), dtype=np.int64))
    return df


# ------------------------------------------------------------------------------------------------- validation
def errors_frame(records: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """An errors table (the same columns at every stage) from dicts with `ERROR_COLUMNS` keys."""
    frame = pd.DataFrame(list(records), columns=list(ERROR_COLUMNS))
    frame["row_id"] = frame["row_id"].astype("int64")
    for column in ERROR_COLUMNS[1:]:
        frame[column] = string_series(frame[column].tolist(), frame.index)
    return frame


def normalize_manifest(df: pd.DataFrame, image_root: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Type and validate every row; return (ok rows, error rows). Nothing is dropped silently.

    A row is an error when image_id or image_uri is missing, its image_id repeats an earlier row's, its age does
    not parse (or lies outside 0..130), its sex or smoking value is unrecognised, or a finding label is not one of
    1/0/-1/blank. Reasons of one row are joined with "; ". Known columns absent from `df` are added as nulls so
    every manifest has the same schema; extra columns pass through.
    """
    df = with_row_id(df).reset_index(drop=True)
    n = len(df)
    reasons: list[list[str]] = [[] for _ in range(n)]
    out: dict[str, pd.Series] = {}

    row_ids = pd.to_numeric(df["row_id"], errors="coerce")
    if row_ids.isna().any():
        raise ValueError("manifest column row_id must hold integers (it is the row's position in its source)")
    out["row_id"] = row_ids.astype("int64")

    def column(name: str) -> list[Any]:
        return df[name].tolist() if name in df.columns else [None] * n

    raw_ids = column("image_id")
    raw_uris = column("image_uri")
    image_ids = [id_str(v) for v in raw_ids]
    seen: dict[str, int] = {}
    for i, image_id in enumerate(image_ids):
        if image_id is None:
            reasons[i].append("missing image_id")
        elif image_id in seen:
            reasons[i].append(f"duplicate image_id (first at row_id {int(out['row_id'].iat[seen[image_id]])})")
        else:
            seen[image_id] = i
    image_uris = [resolve_uri(v, image_root) for v in raw_uris]
    for i, uri in enumerate(image_uris):
        if uri is None:
            reasons[i].append("missing image_uri")
    out["image_id"] = image_ids
    out["image_uri"] = image_uris
    for name in ("patient_id", "study_id"):
        out[name] = [id_str(v) for v in column(name)]
    out["mask_uri"] = [resolve_uri(v, image_root) for v in column("mask_uri")]
    out["view_position"] = [normalize_view_position(v) for v in column("view_position")]
    out["split"] = [normalize_split(v) for v in column("split")]

    def parse_each(name: str, parse, describe) -> list[Any]:
        raw = column(name)
        values = _parse_all(raw, parse)
        for i, value in enumerate(values):
            if isinstance(value, Exception):
                reasons[i].append(describe(raw[i], value))
                values[i] = None if name == "sex" else math.nan
        return values

    out["sex"] = parse_each("sex", normalize_sex, lambda v, e: f"unrecognised sex {v!r}")
    out["age"] = parse_each("age", parse_age, lambda v, e: str(e) if "range" in str(e) else f"unparseable age {v!r}")
    out["smoking"] = parse_each("smoking", _parse_smoking, lambda v, e: f"smoking {v!r} not in 1/0/blank")
    for finding in FINDINGS:
        out[finding] = parse_each(
            finding, _parse_label, lambda v, e, f=finding: f"{f}: label {v!r} not in 1/0/-1/blank"
        )

    typed = pd.DataFrame(index=df.index)
    for name in MANIFEST_COLUMNS:
        if name == "row_id":
            typed[name] = out[name]
        elif name in STRING_COLUMNS:
            typed[name] = string_series(out[name], df.index)
        else:
            typed[name] = pd.Series(out[name], index=df.index, dtype="float64")
    extras = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    typed = pd.concat([typed, df[extras]], axis=1) if extras else typed

    bad = np.array([bool(r) for r in reasons], dtype=bool)
    ok = typed.loc[~bad].reset_index(drop=True)
    errors = errors_frame(
        {
            "row_id": int(out["row_id"].iat[i]),
            "image_id": image_ids[i],
            "image_uri": id_str(raw_uris[i]),
            "stage": "manifest",
            "reason": "; ".join(reasons[i]),
        }
        for i in np.flatnonzero(bad)
    )
    return ok, errors


def filter_manifest(
    df: pd.DataFrame,
    view_positions: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """Keep rows with one of `view_positions` and `splits` (compared normalised), then the first `limit` rows.

    A row with no view position (or split) is dropped by a filter on it: it cannot be shown to match.
    """
    mask = pd.Series(True, index=df.index)
    if view_positions is not None:
        wanted = {normalize_view_position(v) for v in view_positions}
        column = df["view_position"] if "view_position" in df.columns else pd.Series(None, index=df.index)
        mask &= column.map(normalize_view_position).isin(wanted)
    if splits is not None:
        wanted = {normalize_split(s) for s in splits}
        column = df["split"] if "split" in df.columns else pd.Series(None, index=df.index)
        mask &= column.map(normalize_split).isin(wanted)
    out = df.loc[mask]
    if limit is not None:
        out = out.head(limit)
    return out.reset_index(drop=True)


def manifest_to_arrow(df: pd.DataFrame) -> pa.Table:
    """An Arrow table with `MANIFEST_SCHEMA` types for the known columns; extra columns keep inferred types."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = []
    for field in table.schema:
        known = MANIFEST_SCHEMA.field(field.name) if field.name in MANIFEST_SCHEMA.names else None
        fields.append(pa.field(field.name, known.type, nullable=True) if known is not None else field)
    return table.cast(pa.schema(fields), safe=True).replace_schema_metadata(None)
