"""The generation job under faults, on a real local Ray: exact counts, no duplicates, every failure a row.

A corrupt input, a model that raises on one image, an editing actor killed mid-job, and a driver killed mid-job
and rerun: each ends with planned = done + failed, each key held once, and the failures' reasons on record."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray.cloudpickle
import yaml

from cfgen.config import JobConfig, ModelConfig
from cfgen.pipeline import commit
from cfgen.pipeline.generate import CounterfactualStage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this module

ROOT = Path(__file__).resolve().parents[1]
POISON = "PH000003"  # the image the failing model raises on


class PoisonedStage(CounterfactualStage):
    """The real editing actor, except that its model raises on one image (a fault a real model can have)."""

    def _edit(self, meta, images, members, rule, seed, edits, keys, failure=None):
        if failure is None and POISON in [str(meta["image_id"][i]) for i in members]:
            raise RuntimeError(f"CUDA error: an illegal memory access was encountered (image {POISON})")
        return super()._edit(meta, images, members, rule, seed, edits, keys, failure)


def _config(root: Path, n: int = 10, **edit) -> dict:
    return {
        "output_uri": str(root / "run"),
        "phantoms": {"n": n, "size": 64, "seed": 5, "formats": ["dicom"], "split_fractions": {"test": 1.0}},
        "data": {"manifest_uri": str(root / "ph" / "manifest.parquet"), "decode": {"size": 64}},
        "model": {"pretrained": str(root / "sd")},
        "edit": {"method": "ddpm", "num_inference_steps": 2, "batch_size": 2, "cpus_per_actor": 0.5,
                 "edits": [{"support_devices": 0}, {"smoking": 1}], **edit},
        "metrics": {"enabled": False},
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db"},
        "ray": {"num_cpus": 4},
    }


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory, ray_local):
    """Ten phantoms (one overwritten with garbage), ingested, and a tiny untrained model saved as diffusers."""
    from cfgen.models.sd import build_tiny_pipeline, save_pipeline
    from cfgen.pipeline.ingest import ingest
    from cfgen.pipeline.workflows import run_phantoms

    root = tmp_path_factory.mktemp("gen")
    job = JobConfig.model_validate(_config(root))
    run_phantoms(job, str(root / "ph"))
    (root / "ph" / "images" / "PH000007.dcm").write_bytes(b"DICM" + b"\x00" * 64)  # corrupt
    decoded = ingest(job).decoded_uri
    save_pipeline(build_tiny_pipeline(ModelConfig(), seed=0), str(root / "sd"))
    return root, decoded


def _job(root: Path, out: str, **edit) -> JobConfig:
    cfg = _config(root, **edit)
    cfg["output_uri"] = str(root / out)
    return JobConfig.model_validate(cfg)


def _check_exact(out: Path, planned: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    summary = json.loads((out / "generate" / "summary.json").read_text())
    results = pd.read_parquet(out / "generate" / "results")
    failures = pd.read_parquet(out / "generate" / "failures") if (out / "generate" / "failures").exists() \
        else pd.DataFrame(columns=["key"])
    assert summary["planned"] == planned == summary["done"] + summary["failed"]
    assert results["key"].is_unique and failures["key"].is_unique  # no row twice
    assert set(results["key"]).isdisjoint(failures["key"])
    assert len(results) == summary["done"] and len(failures) == summary["failed"]
    keys = pd.read_parquet(out / "generate" / "plan" / "keys.parquet")
    assert set(keys["key"]) == set(results["key"]) | set(failures["key"])
    pngs = [p for p in (out / "generate" / "images").rglob("*.png") if "__factual" not in p.name]
    assert len(pngs) == len(results)  # one counterfactual image per key, none twice
    return results, failures


def test_a_corrupt_input_and_a_failing_image_become_failure_rows_and_the_rest_finishes(phantom_set):
    from cfgen.pipeline.workflows import run_generate

    root, decoded = phantom_set
    job = _job(root, "faults")
    out = run_generate(job, decoded_uri=decoded, editor=PoisonedStage)
    assert (out.planned, out.done, out.failed) == (20, 16, 4)
    results, failures = _check_exact(root / "faults", 20)
    by_image = failures.set_index("key").groupby("image_id")
    assert set(failures["image_id"]) == {"PH000007", POISON}
    corrupt = failures[failures.image_id == "PH000007"]
    assert (corrupt["stage"] == "input").all() and corrupt["reason"].str.contains("decode").all()
    poisoned = failures[failures.image_id == POISON]
    assert (poisoned["stage"] == "edit").all() and poisoned["reason"].str.contains("illegal memory").all()
    assert by_image.size().to_dict() == {"PH000007": 2, POISON: 2}
    assert results["counterfactual_prompt"].notna().all() and (results["method"] == "ddpm").all()

    again = run_generate(job, decoded_uri=decoded)  # a failure is final: nothing is redone
    assert (again.rows_written, again.done, again.failed) == (0, 16, 4)
    retried = run_generate(job.model_copy(update={"edit": job.edit.model_copy(update={"retry_failed": True})}),
                           decoded_uri=decoded)  # the healthy model now: the poisoned image's keys get done
    assert (retried.rows_written, retried.done, retried.failed) == (2, 18, 2)
    _check_exact(root / "faults", 20)


def test_a_rerun_with_other_edit_settings_is_new_work_beside_the_first_rows(phantom_set):
    """A key names the method's pixel settings, not only its name: a rerun into the same output with another
    setting edits again (it used to find every key done and leave the first setting's counterfactuals as the
    answer), while another batch size or actor count is the same work. The report reads one plan's rows."""
    from cfgen.pipeline.generate import generate
    from cfgen.report.html import read_results

    root, decoded = phantom_set
    job = _job(root, "settings", limit=3)
    first = generate(job, str(root / "sd"), decoded)
    assert first.planned == 6 and first.done + first.failed == 6 and first.done >= 4
    scaled = _job(root, "settings", limit=3, batch_size=1, num_actors=2)
    assert generate(scaled, str(root / "sd"), decoded).rows_written == 0  # scale-out changes no pixel
    stronger = _job(root, "settings", limit=3, edit_guidance=2.0)
    second = generate(stronger, str(root / "sd"), decoded)
    assert (second.planned, second.rows_written, second.done) == (6, first.done, first.done)
    both = read_results(second.results_uri, stronger)
    assert len(both) == 2 * first.done and both["key"].is_unique
    assert both.groupby("method_signature").size().tolist() == [first.done] * 2  # each row says its setting
    mine = read_results(second.results_uri, stronger, second.keys_uri)
    planned = set(pd.read_parquet(second.keys_uri)["key"])
    assert len(mine) == second.done and set(mine["key"]) <= planned
    assert set(mine["image_id"]) == set(read_results(first.results_uri, job, first.keys_uri)["image_id"])


