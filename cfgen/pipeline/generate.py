"""Counterfactual generation at dataset scale on Ray Data.

decoded rows -> `CounterfactualStage` (actor pool: the model is loaded once per actor, on a GPU where one is asked
for) -> `MeasureStage` (CPU tasks: true phantom counterfactuals, metrics, PNGs) -> Parquet rows.

Rows are keyed by (image_id, edit, seed, model). A rerun skips images whose rows are already written, so a killed
job resumes where it stopped and a finished one is a no-op.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cfgen.config import (
    DecodeConfig, EditConfig, JobConfig, PhantomConfig, PromptConfig, StorageConfig, TrackingConfig,
)
from cfgen.io.prompts import counterfactual_prompt
from cfgen.io.storage import join_uri, pyarrow_filesystem, write_bytes
from cfgen.metrics.image import as_unit_float, difference_map, edit_metrics
from cfgen.pipeline.data import append_columns, tensor_column, typed_table
from cfgen.pipeline.ingest import decoded_rows

#: Arrays that travel between stages but are not written to the results table.
_ARRAY_COLUMNS = ("image", "counterfactual", "reconstruction", "autoencoded")


def edit_name(edit: dict[str, Any]) -> str:
    """A stable, path-safe name for an edit: {"support_devices": 0} -> "support_devices=0"."""
    return ",".join(f"{k}={edit[k]}" for k in sorted(edit))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


class CounterfactualStage:
    """Ray Data actor: holds one pipeline, edits a batch of decoded rows for every configured edit.

    With `classifier_uri` and a sweep method (p2p, null_text, direct, more than one self_replace setting), the
    attribute classifier (loaded once, here) chooses each image's setting (`cfgen.metrics.selection`); without one
    the engine keeps the most preserving setting. The choice is written per row (`edit_setting`)."""

    def __init__(self, model_uri: str, job: dict[str, Any], classifier_uri: str | None = None):
        import torch

        from cfgen.editing.engine import SWEEP_METHODS
        from cfgen.models.sd import load_pipeline, pick_device

        self.job = JobConfig.model_validate(job)
        self.model_uri = model_uri
        device = pick_device(self.job.model.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.pipe = load_pipeline(model_uri, self.job.storage, device=device, dtype=dtype)
        edit = self.job.edit
        self.select = None
        if classifier_uri and edit.method in SWEEP_METHODS and len(edit.self_replace) > 1:
            from cfgen.classify.store import load_classifier
            from cfgen.metrics.selection import classifier_selection

            classifier = load_classifier(classifier_uri, self.job.storage, self.job.tracking, device=device)
            self.select = classifier_selection(classifier, edit.edits)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cfgen.editing.engine import counterfactuals, engine_options

        edit: EditConfig = self.job.edit
        prompt: PromptConfig = self.job.data.prompt
        images = tensor_column(batch, "image")
        meta = batch.drop_columns(["image"])
        rows = meta.to_pylist()
        factual = [str(r["prompt"]) for r in rows]
        planned = [[planned_edit(r, f, e, edit, prompt) for r, f in zip(rows, factual)] for e in edit.edits]
        cf_prompts = [[p.prompt for p in per_edit] for per_edit in planned]
        masks, confined = confinement_masks(rows, edit, self.job.data.decode, self.job.storage) \
            if edit.confine == "mask" else (None, [False] * len(rows))
        options = dict(engine_options(edit), masks=masks,
                       seeds=[edit_seed(r["image_id"], edit.seed) for r in rows])
        result = counterfactuals(self.pipe, images, factual, cf_prompts, select=self.select, **options)
        n, k = len(rows), len(edit.edits)
        out = meta.take(np.tile(np.arange(n), k))  # one row per (image, edit), metadata types kept
        extra: dict[str, Any] = {}
        if self.job.metrics.reversibility:
            # edit back: the counterfactual, edited with its own prompt as the factual one, back to the factual;
            # the way back has each row's own target, so the engine's default setting, not the selection
            backs = [counterfactuals(self.pipe, _to_uint8(cf), prompts, [factual], **options)
                     for cf, prompts in zip(result.counterfactuals, cf_prompts)]
            extra["edit_back"] = np.concatenate([_to_uint8(b.counterfactuals[0]) for b in backs])
        added = typed_table({
            "image": np.tile(_to_uint8(as_unit_float(images)), (k, 1, 1)),
            "reconstruction": np.tile(_to_uint8(result.null_edit), (k, 1, 1)),
            "autoencoded": np.tile(_to_uint8(result.autoencoded), (k, 1, 1)),
            "counterfactual": np.concatenate([_to_uint8(c) for c in result.counterfactuals]),
            "edit": [json.dumps(e, sort_keys=True) for e in edit.edits for _ in range(n)],
            "edit_name": [edit_name(e) for e in edit.edits for _ in range(n)],
            "counterfactual_prompt": [p for prompts in cf_prompts for p in prompts],
            # the edit made to this row (a shift resolved: {"age": 73}); null where it could not be, with the reason
            "edit_applied": [p.applied for per_edit in planned for p in per_edit],
            "edit_error": [p.error for per_edit in planned for p in per_edit],
            "seed": np.full(n * k, edit.seed, dtype=np.int64),
            "method": [edit.method] * (n * k),
            # the chosen sweep setting, e.g. {"self_replace": 0.6}; {} for a method without a sweep
            "edit_setting": [json.dumps(s, sort_keys=True) for per_edit in result.settings for s in per_edit],
            "composited": np.full(n * k, edit.composite),
            "confined": np.tile(np.asarray(confined, dtype=bool), k),
            "model_uri": [self.model_uri] * (n * k),
            "unet_evaluations": np.full(n * k, result.unet_forward_per_image, dtype=np.int64),
            "unet_forward": np.full(n * k, result.unet_forward, dtype=np.float64),
            "unet_backward": np.full(n * k, result.unet_backward, dtype=np.float64),
            "num_inference_steps": np.full(n * k, edit.num_inference_steps, dtype=np.int64),
            **extra,
        })
        return append_columns(out, added)


@dataclass(frozen=True)
class PlannedEdit:
    prompt: str
    applied: str | None  # the resolved edit as JSON; None: not applied (the prompt is the factual one)
    error: str | None


def planned_edit(row: dict[str, Any], factual_prompt: str, edit: dict[str, Any], config: EditConfig,
                 prompt: PromptConfig) -> PlannedEdit:
    """One row's counterfactual prompt. An edit this row cannot take (an age shift of a missing or out-of-range
    age) becomes a null edit of the factual prompt, recorded as not applied, so the batch goes on."""
    from cfgen.io.prompts import EditNotApplicable, resolve_edit

    try:
        resolved = resolve_edit(row, edit, config.age_range)
    except EditNotApplicable as err:
        return PlannedEdit(factual_prompt, None, str(err))
    return PlannedEdit(counterfactual_prompt(row, resolved, prompt), json.dumps(resolved, sort_keys=True), None)


def confinement_masks(rows: list[dict[str, Any]], edit: EditConfig, decode: DecodeConfig,
                      storage: StorageConfig | None = None) -> tuple[np.ndarray, list[bool]]:
    """The rows' masks (mask_uri, decoded like the images, grown by edit.mask_dilation) and which rows had one;
    a row without a readable mask is edited everywhere (all ones) and says so in its `confined` column."""
    from cfgen.io.preprocess import read_mask

    masks = np.ones((len(rows), decode.size, decode.size), dtype=np.float32)
    confined = []
    for i, row in enumerate(rows):
        region = read_mask(row.get("mask_uri"), decode, storage, edit.mask_dilation)
        if region is not None:
            masks[i] = region
        confined.append(region is not None)
    return masks, confined


def edit_seed(image_id: Any, seed: int) -> int:
    """The noise seed of one image's edits: a hash of (image id, edit seed), so it never depends on the batch."""
    import hashlib

    return int(hashlib.sha256(f"{image_id}|{seed}".encode()).hexdigest()[:8], 16)


