"""Benchmark (not a test): decode + preprocess throughput of cfgen's Ray Data path against plain loops, and memory
while streaming, on phantom DICOMs in S3 (moto on loopback). Issue 3; results go to bench/RESULTS.md.

One run does everything, so that every figure comes from the same machine state:

1. start moto's S3 server in a child process and write `--n` phantom DICOMs plus their manifest to
   s3://cfgen-bench/phantoms with Ray tasks over shards (not timed);
2. time the same rows, the same bucket and the same output size through
   - the baseline: one process, one image at a time, through cfgen's own per-image calls (`read_bytes`, then
     `decode_and_preprocess`: rescale, VOI/window, MONOCHROME1 inversion, resize), so the pixel work is identical
     to the Ray path's;
   - a minimal loop (boto3 GET, `pydicom.dcmread`, pydicom's modality/VOI LUTs, numpy, PIL): what a hand-written
     script costs; its pixels are not cfgen's and are not compared;
   - cfgen's `DecodeStage` called in this process on batches (its I/O threads, no Ray): separates what threads buy
     from what processes buy;
   - the Ray Data path: `decode_dataset(manifest_dataset(rows))` consumed with `iter_batches`;
   - the whole `ingest` job (manifest read, decode, Parquet written to the bucket, errors table);
   and check that the baseline, DecodeStage and Ray Data produce the same number of ok images and the same pixels;
3. write `--stream-n` phantoms to a local temp folder (or, with `--stream-storage s3`, to the bucket: moto serves
   about 100 objects/s here, too slow for 100,000 in one sitting), time the baseline on the first tenth, then
   stream the first tenth and all of them through the Ray Data path, discarding batches, while a thread samples
   the RSS of the driver and of every Ray process and Ray's object store usage every 0.5 s.

No figure is asserted: this prints a table (plain and markdown) for bench/RESULTS.md.
Run from the repository root:  .venv/bin/python bench/bench_decode.py  (bench/README.md lists the options)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

# Dummy credentials and no metadata lookups, set before boto/s3fs are imported; Ray workers inherit them from the
# raylet, which inherits this process's environment. setdefault: a caller may point at real storage on purpose.
for _key, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)
for _key in ("NO_PROXY", "no_proxy"):
    os.environ[_key] = ",".join(filter(None, [os.environ.get(_key), "127.0.0.1,localhost"]))

from cfgen.config import DataConfig, DecodeConfig, JobConfig, PhantomConfig, RayConfig, StorageConfig  # noqa: E402
from cfgen.io.preprocess import decode_and_preprocess  # noqa: E402
from cfgen.io.storage import read_bytes  # noqa: E402
from cfgen.phantoms.writers import write_manifest, write_phantom_shard  # noqa: E402
from cfgen.pipeline.data import (  # noqa: E402
    DecodeStage,
    decode_dataset,
    load_manifest,
    manifest_dataset,
    tensor_column,
)
from cfgen.pipeline.ingest import ingest  # noqa: E402
from cfgen.pipeline.runtime import init_ray  # noqa: E402

BUCKET = "cfgen-bench"
MiB = 1 << 20
SHARD = 1000  # subjects per writing task: large enough to amortise a task, small enough to spread over workers
WARMUP_ROWS = 128  # each timed path first runs on this many rows, untimed: imports, clients, worker start-up


# ------------------------------------------------------------------------------------------------ storage
@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    """(endpoint, process id) of moto's S3 server in a child process, stopped on exit.

    A child process rather than moto's in-process thread: in-process, the server would share this process's GIL
    with the single-process baselines (but not with Ray's workers) and slow them down unfairly.
    """
    with socket.socket() as probe:  # a free port; the tiny race with other programs is acceptable for a benchmark
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # one log line per request otherwise
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start on 127.0.0.1:{port}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)


def create_bucket(storage: StorageConfig, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=storage.endpoint_url).create_bucket(Bucket=bucket)


def write_phantom_set(n: int, size: int, out_uri: str, storage: StorageConfig | None) -> float:
    """Write n phantom DICOMs and their manifest with one Ray task per shard; returns the seconds it took."""
    import ray

    start = time.perf_counter()
    config = PhantomConfig(n=n, size=size, formats=["dicom"])
    write_shard = ray.remote(num_cpus=1)(write_phantom_shard)
    shards = [write_shard.remote(config, out_uri, i, min(i + SHARD, n), storage) for i in range(0, n, SHARD)]
    rows = [row for shard_rows in ray.get(shards) for row in shard_rows]
    write_manifest(rows, out_uri, storage)
    return time.perf_counter() - start


def bench_job(storage: StorageConfig, phantoms_uri: str, out_size: int) -> JobConfig:
    """The job every path reads: cfgen's default data settings, except the decoded size."""
    return JobConfig(
        output_uri=f"s3://{BUCKET}/runs",
        storage=storage,
        data=DataConfig(manifest_uri=f"{phantoms_uri}/manifest.parquet", decode=DecodeConfig(size=out_size)),
    )


def manifest_rows(job: JobConfig) -> pd.DataFrame:
    rows, errors, n_input = load_manifest(job)
    if len(errors) or len(rows) != n_input:
        raise RuntimeError(f"manifest of {n_input} rows has {len(errors)} errors: {errors.head()}")
    return rows


# ------------------------------------------------------------------------------------------------ timed paths
@dataclass
class PathResult:
    """One way of decoding the same rows: how fast, and what came out (for the equality check)."""

    name: str
    images: int
    seconds: float
    ok: int
    pixel_sum: int | None  # sum over all ok images of all pixel values
    digests: dict[str, int] | None = None  # image_id -> CRC-32 of the image bytes, for an exact comparison
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def run_baseline(rows: pd.DataFrame, job: JobConfig) -> PathResult:
    """cfgen's per-image calls, one image after the other: what DecodeStage does for one row, minus its prompt,
    provenance JSON and Arrow batch (small next to a read and a decode)."""
    read_s = decode_s = 0.0
    pixel_sum, digests = 0, {}
    start = time.perf_counter()
    for image_id, uri in zip(rows["image_id"], rows["image_uri"]):
        t0 = time.perf_counter()
        data = read_bytes(uri, job.storage)
        t1 = time.perf_counter()
        image, _ = decode_and_preprocess(data, job.data.decode, uri=uri)
        decode_s += time.perf_counter() - t1
        read_s += t1 - t0
        pixel_sum += int(image.sum(dtype=np.int64))
        digests[image_id] = zlib.crc32(image.tobytes())
    seconds = time.perf_counter() - start
    return PathResult("baseline: 1 process, cfgen read_bytes + decode_and_preprocess", len(rows), seconds,
                      len(digests), pixel_sum, digests, {"read_s": read_s, "decode_s": decode_s})


def run_minimal(rows: pd.DataFrame, job: JobConfig) -> PathResult:
    """A hand-written loop: one GET, dcmread, modality LUT, VOI LUT/window, MONOCHROME1 inversion, resize, uint8.

    A cost reference only: it stretches each image's VOI output by its own min/max, so its pixels differ from cfgen's.
    """
    import boto3
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    client = boto3.client("s3", endpoint_url=job.storage.endpoint_url)
    size = job.data.decode.size
    ok, pixel_sum = 0, 0
    start = time.perf_counter()
    for uri in rows["image_uri"]:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        ds = pydicom.dcmread(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read()))
        values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
        low, high = float(values.min()), float(values.max())
        unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            unit = 1.0 - unit
        scale = size / max(unit.shape)
        shape = (max(1, round(unit.shape[1] * scale)), max(1, round(unit.shape[0] * scale)))
        resized = np.asarray(Image.fromarray(unit).resize(shape, Image.Resampling.BOX))
        image = np.zeros((size, size), np.uint8)
        image[: resized.shape[0], : resized.shape[1]] = np.rint(np.clip(resized, 0, 1) * 255).astype(np.uint8)
        ok += 1
        pixel_sum += int(image.sum(dtype=np.int64))
    return PathResult("minimal: 1 process, boto3 GET + pydicom + numpy/PIL", len(rows), time.perf_counter() - start,
                      ok, pixel_sum)


