"""The jobs of cfgen as functions: phantoms, ingest, train, generate, and the demo that chains them.

`jobs/*.py`, the `cfgen` CLI, the benchmarks and the tests call these and nothing else, so every entry point runs
the same code. Each step is idempotent and reuses what an earlier run of the same output already finished.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from cfgen.config import JobConfig, PhantomConfig
from cfgen.io.storage import exists, join_uri, parent_uri, read_bytes, write_bytes
from cfgen.pipeline.outputs import phantoms_uri, required_model_to_edit, trained_model_marker, trained_model_uri

log = logging.getLogger("cfgen")


def run_phantoms(job: JobConfig, out_uri: str | None = None, shard_size: int = 500) -> dict[str, Any]:
    """Render `job.phantoms` to `out_uri`, sharded over Ray tasks (streamed: one shard in memory per task)."""
    import ray

    from cfgen.phantoms.writers import finish_phantoms, write_phantom_shard

    out = out_uri or phantoms_uri(job)
    cfg = job.phantoms
    manifest = join_uri(out, "manifest.parquet")
    config_uri = join_uri(out, "phantom_config.json")
    if exists(manifest, job.storage) and exists(config_uri, job.storage):
        if PhantomConfig.model_validate_json(read_bytes(config_uri, job.storage)) == cfg:
            return {"out_uri": out, "manifest_parquet": manifest, "n_images": None, "reused": True}
    shard = ray.remote(num_cpus=0.5)(write_phantom_shard)
    refs = [shard.remote(cfg, out, s, min(cfg.n, s + shard_size), job.storage) for s in range(0, cfg.n, shard_size)]
    rows = [row for part in ray.get(refs) for row in part]
    paths = finish_phantoms(cfg, rows, out, job.storage)
    return {"out_uri": out, "n_images": len(rows), "reused": False, **paths}


def phantom_config_for(job: JobConfig) -> PhantomConfig | None:
    """The phantom config saved next to the manifest, if the data set is a phantom set (enables true CFs)."""
    if not job.data.manifest_uri:
        return None
    folder = job.data.manifest_uri if job.data.manifest_uri.endswith("/") else parent_uri(job.data.manifest_uri)
    uri = join_uri(folder, "phantom_config.json")
    if not exists(uri, job.storage):
        return None
    return PhantomConfig.model_validate_json(read_bytes(uri, job.storage))


def run_ingest(job: JobConfig):
    from cfgen.pipeline.ingest import ingest

    result = ingest(job)
    log.info("ingest: %s", result)
    return result


def vae_cache_uri(job: JobConfig) -> str:
    """Fitted VAEs live beside the run folders (shared by every run on the same data), unless configured."""
    return job.train.vae.cache_uri or join_uri(parent_uri(job.output_uri), "vae-cache")


def autoencoder_fidelity(job: JobConfig, vae, decoded_uri: str) -> dict[str, Any]:
    """The VAE's L1 on held-out (validate-split) images, whole and per fine structure where phantoms give them."""
    from cfgen.metrics.image import reconstruction_fidelity
    from cfgen.metrics.image import ssim as image_ssim
    from cfgen.pipeline.ingest import decoded_rows
    from cfgen.train.vae import reconstruct

    n = job.train.vae.heldout
    if n == 0:
        return {}
    columns = ["image", "phantom_index"] if phantom_config_for(job) else ["image"]
    try:
        held = decoded_rows(job, decoded_uri, ["validate"], columns=columns).limit(n).take_batch(
            n, batch_format="numpy")
    except (ValueError, KeyError, IndexError):  # no validate split (or an empty one)
        return {}
    images = np.asarray(held["image"])
    structures = None
    phantoms = phantom_config_for(job)
    if phantoms is not None and "phantom_index" in held:
        from cfgen.phantoms.scm import PhantomSCM
        from cfgen.phantoms.truth import structure_masks

        scm = PhantomSCM(phantoms)
        masks = [structure_masks(scm, i, job.data.decode) for i in held["phantom_index"]]
        structures = {k: np.stack([m[k] for m in masks]) for k in masks[0]}
    reconstructions = reconstruct(vae, images)
    fidelity = reconstruction_fidelity(images, reconstructions, structures)
    # the SSIM a null edit that passes through the autoencoder cannot exceed (before compositing)
    ssim = float(np.mean([image_ssim(a, b) for a, b in zip(images, reconstructions)]))
    return {"heldout_images": int(len(images)), "l1": fidelity, "ssim": ssim}


def vae_fit_images(job: JobConfig, decoded_uri: str) -> np.ndarray:
    """The first `train.vae.images` training images in the order of the decoded files. The fit and its cache key
    depend on which images and in what order, and Ray Data's parallel read keeps no order unless asked: without
    it every run drew another order and refitted (measured: the cache missed on the same data)."""
    from cfgen.pipeline.data import in_order
    from cfgen.pipeline.ingest import training_dataset

    n = job.train.vae.images
    images = in_order(training_dataset(job, decoded_uri).limit(n)).take_batch(n, batch_format="numpy")["image"]
    return np.asarray(images)