@pytest.mark.parametrize("stages, actor", [("fused", "FusedStage"), ("separate", "CounterfactualStage")])
def test_an_editing_actor_killed_mid_job_is_replaced_and_the_counts_are_exact(phantom_set, stages, actor):
    import psutil
    import ray

    from cfgen.pipeline.generate import generate

    root, decoded = phantom_set
    out_name = f"actor-kill-{stages}"
    job = _job(root, out_name, batch_size=1, stages=stages)
    results_dir = root / out_name / "generate" / "results"
    killed = []

    def kill_when_first_part_lands():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if results_dir.exists() and any(results_dir.glob("part-*.parquet")):
                for proc in psutil.process_iter(["cmdline"]):  # Ray titles an actor's process ray::<class>
                    title = " ".join(proc.info["cmdline"] or [])
                    if title.startswith("ray::") and actor in title:
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_when_first_part_lands, daemon=True)
    watcher.start()
    out = generate(job, str(root / "sd"), decoded)
    watcher.join(5)
    assert killed, "the editing actor was never killed: the test proved nothing"
    assert ray.is_initialized()
    assert (out.planned, out.done + out.failed) == (20, 20) and out.failed == 2  # only the corrupt input
    _check_exact(root / out_name, 20)


def test_a_driver_killed_mid_job_resumes_on_rerun_with_exact_counts(phantom_set):
    root, _ = phantom_set
    cfg = _config(root, batch_size=1, num_inference_steps=40)  # slow enough to be caught halfway
    cfg["output_uri"] = str(root / "driver-kill")
    cfg["data"]["manifest_uri"] = str(root / "ph" / "manifest.parquet")
    config = root / "driver-kill.yaml"
    config.write_text(yaml.safe_dump(cfg))
    results_dir = root / "driver-kill" / "generate" / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, str(ROOT / "jobs" / "generate.py"), "--config", str(config)]
    first = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if results_dir.exists() and any(results_dir.glob("part-*.parquet")):
                break
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    committed_before = len(commit.committed_keys(str(results_dir)))
    assert 0 < committed_before < 18
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((root / "driver-kill" / "generate" / "summary.json").read_text())
    # a worker of the killed run may still commit a whole part after the count above: never fewer, never all
    assert committed_before <= summary["done_before"] < 18
    assert summary["written_this_run"] == 18 - summary["done_before"]
    assert "keys done" in rerun.stderr  # the progress line
    _check_exact(root / "driver-kill", 20)