def _numpy_columns(batch) -> dict[str, np.ndarray]:
    """The columns `_tally` reads, from a numpy batch (iter_batches) or an Arrow table (DecodeStage's output)."""
    import pyarrow as pa

    if not isinstance(batch, pa.Table):
        return batch
    return {"image": tensor_column(batch, "image"),
            **{name: batch[name].to_numpy(zero_copy_only=False) for name in ("status", "image_id")}}


def _tally(batch, result: PathResult) -> None:
    batch = _numpy_columns(batch)
    ok = batch["status"] == "ok"
    images = batch["image"][ok]
    result.ok += int(ok.sum())
    result.pixel_sum += int(images.sum(dtype=np.int64))
    for image_id, image in zip(batch["image_id"][ok], images):
        result.digests[image_id] = zlib.crc32(image.tobytes())


def run_decode_stage(rows: pd.DataFrame, job: JobConfig, batch_size: int = 64) -> PathResult:
    """cfgen's DecodeStage in this process, batch by batch: its thread pool overlaps reads, no Ray involved."""
    stage = DecodeStage(job.data, job.storage)
    result = PathResult("DecodeStage in 1 process (8 I/O threads, no Ray)", len(rows), 0.0, 0, 0, {})
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        _tally(stage(rows.iloc[i : i + batch_size]), result)
    result.seconds = time.perf_counter() - start
    return result


