"""Tables as released: CSV (plain or compressed) and Parquet files to DataFrames, from any storage URI."""

from __future__ import annotations

import io

import pandas as pd

from cfgen.config import StorageConfig
from cfgen.io.storage import read_bytes

__all__ = ["read_table"]

_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zip": "zip", ".xz": "xz", ".zst": "zstd"}


def read_table(uri: str, storage: StorageConfig | None = None) -> pd.DataFrame:
    """A CSV (optionally compressed, e.g. `.csv.gz`) or Parquet file as a DataFrame.

    CSV cells are read as text with only blank cells missing, so ids keep leading zeros and a label "-1.0" is not
    guessed into something else; `normalize_manifest` does the typing.
    """
    lower = str(uri).lower()
    data = read_bytes(uri, storage)
    if lower.endswith((".parquet", ".pq")):
        return pd.read_parquet(io.BytesIO(data))
    suffix = next((s for s in _COMPRESSION if lower.endswith(s)), None)
    stem = lower[: -len(suffix)] if suffix else lower
    if not stem.endswith((".csv", ".tsv", ".txt")):
        raise ValueError(f"{uri}: a manifest must be .csv, .csv.gz, .tsv or .parquet")
    return pd.read_csv(
        io.BytesIO(data),
        sep="\t" if stem.endswith(".tsv") else ",",
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        compression=_COMPRESSION[suffix] if suffix else None,
    )

