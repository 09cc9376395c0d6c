"""MLflow runs: one per job, params from the config (secrets masked), metrics, artifacts, registered models.

The tracking URI comes from the config: `sqlite:///…` on a laptop, `http://…` on a cluster. A relative sqlite path
is made absolute so Ray workers that chdir elsewhere still write to the same store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cfgen.config import JobConfig, TrackingConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def resolve_tracking_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def _mlflow(tracking: TrackingConfig):
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking.tracking_uri))
    return mlflow


def flatten_config(job: JobConfig) -> dict[str, str]:
    """Flat `section.key` params; SecretStr values are dumped masked by pydantic, never in clear."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = str(value)[:500]

    walk("", job.model_dump(mode="json"))
    return flat


def start_run(job: JobConfig, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create a run, log the whole config as params, return its id (runs are resumed by id, not left open)."""
    mlflow = _mlflow(job.tracking)
    mlflow.set_experiment(job.tracking.experiment)
    with mlflow.start_run(run_name=run_name, tags=tags or {}) as run:
        params = flatten_config(job)
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        return run.info.run_id


def log_metrics(tracking: TrackingConfig, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    logger = StepLogger(tracking, run_id)
    logger.log(metrics, step or 0)
    logger.flush()


def log_params(tracking: TrackingConfig, run_id: str, params: dict[str, Any]) -> None:
    mlflow = _mlflow(tracking)
    client = mlflow.tracking.MlflowClient()
    for k, v in params.items():
        client.log_param(run_id, k, str(v)[:500])


def log_artifacts(tracking: TrackingConfig, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
    _mlflow(tracking).tracking.MlflowClient().log_artifacts(run_id, local_dir, artifact_path)


def end_run(tracking: TrackingConfig, run_id: str, status: str = "FINISHED") -> None:
    _mlflow(tracking).tracking.MlflowClient().set_terminated(run_id, status)


def register_model(tracking: TrackingConfig, run_id: str, artifact_path: str, name: str | None = None) -> int:
    """Register the logged model folder as a version of `name` (the SD pipeline's registered name by default) and
    point the alias at it."""
    mlflow = _mlflow(tracking)
    client = mlflow.tracking.MlflowClient()
    name = name or tracking.registered_model
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    run = client.get_run(run_id)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id)
    client.set_registered_model_alias(name, tracking.alias, version.version)
    return int(version.version)


class StepLogger:
    """Buffers per-step metrics and flushes them in batches (one sqlite write per flush, not per step)."""

    def __init__(self, tracking: TrackingConfig, run_id: str, flush_every: int = 20):
        self.tracking, self.run_id, self.flush_every = tracking, run_id, flush_every
        self._buffer: list[tuple[dict[str, float], int]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._buffer.append((metrics, step))
        if len(self._buffer) >= self.flush_every:
            try:
                self.flush()
            except Exception as err:  # noqa: BLE001 - a tracking outage must not end a training run
                logging.getLogger("cfgen").warning("MLflow logging failed, metrics kept for the next flush: %s", err)

    def flush(self) -> None:
        import time

        if not self._buffer:
            return
        mlflow = _mlflow(self.tracking)
        now = int(time.time() * 1000)
        entries = [
            mlflow.entities.Metric(k, float(v), now, step) for metrics, step in self._buffer for k, v in metrics.items()
        ]
        mlflow.tracking.MlflowClient().log_batch(self.run_id, metrics=entries)
        self._buffer.clear()

    def __del__(self):
        try:
            self.flush()
        except Exception:
            pass


def download_model(tracking: TrackingConfig, model_uri: str, dst: str | None = None,
                   marker: str = "model_index.json") -> str:
    """Resolve `models:/name@alias` (or `models:/name/version`) to a local model folder (one holding `marker`:
    a diffusers pipeline by default)."""
    import hashlib
    import tempfile

    mlflow = _mlflow(tracking)
    client = mlflow.tracking.MlflowClient()
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    if ref:
        version = client.get_model_version_by_alias(name, ref)
    else:
        name, _, number = model_uri.removeprefix("models:/").partition("/")
        version = client.get_model_version(name, number)
    key = hashlib.sha256(f"{tracking.tracking_uri}|{name}|{version.version}".encode()).hexdigest()[:16]
    target = Path(dst or Path(tempfile.gettempdir()) / "cfgen-cache" / "registry" / key)
    folder = target / version.source.rstrip("/").rsplit("/", 1)[-1]
    if not (folder / marker).exists():
        target.mkdir(parents=True, exist_ok=True)
        return mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(target))
    return str(folder)