def run_ray_data(rows: pd.DataFrame, job: JobConfig, consume: Callable[[dict], None] | None = None) -> PathResult:
    """cfgen's Ray Data path as ingest builds it (default batch size and CPUs per task), consumed by iter_batches."""
    result = PathResult("Ray Data: decode_dataset(manifest_dataset) + iter_batches", len(rows), 0.0, 0, 0, {})
    start = time.perf_counter()
    dataset = decode_dataset(manifest_dataset(rows), job.data, job.storage)
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        (consume or (lambda b: _tally(b, result)))(batch)
    result.seconds = time.perf_counter() - start
    return result


def run_ingest(job: JobConfig, output_uri: str) -> PathResult:
    """The full ingest job: manifest read and validation, decode, Parquet + errors table written to the bucket."""
    start = time.perf_counter()
    outcome = ingest(job, output_uri)
    seconds = time.perf_counter() - start
    return PathResult("ingest job (Ray Data, Parquet written to S3)", outcome.input_rows, seconds, outcome.ok_rows,
                      None)


def cpu_seconds() -> dict[int, float]:
    """CPU time (user + system) so far of this process, of the moto server and of every process Ray started, by pid.

    On 2 cores the paths compete with the storage server for the same CPUs: where the seconds go says more than
    the wall clock alone.
    """
    import psutil

    driver = psutil.Process()
    used = {}
    for proc in [driver, *driver.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            times = proc.cpu_times()
            used[proc.pid] = times.user + times.system
    return used


@contextlib.contextmanager
def cpu_spent(moto_pid: int) -> Iterator[dict[str, float]]:
    """A dict that, on exit, holds the CPU seconds spent inside the block by the driver, Ray and moto.

    Counted per process: Ray ends idle workers during a run, and a worker that exits takes its seconds with it
    (an undercount of Ray's share; summing totals instead would even go negative).
    """
    spent: dict[str, float] = {}
    before = cpu_seconds()
    yield spent
    delta = {pid: t - before.get(pid, 0.0) for pid, t in cpu_seconds().items()}
    driver = os.getpid()
    spent.update(cpu_driver=delta.get(driver, 0.0), cpu_moto=delta.get(moto_pid, 0.0),
                 cpu_ray=sum(t for pid, t in delta.items() if pid not in (driver, moto_pid)))


# ------------------------------------------------------------------------------------------------ memory
class MemorySampler:
    """Peak RSS of the driver, of Ray's worker processes and of everything Ray started, and peak object store use.

    Every process started by Ray is a descendant of the driver (ray.init starts GCS and raylet, the raylet starts
    workers); `exclude` keeps the moto server, also a child, out of the sums. RSS counts the object store's shared
    pages once in every process that maps them, so the total overstates physical memory; it is an upper bound.
    """

    def __init__(self, exclude: set[int], period_s: float = 0.5):
        import psutil
        import ray
        from ray._private.internal_api import memory_summary

        self.driver = psutil.Process()
        self.exclude, self.period_s = exclude, period_s
        # several Ray clusters may run on this machine (other jobs): ask ours by its address
        address = ray.get_runtime_context().gcs_address
        self._summary = lambda: memory_summary(address=address, stats_only=True)
        self.peak = {"driver_rss": 0, "ray_workers_rss": 0, "ray_workers": 0, "total_rss": 0, "object_store": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        driver = self.driver.memory_info().rss
        workers = others = n_workers = 0
        for proc in self.driver.children(recursive=True):
            if proc.pid in self.exclude:
                continue
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                rss = proc.memory_info().rss
                # workers retitle themselves "ray::IDLE", "ray::_decode_batch", ...; agents are "ray::...Agent"
                if proc.name().startswith("ray::") and not proc.name().endswith("Agent"):
                    workers += rss
                    n_workers += 1
                else:
                    others += rss
        match = re.search(r"Plasma memory usage (\d+) MiB", self._summary())
        store = int(match.group(1)) * MiB if match else 0
        for key, value in (("driver_rss", driver), ("ray_workers_rss", workers), ("ray_workers", n_workers),
                           ("total_rss", driver + workers + others), ("object_store", store)):
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period_s)

    def __enter__(self) -> "MemorySampler":
        self._sample()  # the resting state counts too
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def stream_memory(rows: pd.DataFrame, job: JobConfig, exclude: set[int]) -> tuple[dict[str, Any], PathResult]:
    """Stream rows through the Ray Data path, dropping each batch, and report peaks next to the data volume."""
    ok = [0]

    def discard(batch: dict[str, np.ndarray]) -> None:
        ok[0] += int((batch["status"] == "ok").sum())

    with MemorySampler(exclude) as sampler:
        result = run_ray_data(rows, job, consume=discard)
    result.ok, result.pixel_sum = ok[0], None  # batches are dropped unread: no pixel sum
    size = job.data.decode.size
    figures = {"n": len(rows), "ok": ok[0], "images_per_s": result.images_per_s,
               "decoded_bytes": len(rows) * size * size, **sampler.peak}
    return figures, result


# ------------------------------------------------------------------------------------------------ reporting
def machine_facts() -> dict[str, str]:
    import boto3
    import moto
    import psutil
    import pyarrow
    import pydicom
    import ray
    import s3fs

    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "os.cpu_count()": str(os.cpu_count()),
        "usable cores (sched_getaffinity)": str(len(os.sched_getaffinity(0))),
        "physical cores": str(psutil.cpu_count(logical=False)),
        "memory": f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB",
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": ", ".join(f"{m.__name__} {m.__version__}" for m in (ray, pydicom, s3fs, moto, boto3, pyarrow, np)),
    }


