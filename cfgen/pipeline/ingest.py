"""Ingest: decode a manifest's images once into Parquet shards, with an errors table beside them.

Training passes over the data many times and generation reruns; reading decoded shards means no DICOM is decoded
twice (DESIGN.md §6). The job is idempotent: a finished ingest (its `_SUCCESS` marker) is reused, an unfinished one
is cleared and redone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pandas as pd

from cfgen.config import JobConfig
from cfgen.io.manifest import ERROR_COLUMNS, errors_frame
from cfgen.io.storage import exists, fsspec_filesystem, join_uri, pyarrow_filesystem, read_bytes, write_bytes
from cfgen.pipeline.data import decode_dataset, load_manifest, manifest_dataset

SUCCESS = "_SUCCESS"


@dataclass
class IngestResult:
    decoded_uri: str
    errors_uri: str
    input_rows: int
    filtered_out: int
    ok_rows: int
    error_rows: int

    def check(self) -> None:
        """Every input row is accounted for: decoded ok, in the errors table, or left out by a filter."""
        total = self.ok_rows + self.error_rows + self.filtered_out
        if total != self.input_rows:
            raise RuntimeError(f"ingest lost rows: {self.input_rows} in, {total} accounted for")


def ingest(job: JobConfig, output_uri: str | None = None) -> IngestResult:
    out = output_uri or join_uri(job.output_uri, "ingest")
    decoded_uri, errors_uri, marker = join_uri(out, "decoded"), join_uri(out, "errors.parquet"), join_uri(out, SUCCESS)
    if exists(marker, job.storage):
        from cfgen.pipeline.reuse import check_reuse

        done = json.loads(read_bytes(marker, job.storage))
        check_reuse(out, done.pop("settings", None), ingest_settings(job), unrecorded_ok=True)
        return IngestResult(**done)

    fs, decoded_path = fsspec_filesystem(decoded_uri, job.storage)
    if fs.exists(decoded_path):
        fs.rm(decoded_path, recursive=True)
    rows, manifest_errors, n_input = load_manifest(job, check_images=True)
    filtered_out = n_input - len(rows) - len(manifest_errors)

    pa_fs, pa_path = pyarrow_filesystem(decoded_uri, job.storage)
    if len(rows):
        # the decoded files hold the manifest's rows in its order, so that the VAE's fit images, the latent cache
        # and training's batches are the same on every ingest of the same data; without `in_order` a write task
        # took whichever block finished first (file 5 of an ingest held block 6), and Ray's own Parquet writer
        # may reorder the blocks inside one task's file (block 13 after 14 and 15)
        from cfgen.pipeline.ordered_parquet import write_parquet_in_order

        decoded = decode_dataset(manifest_dataset(rows), job.data, job.storage)
        write_parquet_in_order(decoded, pa_path, pa_fs)
        decode_errors = read_errors(decoded_uri, job)
        n_decoded = count_rows(decoded_uri, job)
    else:
        decode_errors, n_decoded = errors_frame(), 0
    errors = pd.concat([manifest_errors, decode_errors], ignore_index=True)[list(ERROR_COLUMNS)]
    write_errors(errors, errors_uri, job)

    result = IngestResult(
        decoded_uri=decoded_uri,
        errors_uri=errors_uri,
        input_rows=n_input,
        filtered_out=filtered_out,
        ok_rows=n_decoded - len(decode_errors),
        error_rows=len(errors),
    )
    result.check()
    write_bytes(marker, json.dumps({**asdict(result), "settings": ingest_settings(job)}).encode(), job.storage)
    return result


def ingest_settings(job: JobConfig) -> dict:
    """The data settings a decoded output depends on (all of `data` but the read concurrency)."""
    return {"data": job.data.model_dump(mode="json", exclude={"read_concurrency"})}


def count_rows(decoded_uri: str, job: JobConfig) -> int:
    import pyarrow.dataset as pds

    fs, path = pyarrow_filesystem(decoded_uri, job.storage)
    return pds.dataset(path, filesystem=fs, format="parquet").count_rows()


def read_errors(decoded_uri: str, job: JobConfig) -> pd.DataFrame:
    """The error rows of a decoded data set, reading only the small columns (Parquet projection)."""
    import pyarrow.dataset as pds

    fs, path = pyarrow_filesystem(decoded_uri, job.storage)
    table = pds.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["row_id", "image_id", "image_uri", "error_stage", "error_reason"],
        filter=pds.field("status") == "error",
    )
    frame = table.to_pandas().rename(columns={"error_stage": "stage", "error_reason": "reason"})
    return errors_frame(frame.to_dict("records"))


def write_errors(errors: pd.DataFrame, errors_uri: str, job: JobConfig) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = pyarrow_filesystem(errors_uri, job.storage)
    pq.write_table(pa.Table.from_pandas(errors, preserve_index=False), path, filesystem=fs)
    write_bytes(errors_uri.removesuffix(".parquet") + ".csv", errors.to_csv(index=False).encode(), job.storage)


def decoded_rows(job: JobConfig, decoded_uri: str, splits=None, columns: list[str] | None = None):
    """Decoded ok rows of `splits` (all splits when None) as a streaming Ray Dataset; the filter runs on Arrow."""
    import ray.data
    from ray.data.expressions import col

    fs, path = pyarrow_filesystem(decoded_uri, job.storage)
    read_columns = None if columns is None else sorted(set(columns) | {"status", "split"})
    ds = ray.data.read_parquet(path, filesystem=fs)
    if read_columns is not None:  # projected into the read (Ray Data's `columns=` argument is deprecated)
        ds = ds.select_columns(read_columns)
    predicate = col("status") == "ok"
    if splits:
        predicate = predicate & col("split").is_in(list(splits))
    ds = ds.filter(expr=predicate)
    return ds.select_columns(columns) if columns is not None else ds


def training_dataset(job: JobConfig, decoded_uri: str, splits=("train",)):
    """(image, prompt) pairs for fine-tuning."""
    return decoded_rows(job, decoded_uri, splits, columns=["image", "prompt"])
