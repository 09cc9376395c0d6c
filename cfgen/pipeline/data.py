"""The data plane on Ray Data: manifest -> bytes -> decode -> prompt, shared by ingest, training, generation, Serve.

Every input row comes out exactly once, either `status="ok"` with a fixed-size uint8/uint16 image and its prompt,
or `status="error"` with the stage and reason (and a zero image, so that every batch keeps one tensor shape).
Nothing is dropped: `ok + errors == input rows` is checked by the tests and reported by every job.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from cfgen.config import DataConfig, JobConfig, StorageConfig
from cfgen.io.decode import DecodeError
from cfgen.io.manifest import filter_manifest, manifest_to_arrow, normalize_manifest, read_manifest
from cfgen.io.preprocess import decode_and_preprocess
from cfgen.io.prompts import build_prompt
from cfgen.io.storage import read_bytes, redact

#: Columns of every decoded row besides the manifest's own.
DECODED_COLUMNS = ("image", "prompt", "status", "error_stage", "error_reason", "provenance")


def load_manifest(job: JobConfig) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(ok rows after filters, manifest error rows, number of input rows) for `job.data`."""
    data = job.data
    if not data.manifest_uri:
        raise ValueError("data.manifest_uri is not set: point it at a manifest CSV/Parquet or a data-set root")
    raw = read_manifest(data.manifest_uri, job.storage, fmt=data.manifest_format, image_root=data.image_root)
    ok, errors = normalize_manifest(raw)
    ok = filter_manifest(ok, data.view_positions, data.splits, data.limit)
    return ok, errors, len(raw)


def _decode_one(uri: str, data: DataConfig, storage: StorageConfig) -> tuple[np.ndarray | None, str, str, dict]:
    """(image or None, error stage, error reason, provenance) for one image URI."""
    try:
        payload = read_bytes(uri, storage)
    except FileNotFoundError:
        return None, "read", "missing_object: no object at this URI", {}
    except Exception as err:  # noqa: BLE001 - after retries, any storage failure is this row's error
        return None, "read", redact(f"read_failed: {type(err).__name__}: {err}"), {}
    try:
        image, provenance = decode_and_preprocess(payload, data.decode, uri=uri)
    except DecodeError as err:
        return None, "decode", str(err), {}  # "reason: message"
    except Exception as err:  # noqa: BLE001 - a decoder crash on a bad file must not end the job
        return None, "decode", f"decode_failed: {type(err).__name__}: {err}", {}
    return image, "", "", provenance


class DecodeStage:
    """Read, decode and caption a batch of manifest rows (a pandas DataFrame); usable without Ray in tests."""

    def __init__(self, data: DataConfig, storage: StorageConfig, io_threads: int = 8):
        self.data, self.storage, self.io_threads = data, storage, io_threads
        self.dtype = np.uint16 if data.decode.dtype == "uint16" else np.uint8

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        uris = batch["image_uri"].tolist()
        with ThreadPoolExecutor(max_workers=min(self.io_threads, max(1, len(uris)))) as pool:
            results = list(pool.map(lambda u: _decode_one(u, self.data, self.storage), uris))
        size = self.data.decode.size
        images = np.zeros((len(uris), size, size), dtype=self.dtype)
        status, stages, reasons, provenance = [], [], [], []
        for i, (image, stage, reason, prov) in enumerate(results):
            if image is not None:
                images[i] = image
            status.append("ok" if image is not None else "error")
            stages.append(stage or None)
            reasons.append(reason or None)
            provenance.append(json.dumps(prov, default=str))
        rows = batch.to_dict("records")
        out: dict[str, Any] = {c: _column(batch[c]) for c in batch.columns}
        out["image"] = images
        out["prompt"] = np.array([build_prompt(r, self.data.prompt) for r in rows], dtype=object)
        out["status"] = np.array(status, dtype=object)
        out["error_stage"] = np.array(stages, dtype=object)
        out["error_reason"] = np.array(reasons, dtype=object)
        out["provenance"] = np.array(provenance, dtype=object)
        return out


def _column(series: pd.Series) -> np.ndarray:
    if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
        return np.array([None if _missing(v) else v for v in series.tolist()], dtype=object)
    return series.to_numpy()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def manifest_dataset(rows: pd.DataFrame, rows_per_block: int = 256):
    """A Ray Dataset over manifest rows, in blocks small enough that decode tasks run in parallel."""
    import ray.data

    table = manifest_to_arrow(rows)
    parts = [table.slice(i, rows_per_block) for i in range(0, len(table), rows_per_block)] or [table]
    return ray.data.from_arrow(parts)


def decode_dataset(rows_ds, data: DataConfig, storage: StorageConfig, batch_size: int = 64, num_cpus: float = 0.5):
    """rows -> decoded rows, as stateless Ray tasks (I/O bound: many small objects read concurrently)."""
    return rows_ds.map_batches(
        _decode_batch,
        fn_kwargs={"data": data, "storage": storage},
        batch_size=batch_size,
        batch_format="pandas",
        num_cpus=num_cpus,
    )


def _decode_batch(batch: pd.DataFrame, data: DataConfig, storage: StorageConfig) -> dict[str, np.ndarray]:
    return DecodeStage(data, storage)(batch)