def throughput_table(results: list[PathResult], reference: PathResult) -> list[list[str]]:
    table = [["path", "images", "seconds", "images/s", "x baseline", "CPU s driver / Ray / moto", "ok",
              "pixel sum"]]
    for r in results:
        cpu = " / ".join(f"{r.notes[f'cpu_{k}']:.1f}" if f"cpu_{k}" in r.notes else "-"
                         for k in ("driver", "ray", "moto"))
        table.append([r.name, str(r.images), f"{r.seconds:.1f}", f"{r.images_per_s:.0f}",
                      f"{r.images_per_s / reference.images_per_s:.2f}", cpu, str(r.ok),
                      "-" if r.pixel_sum is None else str(r.pixel_sum)])
    return table


def memory_table(streams: list[dict[str, Any]]) -> list[list[str]]:
    table = [["stream", "images/s", "decoded data (N x size^2 B)", "peak driver RSS", "peak Ray workers RSS",
              "most Ray workers", "peak total RSS (driver + all Ray)", "peak object store"]]
    for s in streams:
        table.append([f"{s['n']} images ({s['ok']} ok)", f"{s['images_per_s']:.0f}", _mib(s["decoded_bytes"]),
                      _mib(s["driver_rss"]), _mib(s["ray_workers_rss"]), str(s["ray_workers"]),
                      _mib(s["total_rss"]), _mib(s["object_store"])])
    return table


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB" if n >= 10 * MiB else f"{n / MiB:.1f} MiB"


def markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def plain(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="phantoms for the throughput comparison")
    parser.add_argument("--stream-n", type=int, default=100_000, help="phantoms streamed for the memory figures")
    parser.add_argument("--size", type=int, default=64, help="phantom image size (pixels)")
    parser.add_argument("--out-size", type=int, default=64, help="decoded image size (pixels)")
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--skip-stream", action="store_true", help="throughput comparison only")
    parser.add_argument("--skip-ingest", action="store_true", help="do not time the full ingest job")
    parser.add_argument(
        "--stream-storage", choices=("local", "s3"), default="local",
        help="where the streamed phantoms live: a local temp folder (default: moto serves about 100 objects/s on "
             "2 cores, so 100,000 would take over half an hour to write and as long to read) or the moto bucket",
    )
    args = parser.parse_args(argv)
    if args.n < 1 or (not args.skip_stream and args.stream_n < 10):
        parser.error("--n must be at least 1 and --stream-n at least 10")
    return args


def _progress(result: PathResult) -> None:
    print(f"  {result.name}: {result.images} images, {result.images_per_s:.0f} images/s", flush=True)


def compare_throughput(args: argparse.Namespace, job: JobConfig, moto_pid: int) -> list[PathResult]:
    """Every path over the same manifest rows; baseline first, so that it is the reference of the ratios."""
    rows = manifest_rows(job)
    results = []
    for run in (run_baseline, run_minimal, run_decode_stage, run_ray_data):
        run(rows.head(WARMUP_ROWS), job)
        with cpu_spent(moto_pid) as cpu:
            results.append(run(rows, job))
        results[-1].notes.update(cpu)
        _progress(results[-1])
    if not args.skip_ingest:
        with cpu_spent(moto_pid) as cpu:
            results.append(run_ingest(job, f"s3://{BUCKET}/runs/ingest"))
        results[-1].notes.update(cpu)
        _progress(results[-1])
    return results


def _stream_label(args: argparse.Namespace) -> str:
    return "S3 (moto)" if args.stream_storage == "s3" else "local files"


