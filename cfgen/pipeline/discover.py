"""`cfgen discover`: interventions over a population -> counterfactuals (the generation job) -> statistics -> report.

Generation runs once per seed into `<output_uri>/discover/generate-<key>/` (the key: model and edit settings) and
is resumable as always; the analysis streams its rows (`cfgen.discovery.analysis`). Outputs beside it: `regions.parquet`/`.csv` (one row per
(intervention, region)), `entanglement.parquet`/`.csv`, `subjects.parquet`, `discovery.json` and `report.html`,
all logged to an MLflow run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cfgen.config import JobConfig
from cfgen.io.storage import join_uri, pyarrow_filesystem, write_bytes

log = logging.getLogger(__name__)


def discover_uri(job: JobConfig) -> str:
    return join_uri(job.output_uri, "discover")


def training_metadata(job: JobConfig, decoded_uri: str, attributes: list[str]):
    """The attributes of the training split (only those columns are read): the data's own correlations."""
    import pyarrow.dataset as pds

    fs, path = pyarrow_filesystem(decoded_uri, job.storage)
    dataset = pds.dataset(path, filesystem=fs, format="parquet")
    columns = [a for a in attributes if a in dataset.schema.names]
    table = dataset.to_table(columns=[*columns, "split", "status"])
    frame = table.to_pandas()
    return frame[(frame["status"] == "ok") & (frame["split"] == "train")][columns]