class MeasureStage:
    """CPU actor: metrics per row and PNGs of the result.

    Against the true counterfactual where the row is a phantom; with the attribute classifier (loaded once per
    actor) where one is given: effectiveness, off-target shifts and the features realism is computed from; and
    preservation, minimality and reversibility from the images. Realism is a set figure, computed from the stored
    features when the results are summarised (`cfgen.report`)."""

    def __init__(
        self,
        output_uri: str,
        storage: StorageConfig,
        decode: DecodeConfig,
        phantoms: PhantomConfig | None = None,
        classifier_uri: str | None = None,
        tracking: TrackingConfig | None = None,
    ):
        self.output_uri, self.storage, self.decode = output_uri, storage, decode
        self.scm = None
        if phantoms is not None:
            from cfgen.phantoms.scm import PhantomSCM

            self.scm = PhantomSCM(phantoms)
        self.classifier = None
        if classifier_uri:
            from cfgen.classify.store import load_classifier

            self.classifier = load_classifier(classifier_uri, storage, tracking)

    def truth(self, row: dict[str, Any]) -> tuple[np.ndarray | None, float]:
        """The phantom's true counterfactual (preprocessed exactly like a decoded image) and whether the edit
        changes its true attributes (1.0; 0.0 for a null edit such as removing a device from a patient without
        one). (None, NaN) when the row is no phantom. Metadata can be missing; the SCM's truth is not."""
        index = self._phantom_index(row)
        edit = applied_edit(row)
        if index is None or edit is None:
            return None, float("nan")
        from cfgen.phantoms.truth import changes_truth, true_counterfactual

        truth = true_counterfactual(self.scm, index, edit, self.decode)
        return as_unit_float(truth), float(changes_truth(self.scm, index, edit))

    def _phantom_index(self, row: dict[str, Any]) -> int | None:
        index = row.get("phantom_index")
        if self.scm is None or index is None or (isinstance(index, float) and np.isnan(index)):
            return None
        return int(index)

    def factual_state(self, row: dict[str, Any]) -> float:
        """The edited attribute's factual value as the classifier reads it: the phantom's truth, else the row's
        label (NaN when missing or uncertain, or for a multi-attribute edit)."""
        from cfgen.metrics.effectiveness import target_value

        edit = applied_edit(row)
        if edit is None or len(edit) != 1:
            return float("nan")
        (name,) = edit
        index = self._phantom_index(row)
        value = getattr(self.scm.subject(index), name) if index is not None else row.get(name)
        try:
            state = target_value(name, value)
        except (TypeError, ValueError):
            return float("nan")
        return state if name in ("age", "sex") or state in (0.0, 1.0) else float("nan")

    def region(self, row: dict[str, Any], factual: np.ndarray, truth: np.ndarray | None) -> np.ndarray | None:
        """Where the edit may act: the true change on phantoms, else the row's lung mask, else unknown."""
        from cfgen.metrics.image import change_region

        if truth is not None:
            return change_region(factual, truth)
        from cfgen.io.preprocess import read_mask

        return read_mask(row.get("mask_uri"), self.decode, self.storage)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cfgen.metrics.edit_report import CLASSIFIER_COLUMNS, classifier_metrics, image_metrics

        arrays = [c for c in (*_ARRAY_COLUMNS, "edit_back") if c in batch.column_names]
        factual, cfs, recons, autoencoded = (tensor_column(batch, c) for c in _ARRAY_COLUMNS)
        backs = tensor_column(batch, "edit_back") if "edit_back" in arrays else None
        meta = batch.drop_columns(arrays)
        rows = meta.to_pylist()
        metrics, cf_uris, panel_uris, changes, factual_uris = [], [], [], [], []
        written: set[str] = set()
        for i, row in enumerate(rows):
            truth, changes_truth = self.truth(row)
            changes.append(changes_truth)
            m = edit_metrics(factual[i], cfs[i], truth, recons[i], autoencoded[i])
            m.update(image_metrics(factual[i], cfs[i], recons[i], None if backs is None else backs[i],
                                   self.region(row, factual[i], truth)))
            metrics.append(m)
            stem = f"{_slug(str(row['image_id']))}__{_slug(str(row['edit_name']))}"
            cf_uris.append(join_uri(self.output_uri, "images", f"{stem}.png"))
            panel_uris.append(join_uri(self.output_uri, "panels", f"{stem}.png"))
            write_bytes(cf_uris[-1], png_bytes(cfs[i]), self.storage)
            # the image the engine edited, as it saw it: discovery subtracts it from the counterfactual
            factual_uris.append(join_uri(self.output_uri, "images", f"{_slug(str(row['image_id']))}__factual.png"))
            if factual_uris[-1] not in written:
                write_bytes(factual_uris[-1], png_bytes(factual[i]), self.storage)
                written.add(factual_uris[-1])
            write_bytes(panel_uris[-1], png_bytes(panel(factual[i], cfs[i], truth)), self.storage)
        added: dict[str, Any] = {"counterfactual_uri": cf_uris, "factual_uri": factual_uris, "panel_uri": panel_uris,
                                 "edit_changes_truth": np.array(changes, dtype=np.float64)}
        for name in metrics[0]:
            added[name] = np.array([m[name] for m in metrics], dtype=np.float64)
        if self.classifier is not None:
            before, after = self.classifier.predict(factual), self.classifier.predict(cfs)
            edits = [applied_edit(r) or json.loads(r["edit"]) for r in rows]
            state = np.array([self.factual_state(r) for r in rows], dtype=np.float64)
            cols, reasons = classifier_metrics(before, after, edits, state)
            for i, r in enumerate(rows):  # an edit not made is not scored as one
                if applied_edit(r) is None:
                    reasons[i] = f"edit_not_applied: {r.get('edit_error')}"
                    for c in CLASSIFIER_COLUMNS:
                        cols[c][i] = np.nan
            added.update({f"clf_{k}" if not k.startswith("p_") else k: v for k, v in cols.items()})
            added["factual_state"] = state
            added["metric_error"] = reasons
            added["factual_features"] = before["features"].astype(np.float32)
            added["counterfactual_features"] = after["features"].astype(np.float32)
        return append_columns(meta, typed_table(added))