def measure_streams(args: argparse.Namespace, storage: StorageConfig, moto_pid: int, folder: str):
    """(memory figures per stream, timed paths on the stream set, where the stream set lives)."""
    uri = f"s3://{BUCKET}/stream" if args.stream_storage == "s3" else folder
    seconds = write_phantom_set(args.stream_n, args.size, uri, storage)
    where = f"{args.stream_n} phantoms written to {uri} ({_stream_label(args)})"
    print(f"{where} in {seconds:.0f} s (not measured)", flush=True)
    job = bench_job(storage, uri, args.out_size)
    rows = manifest_rows(job)
    small = rows.head(args.stream_n // 10)
    # The baseline over the small stream's rows: the ratio again, where storage is not a Python server on 2 cores.
    run_baseline(small.head(WARMUP_ROWS), job)
    with cpu_spent(moto_pid) as cpu:
        results = [run_baseline(small, job)]
    results[0].notes.update(cpu)
    _progress(results[-1])
    streams = []
    for part in (small, rows):  # the small stream first: nothing the big one leaves behind can flatter it
        with cpu_spent(moto_pid) as cpu:
            figures, result = stream_memory(part, job, {moto_pid})
        result.notes.update(cpu)
        streams.append(figures)
        results.append(result)
        _progress(result)
    for result in results:
        result.name += f" [stream set, {_stream_label(args)}]"
    return streams, results, where


def report(args, facts, results: list[PathResult], stream_results: list[PathResult], streams, where: str) -> None:
    baseline, stage, ray_data = results[0], results[2], results[3]
    throughput = throughput_table(results, baseline)
    if stream_results:
        throughput += throughput_table(stream_results, stream_results[0])[1:]
    lines = [f"{key}: {value}" for key, value in facts.items()]
    lines += ["", f"Decode + preprocess of {args.n} phantom DICOMs ({args.size} px -> {args.out_size} px), "
                  f"Ray with {args.ray_cpus} logical CPUs; 'x baseline' is against the baseline on the same files:"]
    summary = [f"Ray Data / baseline, S3 (moto): {ray_data.images_per_s / baseline.images_per_s:.2f}x "
               f"({ray_data.images_per_s:.0f} vs {baseline.images_per_s:.0f} images/s)"]
    if stream_results:
        local_baseline, local_ray = stream_results[:2]
        summary.append(f"Ray Data / baseline, stream set, {_stream_label(args)} ({local_ray.images} images): "
                       f"{local_ray.images_per_s / local_baseline.images_per_s:.2f}x "
                       f"({local_ray.images_per_s:.0f} vs {local_baseline.images_per_s:.0f} images/s)")
    summary.append(f"baseline time split on S3: read_bytes {baseline.notes['read_s']:.1f} s, "
                   f"decode_and_preprocess {baseline.notes['decode_s']:.1f} s")
    for other in (stage, ray_data):
        same = other.ok == baseline.ok and other.digests == baseline.digests
        summary.append(f"same ok count ({other.ok} vs {baseline.ok}) and identical pixels (pixel sum {other.pixel_sum} "
                       f"vs {baseline.pixel_sum}, per-image CRC-32) as the baseline: {other.name}: "
                       f"{'yes' if same else 'NO'}")
    summary += [f"{r.name}: {r.ok} of {r.images} ok, EXPECTED ALL" for r in results[4:] if r.ok != r.images]

    print("\n== results ==")
    print("\n".join(lines))
    print(plain(throughput))
    print("\n".join(["", *summary]))
    if streams:
        print(f"\nStreaming memory ({where}; batches consumed and dropped):")
        print(plain(memory_table(streams)))
    print("\n== markdown ==\n")
    print("\n".join(f"- {line}" if line else "" for line in lines))
    print()
    print(markdown(throughput))
    print()
    print("\n".join(f"- {line}" for line in summary))
    if streams:
        print(f"\nStreaming memory ({where}; batches consumed and dropped):\n")
        print(markdown(memory_table(streams)))


def main(argv: list[str] | None = None) -> None:
    import tempfile

    import psutil
    import ray
    import ray.data

    args = parse_args(argv)
    facts = machine_facts()
    facts["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    print("\n".join(f"{key}: {value}" for key, value in facts.items()), flush=True)

    with moto_server() as (endpoint, moto_pid), tempfile.TemporaryDirectory(prefix="cfgen-bench-") as folder:
        storage = StorageConfig(endpoint_url=endpoint)
        create_bucket(storage, BUCKET)
        init_ray(RayConfig(num_cpus=args.ray_cpus))
        # the bars redraw from the driver a few times a second: noise in a log, and CPU taken from 2 cores
        ray.data.DataContext.get_current().enable_progress_bars = False

        phantoms_uri = f"s3://{BUCKET}/phantoms"
        seconds = write_phantom_set(args.n, args.size, phantoms_uri, storage)
        print(f"wrote {args.n} phantoms ({args.size} px) to {phantoms_uri} in {seconds:.0f} s (not measured)",
              flush=True)
        results = compare_throughput(args, bench_job(storage, phantoms_uri, args.out_size), moto_pid)
        streams, stream_results, where = [], [], ""
        if not args.skip_stream:
            streams, stream_results, where = measure_streams(args, storage, moto_pid, folder)
        facts["load average at end (1, 5, 15 min)"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        facts["moto server RSS at end"] = _mib(psutil.Process(moto_pid).memory_info().rss)
        ray.shutdown()

    report(args, facts, results, stream_results, streams, where)


if __name__ == "__main__":
    main()