def generation_key(job: JobConfig, model_uri: str) -> str:
    """What makes two generations comparable: the model, the method's signature (every edit setting that decides
    pixels and the classifier that picks among a sweep's candidates: `cfgen.pipeline.plan.method_signature`, the
    generation keys' own) and `discovery.limit` (the analysis reads the whole folder). A rerun with other settings
    writes beside, not over."""
    import hashlib

    from cfgen.pipeline.plan import chooser_id, method_signature

    blob = json.dumps({"model": model_uri,
                       "method": method_signature(job.edit, chooser_id(job.classifier.pretrained, job, [job.edit])),
                       # the analysis reads every row of the folder: a smaller limit must not find a larger one's
                       "limit": job.discovery.limit,
                       "decode": job.data.decode.model_dump(mode="json"),
                       "prompt": job.data.prompt.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def generation_job(job: JobConfig, interventions, seed: int) -> JobConfig:
    edit = job.edit.model_copy(update={"edits": [i.edit for i in interventions], "seed": seed,
                                       "limit": job.discovery.limit})
    return job.model_copy(update={"edit": edit})


def selection_notes(job: JobConfig) -> list[str]:
    """What the report must say when the attribute classifier chose each edit among a sweep's candidates: it keeps
    the least change it reads as the target, and the entanglement matrix reads the model at that strength only. On
    the phantom benchmark the confounded model's do(effusion) moved P(devices) by +0.008 with the sweep (which kept
    1.5x for 375 of 390 images), +0.023 at 2x and +0.072 at 3x (flagged); leaving the other attributes out of the
    choice changed nothing (bench/RESULTS.md)."""
    if job.edit.sweep_size < 2 or not job.classifier.pretrained:
        return []
    return [f"edits chosen per image among {job.edit.sweep_size} settings by the attribute classifier, which keeps "
            "the least change it reads as the target: the entanglement matrix reads the model at that edit "
            "strength, and a stronger edit can show more of what the model entangles; to diagnose the model, run "
            "discovery with one strong setting too (e.g. edit.edit_guidance the sweep's largest scale)"]


#: attributes that come before the findings in any plausible causal order: an intervention on one holds the
#: findings the prompt states, which it may cause
DEMOGRAPHICS = ("age", "sex")


def estimand_notes(job: JobConfig, interventions) -> list[str]:
    """What the region figures of an intervention estimate, where that is not its total effect. A counterfactual
    changes the intervened attribute in the prompt and keeps the rest, so everything the intervention causes that
    the prompt states stays as it was: the figures are its direct effect. On the phantoms, do(age=+10) moves 91 of
    342 test subjects' findings in the SCM; its total effect on lung intensity was 0.0157 against a direct effect
    of 0.0024 (bench/RESULTS.md). Said for an attribute with descendants in `discovery.expected_effects`, and for a
    demographic one without (age and sex precede the findings)."""
    notes = []
    for i in dict.fromkeys(i for i in interventions if not i.null_control):
        causes = [b for b in job.discovery.expected_effects.get(i.attribute, []) if b != i.attribute]
        if causes:
            notes.append(f"{i.name}: each counterfactual keeps the rest of its prompt, so {', '.join(causes)} stay "
                         f"as stated: the region figures are the direct effect of {i.attribute}, not what it does "
                         f"through them (the classifier's reading of their shift is in the entanglement table)")
        elif i.attribute in DEMOGRAPHICS:
            notes.append(f"{i.name}: each counterfactual keeps the rest of its prompt, so findings {i.attribute} may "
                         f"cause stay as stated: the region figures are its direct effect, not its total one (list "
                         f"what it causes in discovery.expected_effects so that the entanglement table expects "
                         f"their shift)")
    return notes


def localization_notes(job: JobConfig) -> list[str]:
    """What the report must say when the edits are confined to where each one changes most (the implicit latent
    mask `edit.edit_threshold`, the change mask `edit.change_threshold`, `edit.confine`): a change spread wider and
    weaker than the edit's strongest one is cut from every counterfactual, so discovery misses it or reads it with
    the wrong sign. On the phantoms do(sex=F) moved the image outside the lungs by +0.0046 with both masks, where
    the truth darkens it by -0.0263; without them it read -0.0216, but strong edits' drift then flagged regions the
    truth left alone (do(effusion=1) outside the lungs, -0.0125) (bench/RESULTS.md)."""
    edit, confined = job.edit, []
    if edit.method == "ddpm" and edit.edit_threshold:
        confined.append(f"the latent cells where the edit's direction is largest (edit.edit_threshold "
                        f"{edit.edit_threshold:g})")
    if edit.composite and edit.change_threshold:
        confined.append(f"the pixels the edit changes most (edit.change_threshold {edit.change_threshold:g})")
    if edit.confine != "none":
        confined.append("each row's mask (edit.confine)")
    if not confined:
        return []
    return [f"edits confined to {' and to '.join(confined)}: a change spread wider and weaker than the strongest one "
            "is cut, so an effect you did not expect may be missed or read with the wrong sign; run discovery "
            "without them too (0 / 'none'), with a null control to size the drift that unconfined edits add"]


def run_discover(job: JobConfig, decoded_uri: str | None = None, model_uri: str | None = None) -> dict[str, Any]:
    from cfgen.discovery.analysis import attribute_correlations, stream_subjects, summarize, to_json
    from cfgen.discovery.plans import plan
    from cfgen.pipeline.outputs import required_model_to_edit
    from cfgen.pipeline.workflows import run_generate, run_ingest
    from cfgen.report.discovery import write_discovery_report
    from cfgen.tracking import runs

    # discovery's own edit settings over the generation's (`discovery.edit`): every part below, the generation key,
    # the notes and the report, reads them from `job.edit`
    job = job.model_copy(update={"edit": job.discovery_edit()})
    interventions = plan(job)  # a plan the template cannot say fails here, before any editing
    decoded_uri = decoded_uri or run_ingest(job).decoded_uri
    model_uri = model_uri or required_model_to_edit(job, "discover")
    out = discover_uri(job)
    generated = join_uri(out, f"generate-{generation_key(job, model_uri)}")
    for seed in job.discovery.seeds:
        written = run_generate(generation_job(job, interventions, seed), model_uri, decoded_uri,
                               splits=job.discovery.splits, out_uri=generated)
        log.info("discover: seed %s: %s rows written, %s images already done", seed, written.rows_written,
                 written.images_skipped)
    results_uri = join_uri(generated, "results")
    reduction = stream_subjects(job, results_uri, interventions)
    try:
        attributes = sorted({i.attribute for i in interventions} | set(job.classifier.attributes))
        correlations = attribute_correlations(training_metadata(job, decoded_uri, attributes), attributes)
        result = summarize(reduction, correlations)
        result.notes.extend(estimand_notes(job, interventions) + localization_notes(job) + selection_notes(job))
        summary = to_json(result)
        for name, frame in (("regions", result.regions), ("entanglement", result.entanglement)):
            _write_table(frame, join_uri(out, f"{name}.parquet"), job)
            write_bytes(join_uri(out, f"{name}.csv"), frame.to_csv(index=False).encode(), job.storage)
        if result.subjects_path:  # written by the analysis one intervention at a time; copied as it is, streamed
            import pyarrow.fs as pafs

            fs, path = pyarrow_filesystem(join_uri(out, "subjects.parquet"), job.storage)
            pafs.copy_files(result.subjects_path, path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
    finally:
        shutil.rmtree(reduction.folder, ignore_errors=True)  # the analysis' local spills
    write_bytes(join_uri(out, "discovery.json"), json.dumps(summary, indent=1, default=str).encode(), job.storage)
    meta = {"title": "cfgen discovery", "model_uri": model_uri, "method": job.edit.method,
            "steps": job.edit.num_inference_steps, "composite": job.edit.composite, "alpha": job.discovery.alpha,
            "test": job.discovery.test, "seeds": job.discovery.seeds, "splits": job.discovery.splits,
            "results_uri": results_uri,
            "eligible subjects": ", ".join(f"{k}: {v['eligible_subjects']}" for k, v in result.eligibility.items())}
    report = write_discovery_report(out, result.regions, result.maps, result.entanglement, result.examples, meta,
                                    notes=result.notes, storage=job.storage)
    run_id = runs.start_run(job, "cfgen-discover", tags={"cfgen.job": "discover"})
    regions, entangled = result.regions, result.entanglement
    flagged = regions[regions["flagged"].astype(bool)] if not regions.empty else regions
    findings = flagged[~flagged["null_control"].astype(bool)] if not flagged.empty else flagged
    runs.log_metrics(job.tracking, run_id, {
        "findings": float(len(findings)),
        "null_control_flags": float(len(flagged) - len(findings)),
        "entanglement_flags": float(entangled["flagged"].sum()) if not entangled.empty else 0.0,
    })
    _log_outputs(job, run_id, out, report, result)
    runs.end_run(job.tracking, run_id)
    return {"report": report, "regions_uri": join_uri(out, "regions.parquet"), "results_uri": results_uri,
            "run_id": run_id, "eligibility": result.eligibility, "notes": result.notes,
            "findings": findings[["intervention", "region", "mean_diff", "ci_low", "ci_high", "p_value"]].to_dict(
                "records") if not findings.empty else []}


def _write_table(frame, uri: str, job: JobConfig) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = pyarrow_filesystem(uri, job.storage)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, filesystem=fs)


def _log_outputs(job: JobConfig, run_id: str, out: str, report: str, result) -> None:
    """The report and tables as MLflow artifacts (copied through a local folder, so s3:// outputs work too)."""
    from cfgen.io.storage import read_bytes
    from cfgen.tracking import runs

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("regions.csv", "entanglement.csv", "discovery.json"):
            Path(tmp, name).write_bytes(read_bytes(join_uri(out, name), job.storage))
        Path(tmp, "report.html").write_bytes(read_bytes(report, job.storage))
        runs.log_artifacts(job.tracking, run_id, tmp, "discovery")