def test_end_to_end_on_a_real_s3_server_dicoms_in_parquet_pngs_and_dicoms_out(tmp_path, ray_local, s3_server,
                                                                                bucket):
    """Phantom DICOMs on S3 (moto's server on 127.0.0.1) -> ingest -> generate -> Parquet, PNGs and derived
    DICOMs written back to S3, read again with s3fs and pyarrow."""
    import io

    import pydicom

    from cfgen.io.storage import fsspec_filesystem, read_bytes
    from cfgen.models.sd import build_tiny_pipeline, save_pipeline
    from cfgen.pipeline.ingest import ingest
    from cfgen.pipeline.workflows import run_generate, run_phantoms

    save_pipeline(build_tiny_pipeline(ModelConfig(), seed=0), str(tmp_path / "sd"))
    cfg = _config(tmp_path, n=4)
    cfg.update(output_uri=f"s3://{bucket}/run", storage={"endpoint_url": s3_server})
    cfg["data"]["manifest_uri"] = f"s3://{bucket}/ph/manifest.parquet"
    cfg["edit"]["output"] = {"dicom": True, "pseudonym": "S3-PSEUDO"}
    job = JobConfig.model_validate(cfg)
    run_phantoms(job, f"s3://{bucket}/ph")
    decoded = ingest(job).decoded_uri
    assert decoded.startswith("s3://")
    out = run_generate(job, decoded_uri=decoded)
    assert (out.planned, out.done, out.failed) == (8, 8, 0)
    fs, _ = fsspec_filesystem(f"s3://{bucket}/run", job.storage)
    results = commit.read_parts(f"s3://{bucket}/run/generate/results", job.storage).to_pandas()
    assert len(results) == 8 and results["key"].is_unique
    assert results["counterfactual_uri"].str.startswith(f"s3://{bucket}/run/generate/images/").all()
    assert len(fs.glob(f"{bucket}/run/generate/images/*/*.png")) == 8 + 4  # counterfactuals + factuals
    dicom = pydicom.dcmread(io.BytesIO(read_bytes(results["dicom_uri"].iloc[0], job.storage)))
    assert dicom.PatientID == "S3-PSEUDO" and "SourceImageSequence" in dicom
    summary = json.loads(read_bytes(f"s3://{bucket}/run/generate/summary.json", job.storage))
    assert summary["planned"] == summary["done"] == 8
    again = run_generate(job, decoded_uri=decoded)  # resumes from the parts on S3: nothing redone
    assert again.rows_written == 0 and again.done == 8


def test_the_fused_and_the_separate_stage_layouts_write_the_same_rows_and_images(phantom_set):
    """`edit.stages`: one actor pool doing edit -> measure -> commit (the CPU default) and three pools (the GPU
    layout) must be the same job: the same keys, the same counterfactual pixels, the same failures."""
    from cfgen.pipeline.generate import generate

    root, decoded = phantom_set
    tables = {}
    for stages in ("fused", "separate"):
        out = generate(_job(root, f"layout-{stages}", stages=stages), str(root / "sd"), decoded)
        assert (out.planned, out.done, out.failed) == (20, 18, 2)
        results, failures = _check_exact(root / f"layout-{stages}", 20)
        assert out.summary["stages"] == stages
        pngs = {p.name: p.read_bytes() for p in (root / f"layout-{stages}" / "generate" / "images").rglob("*.png")}
        tables[stages] = (results.sort_values("key").reset_index(drop=True), sorted(failures["key"]), pngs)
    fused, separate = tables["fused"], tables["separate"]
    assert list(fused[0]["key"]) == list(separate[0]["key"]) and fused[1] == separate[1]
    assert fused[2].keys() == separate[2].keys() and len(fused[2]) == 18 + 9  # counterfactuals + factual images
    assert all(fused[2][name] == separate[2][name] for name in fused[2])  # byte for byte
    for column in ("counterfactual_prompt", "edit_applied", "unet_evaluations"):
        assert list(fused[0][column]) == list(separate[0][column])


def test_padded_batches_give_an_image_the_same_counterfactual_whatever_else_the_job_edits(phantom_set):
    """`edit.pad_batches`: the three images a limited run edits come out byte for byte as in a run over all of
    them, where they shared batches (and rule groups) with other images."""
    from cfgen.pipeline.generate import generate

    root, decoded = phantom_set
    pngs = {}
    for name, limit in (("pad-all", None), ("pad-three", 3)):
        job = _job(root, name, batch_size=4, pad_batches=True, num_inference_steps=4, limit=limit)
        out = generate(job, str(root / "sd"), decoded)
        assert out.failed <= 2 and out.done >= 4
        images = root / name / "generate" / "images"
        pngs[name] = {p.name: p.read_bytes() for p in images.rglob("*.png") if "__factual" not in p.name}
    assert 4 <= len(pngs["pad-three"]) <= 6 and set(pngs["pad-three"]) < set(pngs["pad-all"])
    assert all(pngs["pad-three"][name] == pngs["pad-all"][name] for name in pngs["pad-three"])