def applied_edit(row: dict[str, Any]) -> dict[str, Any] | None:
    """The edit a results row was given, shifts resolved; None where it could not be applied. Rows written
    before `edit_applied` existed carry only `edit` (absolute values)."""
    if "edit_applied" not in row:
        return json.loads(row["edit"])
    return json.loads(row["edit_applied"]) if row["edit_applied"] else None


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_uint8(as_unit_float(image))).save(buf, format="PNG")
    return buf.getvalue()


def panel(factual: np.ndarray, counterfactual: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """factual | counterfactual | true counterfactual (grey when unknown) | difference (0.5 = no change)."""
    f, c = as_unit_float(factual), as_unit_float(counterfactual)
    t = as_unit_float(truth) if truth is not None else np.full_like(f, 0.5)
    diff = np.clip(0.5 + difference_map(f, c), 0, 1)
    gap = np.ones((f.shape[0], 2), dtype=np.float32)
    return np.concatenate([f, gap, c, gap, t, gap, diff], axis=1)


@dataclass
class GenerateResult:
    results_uri: str
    rows_written: int
    images_skipped: int


def _done_image_ids(results_uri: str, job: JobConfig) -> set[str]:
    """Images whose every edit of this job, at this job's seed, is already in the results table (a resumed job
    skips them; another seed or another edit of the same image is new work)."""
    import pyarrow.dataset as pds

    fs, path = pyarrow_filesystem(results_uri, job.storage)
    try:
        table = pds.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_id", "edit_name", "seed"])
    except (FileNotFoundError, OSError):
        return set()
    names = {edit_name(e) for e in job.edit.edits}
    frame = table.to_pandas()
    frame = frame[(frame["seed"] == job.edit.seed) & frame["edit_name"].isin(names)].drop_duplicates()
    counts = frame.groupby("image_id")["edit_name"].nunique()
    return set(counts[counts >= len(names)].index)


def generate(
    job: JobConfig,
    model_uri: str,
    decoded_uri: str,
    splits: list[str] | None = ("test",),
    phantoms: PhantomConfig | None = None,
    classifier_uri: str | None = None,
    out_uri: str | None = None,
) -> GenerateResult:
    """Edit every decoded ok image of `splits` (up to `job.edit.limit`) with every edit of `job.edit.edits`,
    into `out_uri` (default `<output_uri>/generate`): `results/` (Parquet) and `images/`, `panels/` (PNG).

    `classifier_uri` chooses the sweep methods' setting per image and, where metrics are on, scores every row."""
    import pyarrow.dataset as pds
    import ray.data

    edit = job.edit
    out = out_uri or join_uri(job.output_uri, "generate")
    results_uri = join_uri(out, "results")
    fs, path = pyarrow_filesystem(decoded_uri, job.storage)
    columns = pds.dataset(path, filesystem=fs, format="parquet").schema.names
    keep = [c for c in columns if c not in ("provenance", "error_stage", "error_reason")]
    ds = decoded_rows(job, decoded_uri, splits, columns=keep)
    if edit.limit:
        ds = ds.limit(edit.limit)
    done = _done_image_ids(results_uri, job)
    if done:
        from ray.data.expressions import col

        ds = ds.filter(expr=col("image_id").not_in(sorted(done)))

    cf = ds.map_batches(
        CounterfactualStage,
        fn_constructor_kwargs={"model_uri": model_uri, "job": job.model_dump(mode="python"),
                               "classifier_uri": classifier_uri},
        compute=ray.data.ActorPoolStrategy(size=edit.num_actors),
        batch_size=edit.batch_size,
        num_cpus=edit.cpus_per_actor,
        num_gpus=edit.gpus_per_actor or None,
        batch_format="pyarrow",
    )
    measured = cf.map_batches(
        MeasureStage,
        fn_constructor_kwargs={
            "output_uri": out, "storage": job.storage, "decode": job.data.decode, "phantoms": phantoms,
            "classifier_uri": classifier_uri if job.metrics.enabled else None, "tracking": job.tracking,
        },
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=edit.batch_size * len(edit.edits),
        num_cpus=job.metrics.cpus_per_actor,
        batch_format="pyarrow",
    )
    res_fs, res_path = pyarrow_filesystem(results_uri, job.storage)
    before = _count(results_uri, job)
    measured.write_parquet(res_path, filesystem=res_fs)
    return GenerateResult(results_uri, _count(results_uri, job) - before, len(done))


def _count(results_uri: str, job: JobConfig) -> int:
    import pyarrow.dataset as pds

    fs, path = pyarrow_filesystem(results_uri, job.storage)
    try:
        return pds.dataset(path, filesystem=fs, format="parquet").count_rows()
    except (FileNotFoundError, OSError):
        return 0