def base_model(job: JobConfig, decoded_uri: str) -> str:
    """The model fine-tuning starts from: `model.pretrained`, or the tiny SD with its VAE fitted to the data (the
    fit comes from the VAE cache when an earlier run made it on the same data)."""
    if job.model.pretrained:
        return job.model.pretrained
    from cfgen.models.sd import build_tiny_pipeline, save_pipeline
    from cfgen.train.vae import cached_fit

    uri = join_uri(job.output_uri, "models", "base")
    if exists(join_uri(uri, "model_index.json"), job.storage):
        return uri
    pipe = build_tiny_pipeline(job.model, seed=job.train.seed)
    sample = vae_fit_images(job, decoded_uri)
    vae, record = cached_fit(pipe.vae, sample, job.model.tiny, job.model.resolution, job.train.vae,
                             vae_cache_uri(job), job.storage, seed=job.train.seed)
    pipe.vae = vae
    pipe.register_modules(vae=vae)
    record["fidelity"] = autoencoder_fidelity(job, vae, decoded_uri)
    log.info("VAE (%s): %s", "reused" if record["cached"] else "fitted", json.dumps(record["fidelity"]))
    save_pipeline(pipe, uri, job.storage)
    write_bytes(join_uri(uri, "vae_fit.json"), json.dumps(record, default=str).encode(), job.storage)
    return uri


def training_settings(job: JobConfig) -> dict[str, Any]:
    """What a fine-tuned model depends on: the model and training sections (but the step budget, which a rerun
    may raise to train on) and the captions and pixels it learned from."""
    return {"model": job.model.model_dump(mode="json"),
            "train": job.train.model_dump(mode="json", exclude={"max_steps", "checkpoint_every"}),
            "data": job.data.model_dump(mode="json", include={"decode", "prompt"})}


def run_train(job: JobConfig, decoded_uri: str | None = None) -> dict[str, Any]:
    from cfgen.pipeline.ingest import training_dataset
    from cfgen.tracking import runs
    from cfgen.train.loop import deepspeed_config
    from cfgen.train.trainer import fine_tune

    output, marker = trained_model_uri(job), trained_model_marker(job)
    if exists(marker, job.storage):  # finished earlier: training is not repeated, unless asked to go further
        from cfgen.pipeline.reuse import check_reuse

        done = json.loads(read_bytes(marker, job.storage))
        trained = int((done.get("metrics") or {}).get("step") or 0)
        finished = trained >= job.train.max_steps
        # a finished model written before settings were recorded is reused; training on from its checkpoint
        # with settings that cannot be checked is refused
        check_reuse(output, done.get("settings"), training_settings(job), unrecorded_ok=finished,
                    redo=job.output_uri)
        if finished:
            return done
        # a rerun with a larger train.max_steps continues from the last checkpoint (same run name and output)
        log.info("the model at %s trained %d steps; train.max_steps is %d: training on from its checkpoint",
                 output, trained, job.train.max_steps)
    decoded_uri = decoded_uri or run_ingest(job).decoded_uri
    base = base_model(job, decoded_uri)
    run_id = runs.start_run(job, job.train.run_name, tags={"cfgen.job": "train"})
    runs.log_params(job.tracking, run_id, {"deepspeed_config": json.dumps(deepspeed_config(job.train)),
                                           "base_model_uri": base})
    started = time.time()
    try:
        if job.train.cache_latents:
            from cfgen.pipeline.latents import latent_dataset

            train_ds = latent_dataset(job, decoded_uri, base)
        else:
            train_ds = training_dataset(job, decoded_uri)
        result = fine_tune(job, train_ds, base, output, mlflow_run_id=run_id)
    except BaseException:
        runs.end_run(job.tracking, run_id, "FAILED")
        raise
    seconds = time.time() - started
    images = job.train.max_steps * job.train.batch_size * job.train.num_workers
    runs.log_metrics(job.tracking, run_id, {"train_seconds": seconds, "images_per_second": images / seconds})
    version = None
    if "://" not in output:
        runs.log_artifacts(job.tracking, run_id, output, "pipeline")
        version = runs.register_model(job.tracking, run_id, "pipeline")
    runs.end_run(job.tracking, run_id)
    summary = {"model_uri": output, "run_id": run_id, "model_version": version, "metrics": result.metrics,
               "train_seconds": seconds, "settings": training_settings(job)}
    write_bytes(marker, json.dumps(summary, default=str).encode(), job.storage)
    return summary


