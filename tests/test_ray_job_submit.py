"""`ray job submit -- python jobs/generate.py --config …` against a real Ray head on 127.0.0.1.

The head is started with `ray start --head` (dashboard on loopback), the job is submitted with Ray's job CLI, the
test waits for SUCCEEDED and checks the outputs; a bad config must end FAILED with the reason in the job's logs.
The head is stopped at the end whatever happens."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports: every socket stays bound until all are chosen (one at a time, the kernel
    may hand the same port out twice, and Ray then refuses to start: seen once in a fresh clone's `make test`)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray(*args, env, timeout=120, check=True):
    out = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    return out


@pytest.fixture
def head():
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    port, dashboard, *agent = _free_ports(6)
    # token auth off for this loopback-only head (the job CLI would otherwise need the token the head generates)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS")
    _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=3", "--disable-usage-stats",
         # the session's own local Ray (ray_local) holds the agents' default ports: a second agent that cannot bind
         # them never registers, and the head answers every submission with "No available agent"
         f"--dashboard-agent-listen-port={agent[0]}", f"--dashboard-agent-grpc-port={agent[1]}",
         f"--metrics-export-port={agent[2]}", f"--runtime-env-agent-port={agent[3]}",
         f"--temp-dir={temp}", env=env, timeout=180)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the job server answers once the dashboard is up
            if _ray("job", "list", "--address", address, env=env, check=False, timeout=60).returncode == 0:
                break
            time.sleep(2)
        yield address, env
    finally:
        _stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_head(temp: str) -> None:
    """Kill this head's processes only (`ray stop` would take the session's own local Ray down with it)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except psutil.Error:
            continue
    for p in list(procs):
        try:
            procs.extend(c for c in p.children(recursive=True) if c not in procs)
        except psutil.Error:
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


def _submit(address, env, config: Path) -> str:
    command = ["job", "submit", "--address", address, "--no-wait", "--", str(sys.executable),
               str(ROOT / "jobs" / "generate.py"), "--config", str(config)]
    for _ in range(30):  # the job agent starts a little after the dashboard answers
        out = _ray(*command, env=env, check=False)
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout + out.stderr
    marker = "raysubmit_"
    start = text.index(marker)
    return text[start:].split()[0].strip("'\".,")


def _wait(address, env, job_id, timeout=600) -> str:
    deadline = time.time() + timeout
    status = ""
    while time.time() < deadline:
        out = _ray("job", "status", "--address", address, job_id, env=env, check=False)
        status = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # the CLI colours its words
        # a finished job reads "Job '<id>' succeeded" (or failed, stopped); a live one "Status for job …: RUNNING"
        final = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)|: (SUCCEEDED|FAILED|STOPPED)\b", status)
        if final:
            return (final.group(1) or final.group(2)).upper()
        time.sleep(3)
    _ray("job", "stop", "--address", address, job_id, env=env, check=False)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {status}")


def test_generate_job_submitted_to_a_ray_head_succeeds_and_a_bad_config_fails_clearly(head, tmp_path, ray_local):
    from cfgen.config import JobConfig, ModelConfig
    from cfgen.models.sd import build_tiny_pipeline, save_pipeline
    from cfgen.pipeline.workflows import run_phantoms

    address, env = head
    config = {
        "output_uri": str(tmp_path / "run"),
        "phantoms": {"n": 6, "size": 64, "seed": 2, "formats": ["dicom"], "split_fractions": {"test": 1.0}},
        "data": {"manifest_uri": str(tmp_path / "ph" / "manifest.parquet"), "decode": {"size": 64}},
        "model": {"pretrained": str(tmp_path / "sd")},
        "edit": {"method": "ddpm", "num_inference_steps": 2, "batch_size": 3, "edits": [{"smoking": 1}],
                 "output": {"dicom": True, "pseudonym": "STUDY-042"}},
        "metrics": {"enabled": False},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    run_phantoms(JobConfig.model_validate(config), str(tmp_path / "ph"))
    save_pipeline(build_tiny_pipeline(ModelConfig(), seed=0), str(tmp_path / "sd"))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config))
    job_id = _submit(address, env, good)
    status = _wait(address, env, job_id)
    logs = _ray("job", "logs", "--address", address, job_id, env=env, check=False).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "keys done" in logs  # the progress line reached the job's logs
    summary = json.loads((tmp_path / "run" / "generate" / "summary.json").read_text())
    assert (summary["planned"], summary["done"], summary["failed"]) == (6, 6, 0)
    results = pd.read_parquet(tmp_path / "run" / "generate" / "results")
    assert len(results) == 6 and results["dicom_uri"].notna().all()
    import pydicom

    first = pydicom.dcmread(results["dicom_uri"].iloc[0])
    assert first.PatientID == "STUDY-042" and list(first.ImageType)[0] == "DERIVED"

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config, "edit": {**config["edit"], "edits": [{"smoking": 7}]}}))
    job_id = _submit(address, env, bad)
    assert _wait(address, env, job_id, timeout=300) == "FAILED"
    logs = _ray("job", "logs", "--address", address, job_id, env=env, check=False).stdout
    assert "smoking=7" in logs and "0 or 1" in logs
