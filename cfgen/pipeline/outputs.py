"""What an output folder already holds, for the jobs that run after the one that made it.

`make demo` leaves its phantoms, its fine-tuned model and its attribute classifier in `<output_uri>/`. A later job
with the same config (`cfgen generate`, `cfgen discover`, Serve) uses them where the config names nothing else, so
that it edits the demo's images with the demo's model and chooses among a sweep's candidates with the demo's
classifier, as the demo itself did. A config that names its own data or models is never overridden.
"""

from __future__ import annotations

import json
import logging

from cfgen.config import JobConfig
from cfgen.io.storage import exists, join_uri, read_bytes

log = logging.getLogger("cfgen")


def phantoms_uri(job: JobConfig) -> str:
    return join_uri(job.output_uri, "phantoms")


def trained_model_uri(job: JobConfig) -> str:
    return join_uri(job.output_uri, "models", "finetuned")


def trained_model_marker(job: JobConfig) -> str:
    """Written by `cfgen train` when the model is finished: its summary and the settings it was trained with."""
    return join_uri(job.output_uri, "models", "finetuned.json")


def trained_classifier_uri(job: JobConfig) -> str:
    return join_uri(job.output_uri, "models", "classifier")


def trained_classifier_marker(job: JobConfig) -> str:
    """Written by `cfgen classify` when the classifier is saved and registered."""
    return join_uri(trained_classifier_uri(job), "registered.json")


def with_output_phantoms(job: JobConfig) -> JobConfig:
    """A job without `data.manifest_uri` reads the phantom data set its output folder holds. Without this,
    `cfgen generate --config configs/demo.yaml` after `make demo` stopped at the demo's ingest, whose recorded
    settings name that manifest."""
    if job.data.manifest_uri:
        return job
    manifest = join_uri(phantoms_uri(job), "manifest.parquet")
    if not exists(manifest, job.storage):
        return job
    log.info("data.manifest_uri is not set: reading the phantoms this output holds, %s", manifest)
    job = job.model_copy(deep=True)
    job.data.manifest_uri = manifest
    return job


def model_to_edit(job: JobConfig) -> str | None:
    """The model an editing job uses (None: none). The model this output folder fine-tuned where the config is the
    one it was trained with: there `model.pretrained` names the base training started from (as in
    `configs/phantom-bench-v2.yaml`), and editing with that base would edit with an untrained UNet. Else
    `model.pretrained`, a model named to edit with (`models:/cfgen-sd@champion`); else the output's own model."""
    trained = trained_model_uri(job)
    if not exists(join_uri(trained, "model_index.json"), job.storage):
        return job.model.pretrained
    if not job.model.pretrained:
        return trained
    marker = trained_model_marker(job)
    if not exists(marker, job.storage):
        return job.model.pretrained
    recorded = json.loads(read_bytes(marker, job.storage)).get("settings")
    if recorded and recorded.get("model", {}).get("pretrained") == job.model.pretrained:
        log.info("editing with the model this output fine-tuned from model.pretrained, %s", trained)
        return trained
    if not recorded:
        log.warning("%s holds a fine-tuned model written before cfgen recorded what it was trained from: editing "
                    "with model.pretrained as named, %s (set model.pretrained=%s to edit with the fine-tuned one)",
                    job.output_uri, job.model.pretrained, trained)
    return job.model.pretrained


def classifier_to_use(job: JobConfig) -> str | None:
    """`classifier.pretrained`, else the attribute classifier this output folder trained (None: neither)."""
    if job.classifier.pretrained:
        return job.classifier.pretrained
    return trained_classifier_uri(job) if exists(trained_classifier_marker(job), job.storage) else None


def required_model_to_edit(job: JobConfig, what: str) -> str:
    """`model_to_edit`, or an error that says how to name or make one (`what`: the job, for the message)."""
    model = model_to_edit(job)
    if not model:
        raise ValueError(f"no model to {what} with: set model.pretrained (a diffusers folder, s3:// or models:/ URI) "
                         f"or train one into {job.output_uri} first (cfgen train)")
    return model


def with_output_models(job: JobConfig) -> JobConfig:
    """The editing jobs' config with `classifier.pretrained` filled from the output folder where it is unset, so
    that every part of the job (the sweep's chooser, its generation keys, the metrics) names the same classifier."""
    classifier = classifier_to_use(job)
    if classifier == job.classifier.pretrained:
        return job
    log.info("classifier.pretrained is not set: using the classifier this output trained, %s", classifier)
    job = job.model_copy(deep=True)
    job.classifier.pretrained = classifier
    return job
