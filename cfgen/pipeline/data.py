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
import pyarrow as pa

from cfgen.config import DataConfig, JobConfig, StorageConfig
from cfgen.io.decode import DecodeError
from cfgen.io.manifest import (
    MANIFEST_SCHEMA,
    check_images_present,
    default_image_root,
    filter_manifest,
    manifest_to_arrow,
    normalize_manifest,
    read_manifest,
)
from cfgen.io.preprocess import decode_and_preprocess
from cfgen.io.prompts import build_prompt
from cfgen.io.splits import patient_split
from cfgen.io.storage import read_bytes, redact

#: Text columns cfgen's stages add. Typed explicitly: a batch in which every value is missing must still write
#: `string`, not Arrow's `null` type, or Parquet files of one data set would disagree on their schema.
TEXT_COLUMNS = (
    "prompt", "status", "error_stage", "error_reason", "provenance", "edit", "edit_name",
    "counterfactual_prompt", "model_uri", "counterfactual_uri", "panel_uri", "metric_error",
    "method", "method_signature", "edit_setting", "edit_applied", "edit_error", "factual_uri", "key", "rule",
    "model_version", "failure_stage", "failure_reason", "dicom_uri",
)


def append_columns(table: pa.Table, added: pa.Table) -> pa.Table:
    """Input columns keep their types; a stage's own columns are appended."""
    for name in added.column_names:
        table = table.append_column(name, added[name])
    return table


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """A Ray tensor column of an Arrow batch as one numpy array [rows, ...]."""
    return np.asarray(table[name].combine_chunks().to_numpy(zero_copy_only=False))


def typed_table(columns: dict[str, Any]) -> pa.Table:
    """A batch as an Arrow table: manifest columns get `MANIFEST_SCHEMA` types, stage text columns `string`,
    numpy arrays of 2+ dimensions Ray's tensor type; anything else is inferred."""
    from ray.data.extensions import ArrowTensorArray

    known = {f.name: f.type for f in MANIFEST_SCHEMA}
    known.update({name: pa.string() for name in TEXT_COLUMNS})
    arrays, names = [], []
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.ndim > 1:
            arrays.append(ArrowTensorArray.from_numpy(values))
        else:
            data = values.tolist() if isinstance(values, np.ndarray) and values.dtype == object else values
            arrays.append(pa.array(data, type=known.get(name), from_pandas=True))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def load_manifest(job: JobConfig, check_images: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(ok rows after filters, manifest error rows, number of input rows) for `job.data`.

    `check_images` looks for the first rows' images (`check_images_present`) and raises ValueError, naming the
    image root and the layout expected, when most are missing: jobs that read the images ask for it, so that a
    wrong `data.image_root` stops before any Ray work instead of becoming an errors table of the whole data set.
    """
    data = job.data
    if not data.manifest_uri:
        raise ValueError("data.manifest_uri is not set: point it at a manifest CSV/Parquet or a data-set root")
    layout = {"patients_uri": data.patients_uri, "labeler": data.labeler} if data.manifest_format == "mimic" else {}
    raw = read_manifest(data.manifest_uri, job.storage, fmt=data.manifest_format, image_root=data.image_root,
                        **layout)
    ok, errors = normalize_manifest(raw)
    if data.split_fractions:
        # per patient, so no patient has images in two splits; official splits (MIMIC's, CheXpert's) are kept
        ok = patient_split(ok, data.split_fractions, seed=data.split_seed, keep_existing=True)
    ok = filter_manifest(ok, data.view_positions, data.splits, data.limit)
    if check_images:
        root = data.image_root or default_image_root(data.manifest_uri)
        check_images_present(ok, root, data.manifest_format, job.storage)
    return ok, errors, len(raw)


def _decode_one(
    uri: str, data: DataConfig, storage: StorageConfig
) -> tuple[np.ndarray | None, str | None, str | None, dict]:
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
    return image, None, None, provenance


class DecodeStage:
    """Read, decode and caption a batch of manifest rows (a pandas DataFrame); usable without Ray in tests."""

    def __init__(self, data: DataConfig, storage: StorageConfig, io_threads: int = 8):
        self.data, self.storage, self.io_threads = data, storage, io_threads
        self.dtype = np.uint16 if data.decode.dtype == "uint16" else np.uint8

    def __call__(self, batch: pa.Table | pd.DataFrame) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else manifest_to_arrow(batch)
        rows = table.to_pylist()
        uris = [r["image_uri"] for r in rows]
        with ThreadPoolExecutor(max_workers=min(self.io_threads, max(1, len(uris)))) as pool:
            results = list(pool.map(lambda u: _decode_one(u, self.data, self.storage), uris))
        size = self.data.decode.size
        images = np.zeros((len(uris), size, size), dtype=self.dtype)
        for i, (image, *_) in enumerate(results):
            if image is not None:
                images[i] = image
        added = typed_table({
            "image": images,
            "prompt": [build_prompt(r, self.data.prompt) for r in rows],
            "status": ["ok" if image is not None else "error" for image, *_ in results],
            "error_stage": [stage for _, stage, _, _ in results],
            "error_reason": [reason for _, _, reason, _ in results],
            "provenance": [json.dumps(prov, default=str) for *_, prov in results],
        })
        return append_columns(table, added)


def in_order(ds):
    """`ds`, executed in its input's row order (on its own context, not the process's). Ray Data otherwise hands
    blocks on as they finish, so what is written or trained on would change from run to run (bench/RESULTS.md,
    reproducible training)."""
    ds.context.execution_options.preserve_order = True
    return ds


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
        batch_format="pyarrow",
        num_cpus=num_cpus,
    )


def _decode_batch(batch: pa.Table, data: DataConfig, storage: StorageConfig) -> pa.Table:
    return DecodeStage(data, storage)(batch)
