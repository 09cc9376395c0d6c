"""The data plane end to end on a real local Ray and a real S3 server on loopback (moto)."""

import io

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cfgen.config import JobConfig, PhantomConfig
from cfgen.io.storage import fsspec_filesystem, pyarrow_filesystem, write_bytes
from cfgen.phantoms.writers import write_phantoms

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _bad_rows(prefix: str, storage) -> list[dict]:
    """Rows whose images are broken in the ways real buckets break."""
    write_bytes(f"{prefix}/bad/corrupt.dcm", b"\x00" * 128 + b"DICM" + b"\x02\x00" * 40, storage)
    write_bytes(f"{prefix}/bad/not_an_image.png", b"hello, this is text", storage)
    write_bytes(f"{prefix}/bad/empty.dcm", b"", storage)
    return [
        {"image_id": "corrupt", "image_uri": f"{prefix}/bad/corrupt.dcm"},
        {"image_id": "text", "image_uri": f"{prefix}/bad/not_an_image.png"},
        {"image_id": "empty", "image_uri": f"{prefix}/bad/empty.dcm"},
        {"image_id": "gone", "image_uri": f"{prefix}/bad/never_uploaded.dcm"},
        {"image_id": "", "image_uri": f"{prefix}/bad/no_id.dcm"},  # invalid manifest row
        {"image_id": "badage", "image_uri": f"{prefix}/bad/x.dcm", "age": "old"},  # invalid manifest row
    ]


def test_ingest_from_s3_accounts_for_every_row(ray_local, s3_storage, bucket):
    prefix = f"s3://{bucket}/cxr"
    write_phantoms(PhantomConfig(n=24, size=64, formats=["dicom", "png"], seed=5), f"{prefix}/phantoms", s3_storage)
    fs, path = fsspec_filesystem(f"{prefix}/phantoms/manifest.csv", s3_storage)
    with fs.open(path, "rb") as f:  # the manifest read back through s3fs
        manifest = pd.read_csv(f, dtype=str)
    manifest = pd.concat([manifest, pd.DataFrame(_bad_rows(prefix, s3_storage))], ignore_index=True)
    write_bytes(f"{prefix}/manifest.csv", manifest.to_csv(index=False).encode(), s3_storage)

    job = JobConfig.model_validate({
        "output_uri": f"{prefix}/out", "storage": s3_storage.model_dump(),
        "data": {"manifest_uri": f"{prefix}/manifest.csv", "decode": {"size": 64}},
    })
    from cfgen.pipeline.ingest import ingest

    result = ingest(job)
    assert result.input_rows == 48 + 6
    assert result.ok_rows == 48
    assert result.error_rows == 6
    assert result.ok_rows + result.error_rows + result.filtered_out == result.input_rows

    # the errors table, read back through pyarrow's S3FileSystem, names each row and its reason
    pa_fs, errors_path = pyarrow_filesystem(result.errors_uri, s3_storage)
    errors = pq.read_table(errors_path, filesystem=pa_fs).to_pandas().set_index("image_uri")
    reason = lambda name: errors.loc[f"{prefix}/bad/{name}", "reason"]  # noqa: E731
    assert reason("never_uploaded.dcm").startswith("missing_object")
    assert reason("empty.dcm").startswith("empty_file")
    assert reason("not_an_image.png").startswith("not_an_image")
    assert errors.loc[f"{prefix}/bad/corrupt.dcm", "stage"] == "decode"
    assert "missing image_id" in reason("no_id.dcm")
    assert "age" in reason("x.dcm")
    assert set(errors["stage"]) == {"manifest", "read", "decode"}

    # decoded shards on S3: one row per input that reached decoding, prompts built with missing values left out
    pa_fs, decoded_path = pyarrow_filesystem(result.decoded_uri, s3_storage)
    decoded = pq.read_table(decoded_path, filesystem=pa_fs, columns=["image_id", "status", "prompt"]).to_pandas()
    assert len(decoded) == 48 + 4 and (decoded["status"] == "ok").sum() == 48
    assert decoded.loc[decoded.status == "ok", "prompt"].str.startswith("a chest x-ray").all()

    # a second run is a no-op that reports the same counts
    again = ingest(job)
    assert again == result


def test_training_rows_stream_with_the_split_filter(ray_local, tmp_path):
    write_phantoms(PhantomConfig(n=40, size=64, seed=2), str(tmp_path / "ph"))
    job = JobConfig.model_validate({"output_uri": str(tmp_path / "out"),
                                    "data": {"manifest_uri": str(tmp_path / "ph" / "manifest.parquet")}})
    from cfgen.pipeline.ingest import ingest, training_dataset

    result = ingest(job)
    splits = pd.read_parquet(tmp_path / "ph" / "manifest.parquet")["split"]
    batch = training_dataset(job, result.decoded_uri).take_batch(1000, batch_format="numpy")
    assert len(batch["prompt"]) == (splits == "train").sum()
    assert batch["image"].shape[1:] == (64, 64)
    assert set(batch) == {"image", "prompt"}


