"""The classify job: train the attribute classifier on the decoded rows, calibrate it, evaluate it, register it.

decoded rows (train split) -> Ray Train (DDP) -> temperatures on the validate split -> AUROC with bootstrap CIs and
age MAE on the test split -> `<output>/models/classifier/` (config, weights, evaluation.json) -> MLflow run and
`models:/cfgen-classifier@champion`. Idempotent: a finished classifier folder is reused; `classifier.pretrained`
skips training and only loads.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from cfgen.config import JobConfig
from cfgen.io.storage import exists, read_bytes
from cfgen.pipeline.outputs import trained_classifier_marker, trained_classifier_uri

log = logging.getLogger("cfgen")

EVALUATION_FILE = "evaluation.json"


def _check_columns(job: JobConfig, decoded_uri: str) -> None:
    import pyarrow.dataset as pds

    from cfgen.io.storage import pyarrow_filesystem

    fs, path = pyarrow_filesystem(decoded_uri, job.storage)
    names = set(pds.dataset(path, filesystem=fs, format="parquet").schema.names)
    absent = [a for a in job.classifier.attributes if a not in names]
    if absent:
        raise ValueError(f"the data set at {decoded_uri} has no column for classifier attributes {absent}: remove "
                         "them from classifier.attributes or use a manifest that labels them")


def split_arrays(job: JobConfig, decoded_uri: str, split: str, with_images: bool = True,
                 extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Images (optionally), label columns and `extra` columns of one split's ok rows, streamed into numpy
    (uint8 images stay small)."""
    from cfgen.pipeline.ingest import decoded_rows

    columns = list(dict.fromkeys([*job.classifier.attributes, *(["image"] if with_images else []), "image_id",
                                  *extra]))
    ds = decoded_rows(job, decoded_uri, [split], columns=columns)
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        for c in columns:
            parts[c].append(batch[c])
    return {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in parts.items()}


def _count(arrays: dict[str, np.ndarray]) -> int:
    return len(arrays["image_id"])


def train_and_evaluate(job: JobConfig, decoded_uri: str) -> tuple[Any, dict[str, Any]]:
    """Fit, calibrate and evaluate; returns the calibrated model and its evaluation (the JSON written beside it)."""
    from cfgen.classify.calibrate import calibrate
    from cfgen.classify.evaluate import evaluate
    from cfgen.classify.labels import label_targets, uncertain_policy
    from cfgen.classify.train import fit_classifier
    from cfgen.pipeline.ingest import decoded_rows
    from cfgen.train.trainer import storage_path_for

    cfg = job.classifier
    _check_columns(job, decoded_uri)
    policy = uncertain_policy(cfg, job.data.prompt)
    labels = split_arrays(job, decoded_uri, "train", with_images=False)
    train_ds = decoded_rows(job, decoded_uri, ["train"], columns=["image", *cfg.attributes])
    pixel_bytes = 2 if job.data.decode.dtype == "uint16" else 1
    if _count(labels) * job.data.decode.size**2 * pixel_bytes <= cfg.train.materialize_max_mb * 2**20:
        train_ds = train_ds.materialize()  # read once; each epoch then splits blocks already in memory
    storage_path, storage_fs = storage_path_for(job)
    started = time.time()
    model, stats = fit_classifier(job, train_ds, labels, _count(labels), storage_path, storage_fs)
    train_seconds = time.time() - started

    validate = split_arrays(job, decoded_uri, "validate")
    if _count(validate) == 0:
        raise ValueError("no validate images to calibrate the classifier on: set data.split_fractions or use a "
                         "manifest with a validate split")
    v_targets, v_known = label_targets(validate, cfg.attributes, policy)
    calibration = calibrate(model, validate["image"], v_targets, v_known)

    test = split_arrays(job, decoded_uri, "test")
    if _count(test) == 0:
        raise ValueError("no test images to evaluate the classifier on: the data set needs a test split")
    t_targets, t_known = label_targets(test, cfg.attributes, policy)
    predictions = model.predict(test["image"])
    held_out = evaluate(predictions, t_targets, t_known, cfg.attributes, cfg.bootstrap, seed=cfg.train.seed)
    evaluation = {
        "attributes": held_out,
        "calibration": calibration,
        "label_statistics": stats["attributes"],
        "decorrelation": stats["decorrelation"],
        "uncertain_policy": policy,
        "n_train": _count(labels), "n_validate": _count(validate), "n_test": _count(test),
        "train_seconds": train_seconds, "final_loss": stats["final_loss"],
        "architecture": cfg.architecture, "feature_dim": model.feature_dim,
    }
    return model, evaluation


def run_classify(job: JobConfig, decoded_uri: str | None = None) -> dict[str, Any]:
    """The classify job; returns {"classifier_uri", "evaluation", "run_id", "model_version"}."""
    from cfgen.classify.store import load_classifier, save_classifier
    from cfgen.tracking import runs

    cfg = job.classifier
    if cfg.pretrained:
        load_classifier(cfg.pretrained, job.storage, job.tracking, architecture=cfg.architecture)  # fails early
        return {"classifier_uri": cfg.pretrained, "evaluation": _stored_evaluation(job, cfg.pretrained),
                "reused": True}
    out, marker = trained_classifier_uri(job), trained_classifier_marker(job)
    if exists(marker, job.storage):
        return json.loads(read_bytes(marker, job.storage))
    if decoded_uri is None:
        from cfgen.pipeline.workflows import run_ingest

        decoded_uri = run_ingest(job).decoded_uri
    run_id = runs.start_run(job, cfg.train.run_name, tags={"cfgen.job": "classify"})
    try:
        model, evaluation = train_and_evaluate(job, decoded_uri)
    except BaseException:
        runs.end_run(job.tracking, run_id, "FAILED")
        raise
    save_classifier(model, out, job.storage, extra={EVALUATION_FILE: evaluation})
    runs.log_metrics(job.tracking, run_id, flat_metrics(evaluation))
    version = None
    if "://" not in out:
        runs.log_artifacts(job.tracking, run_id, out, "classifier")
        version = runs.register_model(job.tracking, run_id, "classifier", name=cfg.registered_model)
    runs.end_run(job.tracking, run_id)
    summary = {"classifier_uri": out, "evaluation": evaluation, "run_id": run_id, "model_version": version,
               "registered": f"models:/{cfg.registered_model}@{job.tracking.alias}" if version else None}
    from cfgen.io.storage import write_bytes

    write_bytes(marker, json.dumps(summary, default=float).encode(), job.storage)
    log.info("classifier: %s", {a: v.get("auroc", v.get("mae_years")) for a, v in evaluation["attributes"].items()})
    return summary


def flat_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    flat = {}
    for name, values in evaluation["attributes"].items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                flat[f"{name}.{key}"] = float(value)
    for name, values in evaluation["calibration"].items():
        flat[f"{name}.temperature"] = values["temperature"]
        flat[f"{name}.ece_after"] = values["ece_after"]
    flat["train_seconds"] = evaluation["train_seconds"]
    return flat


def _stored_evaluation(job: JobConfig, uri: str) -> dict[str, Any] | None:
    from pathlib import Path

    from cfgen.classify.store import resolve_classifier_uri

    path = Path(resolve_classifier_uri(uri, job.storage, job.tracking), EVALUATION_FILE)
    return json.loads(path.read_text()) if path.exists() else None