def run_generate(job: JobConfig, model_uri: str | None = None, decoded_uri: str | None = None,
                 splits: list[str] | None = ("test",), classifier_uri: str | None = None, out_uri: str | None = None,
                 editor: type | None = None):
    """Counterfactuals of `splits` (the job's edit plan, `cfgen.pipeline.plan`), logged as an MLflow run
    "cfgen-generate" (planned / done / failed, the rate, the model version), scored by the classifier (`classifier_uri`, else `classifier.pretrained`; none
    leaves the classifier columns out) and, on phantoms, against the truth."""
    from cfgen.pipeline.generate import generate
    from cfgen.pipeline.plan import rules

    rules(job.edit, job.data.prompt)  # a bad plan fails here, before ingest or any editing
    decoded_uri = decoded_uri or run_ingest(job).decoded_uri
    model_uri = model_uri or required_model_to_edit(job, "edit")
    if model_uri.startswith("models:/"):
        from cfgen.tracking.runs import download_model

        model_uri = download_model(job.tracking, model_uri)
    classifier_uri = classifier_uri or job.classifier.pretrained
    if classifier_uri and job.metrics.enabled:
        from cfgen.classify.store import load_classifier

        # a missing or mismatched classifier fails here, before any editing; the actors load it by the same URI
        load_classifier(classifier_uri, job.storage, job.tracking, architecture=job.classifier.architecture)
    from cfgen.tracking import runs

    run_id = runs.start_run(job, "cfgen-generate", tags={"cfgen.job": "generate"})
    runs.log_params(job.tracking, run_id, {"model_uri": model_uri, "classifier_uri": classifier_uri or ""})
    try:
        result = generate(job, model_uri, decoded_uri, splits=splits, phantoms=phantom_config_for(job),
                          classifier_uri=classifier_uri, out_uri=out_uri, **({"editor": editor} if editor else {}))
    except BaseException:
        runs.end_run(job.tracking, run_id, "FAILED")
        raise
    s = result.summary or {}
    runs.log_metrics(job.tracking, run_id, {k: float(s[k]) for k in (
        "planned", "done", "failed", "written_this_run", "duplicates_removed", "seconds", "counterfactuals_per_s")
        if k in s})
    runs.log_params(job.tracking, run_id, {"model_version": s.get("model_version", ""), "stages": s.get("stages", "")})
    runs.end_run(job.tracking, run_id)
    return result


def _fidelity_text(job: JobConfig) -> str:
    uri = join_uri(job.output_uri, "models", "base", "vae_fit.json")
    if not exists(uri, job.storage):
        return "n/a"
    l1 = json.loads(read_bytes(uri, job.storage)).get("fidelity", {}).get("l1", {})
    return ", ".join(f"{k} {v:.4f}" for k, v in l1.items()) + " (noise floor 0.008)"


def run_demo(job: JobConfig) -> dict[str, Any]:
    """The walking skeleton: phantoms -> ingest -> tiny SD + DeepSpeed fine-tune -> counterfactuals -> report."""
    from cfgen.pipeline.ingest import ingest
    from cfgen.pipeline.runtime import init_ray
    from cfgen.report.html import write_report

    started = time.time()
    init_ray(job.ray, use_gpu=job.train.use_gpu, trains=True)
    phantoms = run_phantoms(job)
    job = job.model_copy(deep=True)
    job.data.manifest_uri = phantoms["manifest_parquet"]
    ingested = ingest(job)
    trained = run_train(job, ingested.decoded_uri)
    from cfgen.pipeline.classify import run_classify

    classified = run_classify(job, ingested.decoded_uri)
    from cfgen.pipeline.instrument import phantom_calibration

    calibration = phantom_calibration(job, classified["classifier_uri"], ingested.decoded_uri)
    generated = run_generate(job, trained["model_uri"], ingested.decoded_uri,
                             classifier_uri=classified["classifier_uri"])
    import pandas as pd
    import pyarrow.parquet as pq

    from cfgen.io.storage import pyarrow_filesystem

    fs, path = pyarrow_filesystem(ingested.errors_uri, job.storage)
    errors = pq.read_table(path, filesystem=fs).to_pandas() if ingested.error_rows else pd.DataFrame(
        columns=["stage", "reason"])
    facts = {
        "phantom images": job.phantoms.n,
        "decoded ok / errors / filtered": f"{ingested.ok_rows} / {ingested.error_rows} / {ingested.filtered_out}",
        "training": f"{job.train.strategy} ZeRO-{job.train.zero_stage}, {job.train.num_workers} workers, "
                    f"{job.train.max_steps} steps, {trained['train_seconds']:.0f} s",
        "final training loss": f"{trained['metrics'].get('loss', float('nan')):.4f}",
        "model": trained["model_uri"],
        "MLflow run": f"{trained['run_id']} ({job.tracking.tracking_uri})",
        "classifier": f"{job.classifier.architecture}, {job.classifier.train.epochs} epochs on "
                      f"{classified['evaluation']['n_train']} images, {classified['classifier_uri']}",
        "training budget": f"{job.train.max_steps} UNet steps: a demo-sized model that has not yet learned every "
                           f"phrase (configs/phantom-bench-v2.yaml trains the benchmark's model to 4,500; "
                           f"bench/RESULTS.md)",
        "autoencoder held-out L1": _fidelity_text(job),
        "editing": job.edit.describe(),
        "counterfactual rows": generated.rows_written,
        "wall time (s)": f"{time.time() - started:.0f}",
    }
    report = write_report(job, generated.results_uri, facts=facts, errors=errors,
                          classifier=classified["evaluation"], calibration=calibration, keys_uri=generated.keys_uri)
    return {"report": report, "results_uri": generated.results_uri, **facts}