def test_decoded_files_keep_the_manifests_order(ray_local, tmp_path, monkeypatch):
    """Read in file-name order, the decoded rows are the manifest's rows in its order, even when the first
    block's decode finishes last: what makes the VAE's fit images, the latent cache and training the same on every
    ingest of the same data."""
    import time

    import cfgen.pipeline.data as data
    import cfgen.pipeline.ingest as ingest_module

    write_phantoms(PhantomConfig(n=96, size=64, seed=4), str(tmp_path / "ph"))
    decode_stage = data.DecodeStage
    order = pd.read_parquet(tmp_path / "ph" / "manifest.parquet")["image_id"].tolist()
    first_block = set(order[:6])

    def first_block_last(batch, data, storage):  # defined here, so Ray ships it by value
        if batch["image_id"][0].as_py() in first_block:
            time.sleep(3)
        return decode_stage(data, storage)(batch)

    small_blocks = data.manifest_dataset
    monkeypatch.setattr(ingest_module, "manifest_dataset", lambda rows: small_blocks(rows, rows_per_block=6))
    monkeypatch.setattr(data, "_decode_batch", first_block_last)  # what `decode_dataset` maps over the rows
    job = JobConfig.model_validate({"output_uri": str(tmp_path / "out"),
                                    "data": {"manifest_uri": str(tmp_path / "ph" / "manifest.parquet")}})
    decoded = ingest_module.ingest(job).decoded_uri
    files = sorted(p for p in fsspec_filesystem(decoded, job.storage)[0].ls(decoded) if p.endswith(".parquet"))
    ids = [i for f in files for i in pq.read_table(f, columns=["image_id"])["image_id"].to_pylist()]
    assert ids == order


def test_one_write_task_keeps_its_blocks_order_in_its_file(tmp_path):
    """A write task holding many blocks writes them in the order it got them (Ray's own Parquet writer, threaded
    without order, reordered 16 such blocks in 5 of 10 tries), and file names sort as the tasks were numbered."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    from ray.data._internal.execution.interfaces.task_context import TaskContext

    from cfgen.pipeline.ordered_parquet import OrderedParquetSink

    sink = OrderedParquetSink(str(tmp_path / "out"), pafs.LocalFileSystem())
    sink.on_write_start()
    noise = np.random.default_rng(0).random((6, 4096), dtype=np.float32)
    expected = []
    for task in (10, 9, 2):  # tasks finish in any order; their names, not their timing, set the order
        blocks = [pa.table({"i": np.arange(k * 6, k * 6 + 6) + 1000 * task, "pixels": list(noise)}) for k in range(24)]
        assert sink.write(blocks, TaskContext(task_idx=task, op_name="Write")) == 24 * 6
    for task in (2, 9, 10):
        expected += list(np.arange(24 * 6) + 1000 * task)
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == ["part-000002.parquet", "part-000009.parquet", "part-000010.parquet"]
    assert [i for f in files for i in pq.read_table(f)["i"].to_pylist()] == expected
    assert sink.write([pa.table({"i": np.arange(0)})], TaskContext(task_idx=11, op_name="Write")) == 0
    assert len(list((tmp_path / "out").iterdir())) == 3  # an empty task writes no file


def test_ingest_of_a_folder_mixing_good_and_truncated_files(ray_local, tmp_path):
    """Files cut short in transfer are error rows, each named in the errors table; the good ones decode."""
    from PIL import Image
    from pydicom.uid import JPEG2000Lossless
    from test_decode import make_dataset, to_bytes

    from cfgen.pipeline.ingest import ingest

    # noise, so that the pixels and not the header make up most of every file and each cut lands in the pixels
    ramp = np.random.default_rng(3).integers(0, 256, (64, 64)).astype(np.uint8)

    def saved(fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(ramp).save(buffer, format=fmt)
        return buffer.getvalue()

    j2k = make_dataset(ramp.astype(np.uint16) * 16, bits_stored=12)
    j2k.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    good = {"a.png": saved("PNG"), "b.jpg": saved("JPEG"), "c.dcm": to_bytes(make_dataset(ramp)), "d.dcm": to_bytes(j2k)}
    files = dict(good)
    for name, data in good.items():
        for fraction in (0.5, 0.9, 0.99):
            files[f"cut{int(fraction * 100)}_{name}"] = data[: int(len(data) * fraction)]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pd.DataFrame({"image_id": list(files), "image_uri": list(files)}).to_csv(tmp_path / "manifest.csv", index=False)
    job = JobConfig.model_validate({"output_uri": str(tmp_path / "out"),
                                    "data": {"manifest_uri": str(tmp_path / "manifest.csv"), "decode": {"size": 32}}})

    result = ingest(job)
    assert (result.input_rows, result.ok_rows, result.error_rows) == (16, 4, 12)
    assert result.ok_rows + result.error_rows == result.input_rows
    errors = pd.read_parquet(result.errors_uri).set_index("image_id")
    assert sorted(errors.index) == sorted(name for name in files if name.startswith("cut"))
    assert (errors["stage"] == "decode").all()
    assert errors["reason"].str.startswith("corrupt_pixel_data: ").all()


def test_every_ray_worker_of_a_job_gets_the_job_environment(ray_local):
    """Set once by `init_ray` for every process of the job: Arrow's system allocator (which hands freed pages
    back) and a small pool of Parquet footer readers (Ray Data's default of 32 processes per read was most of a
    small job's start-up)."""
    import ray

    from cfgen.pipeline.runtime import JOB_ENV

    @ray.remote(num_cpus=0.1)
    def seen():
        import os

        import pyarrow as pa

        return {k: os.environ.get(k) for k in [*JOB_ENV, "DS_ACCELERATOR"]}, pa.default_memory_pool().backend_name

    env, pool = ray.get(seen.remote())
    assert env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "1" and env["ARROW_DEFAULT_MEMORY_POOL"] == "system"
    assert env["HF_HUB_OFFLINE"] == "1" and env["DS_ACCELERATOR"] == "cpu"
    assert pool == "system"


def test_a_local_ray_gives_the_job_no_runtime_env_so_its_prestarted_workers_can_serve_it(ray_local):
    """The Ray `init_ray` starts inherits the job's environment, so the job has no runtime env of its own: with
    one, Ray could not hand the job any of the workers it prestarts (one per CPU), and every actor of a small job
    waited for a new process (bench/RESULTS.md, the generation job)."""
    import ray

    assert ray.get_runtime_context().runtime_env == {}
