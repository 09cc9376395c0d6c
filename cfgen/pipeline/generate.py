"""Counterfactual generation at dataset scale on Ray Data.

decoded rows -> `CounterfactualStage` (actor pool: the model is loaded once per actor, on a GPU where one is asked
for) -> `MeasureStage` (true phantom counterfactuals, metrics, PNGs) -> `CommitStage` (keyed Parquet parts). With
GPUs these are three actor pools, so the CPU work stays off the GPU actors; without, `FusedStage` runs all three in
each editing actor (`edit.stages`).

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
    DecodeConfig, EditConfig, JobConfig, OutputConfig, PhantomConfig, PromptConfig, StorageConfig, TrackingConfig,
)
from cfgen.io.prompts import counterfactual_prompt
from cfgen.io.storage import join_uri, pyarrow_filesystem, write_bytes
from cfgen.metrics.image import as_unit_float, difference_map, edit_metrics
from cfgen.pipeline.data import append_columns, tensor_column, typed_table
from cfgen.pipeline.plan import edit_name

#: Arrays that travel between stages but are not written to the results table.
_ARRAY_COLUMNS = ("image", "counterfactual", "reconstruction", "autoencoded")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


class CounterfactualStage:
    """Ray Data actor: holds one pipeline; edits each image of a batch for the pending keys the plan gives it.

    `units` (a table of pending keys: key, image_id, rule, edit, edit_name, seed) is passed by object reference and
    indexed once per actor. Keys of one image that share a rule and a seed are edited in one engine call (one
    inversion for all their edits), images that share the same set in one batch. With `classifier_uri` and a
    sweep (`EditConfig.sweep_size` > 1: p2p, null_text or direct with several self_replace settings, ddpm with
    several edit_guidance scales), the attribute classifier chooses each image's setting
    (`cfgen.metrics.selection`); without one the engine keeps the most preserving setting.

    A call that raises is retried one image at a time; an image that still fails becomes rows with the error in
    `failure_reason` (and zero images), which the commit stage files under `failures/`; the batch goes on."""

    def __init__(self, model_uri: str, job: dict[str, Any], units, classifier_uri: str | None = None,
                 model_version: str = ""):
        import torch

        from cfgen.models.sd import load_pipeline, pick_device
        from cfgen.pipeline.plan import rules

        self.job = JobConfig.model_validate(job)
        self.model_uri, self.model_version = model_uri, model_version
        self.device = pick_device(self.job.model.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipe = load_pipeline(model_uri, self.job.storage, device=self.device, dtype=dtype)
        self.rules = {r.name: r.config for r in rules(self.job.edit, self.job.data.prompt)}
        self.classifier_uri = classifier_uri
        self._classifier = None
        self.units: dict[str, list[dict[str, Any]]] = {}
        table = units if isinstance(units, pa.Table) else _get_ref(units)
        self.signatures: dict[str, str] = {}  # rule -> its method_signature (the key's method part)
        for unit in table.to_pylist():
            self.units.setdefault(str(unit["image_id"]), []).append(unit)
            self.signatures[unit["rule"]] = unit.get("method_signature") or ""

    def _select(self, config: EditConfig):
        from cfgen.metrics.selection import sweep_selection

        return sweep_selection(config, self._load_classifier if self.classifier_uri else None)

    def _load_classifier(self):
        if self._classifier is None:
            from cfgen.classify.store import load_classifier

            self._classifier = load_classifier(self.classifier_uri, self.job.storage, self.job.tracking,
                                               device=self.device)
        return self._classifier

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = tensor_column(batch, "image")
        meta = batch.drop_columns(["image"])
        rows = meta.to_pylist()
        groups: dict[tuple, list[int]] = {}
        units_of: dict[tuple, dict[int, list[dict]]] = {}
        for i, row in enumerate(rows):
            by_rule_seed: dict[tuple, list[dict]] = {}
            for unit in self.units.get(str(row["image_id"]), []):
                by_rule_seed.setdefault((unit["rule"], int(unit["seed"])), []).append(unit)
            for (rule, seed), units in by_rule_seed.items():
                names = tuple(sorted(u["edit_name"] for u in units))
                group = (rule, seed, names)
                groups.setdefault(group, []).append(i)
                units_of.setdefault(group, {})[i] = sorted(units, key=lambda u: u["edit_name"])
        tables = []
        for group, members in groups.items():
            rule, seed, _ = group
            edits = [json.loads(u["edit"]) for u in units_of[group][members[0]]]
            keys = [[u["key"] for u in units_of[group][i]] for i in members]
            try:
                tables.append(self._edit(meta, images, members, rule, seed, edits, keys))
            except Exception:  # noqa: BLE001 - isolate the image that fails, keep the rest
                for i, image_keys in zip(members, keys):
                    try:
                        tables.append(self._edit(meta, images, [i], rule, seed, edits, [image_keys]))
                    except Exception as err:  # noqa: BLE001
                        reason = f"{type(err).__name__}: {err}"[:2000]
                        tables.append(self._edit(meta, images, [i], rule, seed, edits, [image_keys], reason))
        return pa.concat_tables(tables, promote_options="permissive")

    def _edit(self, meta: pa.Table, images: np.ndarray, members: list[int], rule: str, seed: int,
              edits: list[dict[str, Any]], keys: list[list[str]], failure: str | None = None) -> pa.Table:
        """The rows of `members` x `edits`; with `failure` (the reason an edit raised), the same rows without
        editing: zero images, the reason in `failure_reason`, so every batch keeps one schema."""
        from cfgen.editing.engine import EngineResult, engine_options
        from cfgen.editing.padding import engine_call

        edit = self.rules[rule].model_copy(update={"edits": edits, "seed": seed})
        prompt: PromptConfig = self.job.data.prompt
        sub = meta.take(members)
        rows = sub.to_pylist()
        pixels = images[members]
        factual = [str(r["prompt"]) for r in rows]
        planned = [[planned_edit(r, f, e, edit, prompt) for r, f in zip(rows, factual)] for e in edits]
        cf_prompts = [[p.prompt for p in per_edit] for per_edit in planned]
        masks, confined = confinement_masks(rows, edit, self.job.data.decode, self.job.storage) \
            if edit.confine == "mask" and failure is None else (None, [False] * len(rows))  # a failure reads none
        options = dict(engine_options(edit), masks=masks, seeds=[edit_seed(r["image_id"], seed) for r in rows],
                       hold_prompts=edit_hold_prompts(rows, edits, edit, prompt) if failure is None else None)
        n, k = len(rows), len(edits)
        edit_images = engine_call(edit.batch_size if edit.pad_batches else None)
        if failure is None:
            result = edit_images(self.pipe, pixels, factual, cf_prompts, select=self._select(edit), **options)
        else:
            zeros = np.zeros(pixels.shape, dtype=np.float32)
            result = EngineResult(counterfactuals=[zeros] * k, null_edit=zeros, autoencoded=zeros,
                                  raw_counterfactuals=[zeros] * k, unet_forward=0.0, unet_backward=0.0,
                                  unet_forward_per_image=0, settings=[[{}] * n for _ in range(k)])
        out = sub.take(np.tile(np.arange(n), k))  # one row per (image, edit), metadata types kept
        extra: dict[str, Any] = {}
        if self.job.metrics.reversibility and failure is None:
            # edit back: the counterfactual, edited with its own prompt as the factual one, back to the factual;
            # the way back has each row's own target, so the engine's default setting, not the selection
            # (the attributes held on the way there are held on the way back: from the edited row to the factual)
            backs = [edit_images(self.pipe, _to_uint8(cf), prompts, [factual], **{
                         **options, "hold_prompts": edit_hold_prompts(
                             _edited_rows(rows, per_edit), [[{a: r.get(a) for a in e} for r in rows]], edit, prompt)
                         if edit.hold else None})
                     for cf, prompts, per_edit, e in zip(result.counterfactuals, cf_prompts, planned, edits)]
            extra["edit_back"] = np.concatenate([_to_uint8(b.counterfactuals[0]) for b in backs])
        elif self.job.metrics.reversibility:
            extra["edit_back"] = np.zeros((n * k, *pixels.shape[1:]), dtype=np.uint8)
        added = typed_table({
            "key": [keys[i][e] for e in range(k) for i in range(n)],
            "rule": [rule] * (n * k),
            "image": np.tile(_to_uint8(as_unit_float(pixels)), (k, 1, 1)),
            "reconstruction": np.tile(_to_uint8(result.null_edit), (k, 1, 1)),
            "autoencoded": np.tile(_to_uint8(result.autoencoded), (k, 1, 1)),
            "counterfactual": np.concatenate([_to_uint8(c) for c in result.counterfactuals]),
            "edit": [json.dumps(e, sort_keys=True) for e in edits for _ in range(n)],
            "edit_name": [edit_name(e) for e in edits for _ in range(n)],
            "counterfactual_prompt": [p for prompts in cf_prompts for p in prompts],
            # the edit made to this row (a shift resolved: {"age": 73}); null where it could not be, with the reason
            "edit_applied": [p.applied for per_edit in planned for p in per_edit],
            "edit_error": [p.error for per_edit in planned for p in per_edit],
            "seed": np.full(n * k, seed, dtype=np.int64),
            "method": [edit.method] * (n * k),
            # the method and a hash of its pixel settings: rows of another setting in the same folder differ here
            "method_signature": [self.signatures.get(rule, "")] * (n * k),
            # the chosen sweep setting, e.g. {"self_replace": 0.6}; {} for a method without a sweep
            "edit_setting": [json.dumps(s, sort_keys=True) for per_edit in result.settings for s in per_edit],
            "composited": np.full(n * k, edit.composite),
            "confined": np.tile(np.asarray(confined, dtype=bool), k),
            "model_uri": [self.model_uri] * (n * k),
            "model_version": [self.model_version] * (n * k),
            "unet_evaluations": np.full(n * k, result.unet_forward_per_image, dtype=np.int64),
            "unet_forward": np.full(n * k, result.unet_forward, dtype=np.float64),
            "unet_backward": np.full(n * k, result.unet_backward, dtype=np.float64),
            "num_inference_steps": np.full(n * k, edit.num_inference_steps, dtype=np.int64),
            "guidance_scale": np.full(n * k, edit.guidance_scale, dtype=np.float64),
            "failure_stage": [None if failure is None else "edit"] * (n * k),
            "failure_reason": [failure] * (n * k),
            **extra,
        })
        return append_columns(out.drop_columns([c for c in added.column_names if c in out.column_names]), added)


#: The failures table: one row per key that has no counterfactual, with where and why.
FAILURE_SCHEMA = pa.schema([
    ("key", pa.string()), ("image_id", pa.string()), ("rule", pa.string()), ("edit_name", pa.string()),
    ("seed", pa.int64()), ("method", pa.string()), ("model_version", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()),
])


def _get_ref(ref):
    import ray

    return ray.get(ref)


@dataclass(frozen=True)
class PlannedEdit:
    prompt: str
    applied: str | None  # the resolved edit as JSON; None: not applied (the prompt is the factual one)
    error: str | None


def planned_edit(row: dict[str, Any], factual_prompt: str, edit: dict[str, Any], config: EditConfig,
                 prompt: PromptConfig) -> PlannedEdit:
    """One row's counterfactual prompt. An edit this row cannot take (an age shift of a missing or out-of-range
    age, a change its prompt cannot say: `unsaid_edit`) becomes a null edit of the factual prompt, recorded as not
    applied with the reason, so the batch goes on."""
    from cfgen.io.prompts import EditNotApplicable, resolve_edit, unsaid_edit

    try:
        resolved = resolve_edit(row, edit, config.age_range)
    except EditNotApplicable as err:
        return PlannedEdit(factual_prompt, None, str(err))
    edited = counterfactual_prompt(row, resolved, prompt)
    unsaid = unsaid_edit(row, resolved, factual_prompt, edited)
    if unsaid:
        return PlannedEdit(factual_prompt, None, unsaid)
    return PlannedEdit(edited, json.dumps(resolved, sort_keys=True), None)


def _edited_rows(rows: list[dict[str, Any]], planned: list[PlannedEdit]) -> list[dict[str, Any]]:
    """The rows as their counterfactuals describe them (a row whose edit was not applied as it was)."""
    from cfgen.io.prompts import apply_edit

    return [apply_edit(r, json.loads(p.applied)) if p.applied else r for r, p in zip(rows, planned)]


def edit_hold_prompts(rows: list[dict[str, Any]], edits: list[dict[str, Any] | list[dict[str, Any]]],
                      config: EditConfig, prompt: PromptConfig) -> list[list[list[str]]] | None:
    """The engine's `hold_prompts` [edit][held attribute][row] for `config.hold` (None when nothing is held); an
    edit is one for every row or a list of one per row."""
    from cfgen.io.prompts import hold_prompts

    if not config.hold:
        return None
    per_row = [e if isinstance(e, list) else [e] * len(rows) for e in edits]
    return [[list(concept) for concept in zip(*(hold_prompts(r, e, config.hold, prompt) for r, e in zip(rows, es)))]
            for es in per_row]


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
        output: OutputConfig | None = None,
        reversibility: bool = False,
    ):
        self.output_uri, self.storage, self.decode = output_uri, storage, decode
        self.output = output or OutputConfig()
        self.reversibility = reversibility
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
        failed = [bool(r.get("failure_reason")) for r in rows]
        metrics, cf_uris, panel_uris, changes, factual_uris, dicom_uris = [], [], [], [], [], []
        written: set[str] = set()
        blank = None
        for i, row in enumerate(rows):
            if failed[i]:
                if blank is None:
                    blank = {k: float("nan") for k in self._metric_names(factual[i])}
                metrics.append(blank)
                changes.append(float("nan"))
                cf_uris.append(None), panel_uris.append(None), factual_uris.append(None), dicom_uris.append(None)
                continue
            truth, changes_truth = self.truth(row)
            changes.append(changes_truth)
            m = edit_metrics(factual[i], cfs[i], truth, recons[i], autoencoded[i])
            m.update(image_metrics(factual[i], cfs[i], recons[i], None if backs is None else backs[i],
                                   self.region(row, factual[i], truth)))
            metrics.append(m)
            stem, folder = output_stem(row), _model_folder(row)
            cf_uris.append(join_uri(self.output_uri, "images", *folder, f"{stem}.png"))
            panel_uris.append(join_uri(self.output_uri, "panels", *folder, f"{stem}.png") if self.output.panels
                              else None)
            if self.output.png:
                write_bytes(cf_uris[-1], png_bytes(cfs[i]), self.storage)
            else:
                cf_uris[-1] = None
            # the image the engine edited, as it saw it: discovery subtracts it from the counterfactual
            factual_uris.append(join_uri(self.output_uri, "images", *folder,
                                         f"{_slug(str(row['image_id']))}__factual.png"))
            if factual_uris[-1] not in written:
                write_bytes(factual_uris[-1], png_bytes(factual[i]), self.storage)
                written.add(factual_uris[-1])
            if panel_uris[-1]:
                write_bytes(panel_uris[-1], png_bytes(panel(factual[i], cfs[i], truth)), self.storage)
            dicom_uris.append(self._write_dicom(row, cfs[i], stem, folder) if self.output.dicom else None)
        added: dict[str, Any] = {"counterfactual_uri": cf_uris, "factual_uri": factual_uris, "panel_uri": panel_uris,
                                 "dicom_uri": dicom_uris, "edit_changes_truth": np.array(changes, dtype=np.float64)}
        for name in metrics[0]:
            added[name] = np.array([m[name] for m in metrics], dtype=np.float64)
        if self.classifier is not None:
            before, after = self.classifier.predict(factual), self.classifier.predict(cfs)
            edits = [applied_edit(r) or json.loads(r["edit"]) for r in rows]
            state = np.array([self.factual_state(r) for r in rows], dtype=np.float64)
            cols, reasons = classifier_metrics(before, after, edits, state)
            for i, r in enumerate(rows):  # an edit not made is not scored as one
                if failed[i] or applied_edit(r) is None:
                    reasons[i] = r["failure_reason"] if failed[i] else f"edit_not_applied: {r.get('edit_error')}"
                    for c in CLASSIFIER_COLUMNS:
                        cols[c][i] = np.nan
            added.update({f"clf_{k}" if not k.startswith("p_") else k: v for k, v in cols.items()})
            added["factual_state"] = state
            added["metric_error"] = reasons
            added["factual_features"] = before["features"].astype(np.float32)
            added["counterfactual_features"] = after["features"].astype(np.float32)
        return append_columns(meta, typed_table(added))

    def _metric_names(self, image: np.ndarray) -> list[str]:
        """The metric columns a scored row has (a failed row gets them all as NaN, so batches share a schema)."""
        from cfgen.metrics.edit_report import image_metrics

        names = list(edit_metrics(image, image, image if self.scm is not None else None, image, image))
        return names + list(image_metrics(image, image, image, image if self.reversibility else None, None))

    def _write_dicom(self, row: dict[str, Any], counterfactual: np.ndarray, stem: str, folder: list[str]) -> str:
        from cfgen.io.derived import derived_dicom_for_row

        uri = join_uri(self.output_uri, "dicom", *folder, f"{stem}.dcm")
        write_bytes(uri, derived_dicom_for_row(row, counterfactual, self.output.pseudonym, self.storage),
                    self.storage)
        return uri


def output_stem(row: dict[str, Any]) -> str:
    """The file name (no extension) of one key's outputs: image, edit, method and seed; a plan that makes the
    same edit with two methods or seeds gets two files."""
    stem = f"{_slug(str(row['image_id']))}__{_slug(str(row['edit_name']))}"
    if row.get("method"):
        stem += f"__{_slug(str(row['method']))}"
    if row.get("seed") is not None:
        stem += f"__s{int(row['seed'])}"
    return stem


def _model_folder(row: dict[str, Any]) -> list[str]:
    """Outputs of each model version in their own folder, so a rerun with a new model never overwrites them."""
    return [_slug(str(row["model_version"]))] if row.get("model_version") else []


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


class CommitStage:
    """Ray Data task: commits a measured batch as keyed parts (`cfgen.pipeline.commit`): its counterfactual rows
    to `results/`, its failure rows to `failures/`. Returns only (key, failed) for the driver's progress."""

    def __init__(self, results_uri: str, failures_uri: str, storage: StorageConfig):
        self.results_uri, self.failures_uri, self.storage = results_uri, failures_uri, storage

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        from cfgen.pipeline.commit import write_part

        failed = pc.invert(pc.is_null(batch["failure_reason"]))
        ok = batch.filter(pc.invert(failed))
        bad = batch.filter(failed)
        write_part(ok.drop_columns(["failure_stage", "failure_reason"]), self.results_uri, self.storage)
        if bad.num_rows:
            write_part(_failure_table(bad.to_pylist(), stage_column="failure_stage",
                                      reason_column="failure_reason"), self.failures_uri, self.storage)
        return pa.table({"key": batch["key"], "failed": failed})


class FusedStage:
    """Ray Data actor: edits, measures and commits each batch in one process (`edit.stages: fused`).

    Where the editing actors have no GPU, every stage runs on the same CPUs anyway; keeping them in one actor
    saves each batch's images two trips through the object store and the job two more actor pools to start
    (each imports torch and loads its models). The stages are the same classes the separate pools run, called in
    turn, so both layouts write the same rows and files."""

    def __init__(self, editor: dict[str, Any], measure: dict[str, Any], commit: dict[str, Any],
                 editor_class: type | None = None):
        self.edit = (editor_class or CounterfactualStage)(**editor)
        self.measure = MeasureStage(**measure)
        self.commit = CommitStage(**commit)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.commit(self.measure(self.edit(batch)))


def stage_arguments(job: JobConfig, model_uri: str, out: str, units, model_version: str,
                    phantoms: PhantomConfig | None = None, classifier_uri: str | None = None) -> dict[str, dict]:
    """The constructor arguments of the editing, measuring and committing stages of a job writing into `out`:
    `FusedStage(**these)`, or each pool its own. `units`: the pending keys (a table, or a Ray reference to one)."""
    return {
        "editor": {"model_uri": model_uri, "job": job.model_dump(mode="python"), "units": units,
                   "classifier_uri": classifier_uri, "model_version": model_version},
        "measure": {"output_uri": out, "storage": job.storage, "decode": job.data.decode, "phantoms": phantoms,
                    "classifier_uri": classifier_uri if job.metrics.enabled else None, "tracking": job.tracking,
                    "output": job.edit.output, "reversibility": job.metrics.reversibility},
        "commit": {"results_uri": join_uri(out, "results"), "failures_uri": join_uri(out, "failures"),
                   "storage": job.storage},
    }


def fused_stages(edit: EditConfig) -> bool:
    """Whether the job runs `FusedStage` (one actor pool) or the editing, measuring and committing pools."""
    return edit.stages == "fused" or (edit.stages == "auto" and not edit.gpus_per_actor)


def _failure_table(rows: list[dict[str, Any]], stage_column: str, reason_column: str,
                   stage: str | None = None) -> pa.Table:
    return pa.Table.from_pylist([
        {"key": r["key"], "image_id": str(r["image_id"]), "rule": r.get("rule"), "edit_name": r.get("edit_name"),
         "seed": int(r["seed"]), "method": r.get("method"), "model_version": r.get("model_version"),
         "stage": stage or r.get(stage_column), "reason": r.get(reason_column)} for r in rows],
        schema=FAILURE_SCHEMA)


@dataclass
class GenerateResult:
    results_uri: str
    rows_written: int  # counterfactual rows committed by this run
    images_skipped: int  # images with every planned key already done before this run
    planned: int = 0
    done: int = 0
    failed: int = 0
    summary: dict[str, Any] | None = None
    keys_uri: str = ""  # this run's key table: results/ may also hold rows an earlier plan or setting wrote


def generate(
    job: JobConfig,
    model_uri: str,
    decoded_uri: str,
    splits: list[str] | None = ("test",),
    phantoms: PhantomConfig | None = None,
    classifier_uri: str | None = None,
    out_uri: str | None = None,
    editor: type = None,
) -> GenerateResult:
    """Every key of the job's edit plan (`cfgen.pipeline.plan`) over the decoded rows of `splits`, into `out_uri`
    (default `<output_uri>/generate`): `plan/keys.parquet` (what was planned), `results/` and `failures/` (keyed
    Parquet parts), `images/`, `panels/`, `dicom/` (per model version), `summary.json`.

    A rerun plans the same keys, skips every committed one (a failure too, unless `edit.retry_failed`) and ends
    with planned = done + failed. `classifier_uri` chooses the sweep methods' setting per image and, where
    metrics are on, scores every row. `editor`: the editing actor class (default `CounterfactualStage`; a
    subclass adds behaviour, e.g. the fault-injection tests')."""
    import pyarrow.dataset as pds
    import ray.data

    from cfgen.pipeline import commit
    from cfgen.pipeline.plan import (check_columns, chooser_id, expand, model_version, plan_summary, rules,
                                     unit_table)
    from cfgen.pipeline.progress import Progress

    edit = job.edit
    out = out_uri or join_uri(job.output_uri, "generate")
    results_uri, failures_uri = join_uri(out, "results"), join_uri(out, "failures")
    plan = rules(edit, job.data.prompt)
    fs, path = pyarrow_filesystem(decoded_uri, job.storage)
    decoded = pds.dataset(path, filesystem=fs, format="parquet")
    columns = decoded.schema.names
    check_columns(plan, columns)
    meta_columns = [c for c in columns if c not in ("image", "provenance") and not c.startswith("__")]
    meta = decoded.to_table(columns=meta_columns).to_pandas()
    version = model_version(model_uri, job)
    keys = expand(plan, meta, version, splits, chooser=chooser_id(classifier_uri, job, [r.config for r in plan]))
    keys_uri = join_uri(out, "plan", "keys.parquet")
    write_bytes(keys_uri, _parquet_bytes(pa.Table.from_pandas(keys, preserve_index=False)), job.storage)
    if edit.retry_failed:
        commit.remove_parts(failures_uri, job.storage)
    done_before = commit.committed_keys(results_uri, job.storage) & set(keys["key"])
    failed_before = commit.committed_keys(failures_uri, job.storage) & set(keys["key"])
    inputs_bad = keys[(keys["input_status"] != "ok") & ~keys["key"].isin(failed_before | done_before)]
    if len(inputs_bad):
        rows = inputs_bad.to_dict("records")
        commit.write_part(_failure_table(rows, "", "input_error", stage="input"), failures_uri, job.storage)
    pending = keys[(keys["input_status"] == "ok") & ~keys["key"].isin(done_before | failed_before)]
    fused = fused_stages(edit)
    progress = Progress(planned=len(keys), done=len(done_before), failed=len(failed_before) + len(inputs_bad),
                        every_s=edit.output.progress_every_s)
    progress.line("planned")
    images_skipped = int(keys.loc[keys["input_status"] == "ok", "image_id"].nunique()
                         - pending["image_id"].nunique())
    if len(pending):
        from cfgen.pipeline.row_groups import RowGroupSource, plan_row_group_reads

        keep = [c for c in columns if c not in ("provenance", "error_stage", "error_reason") and not c.startswith("__")]
        # only the row groups that hold a pending image, filtered to those images as they are read: a resume
        # reads what is left, and the driver's own listing of the files replaces Ray Data's footer readers
        reads = plan_row_group_reads(decoded.files, fs, pending["image_id"].unique().tolist(),
                                     max_rows_per_task=max(edit.batch_size, 1024))
        ds = ray.data.read_datasource(RowGroupSource(reads, fs, columns=keep))
        # one editing batch per block (streaming, no shuffle): a map task's output is one block, so without this a
        # decoded file read as one block would be committed only when all of it is edited, and a killed job would
        # lose everything since its start instead of one batch
        ds = ds.repartition(target_num_rows_per_block=edit.batch_size)
        units = unit_table(pending)
        stages = stage_arguments(job, model_uri, out, ray.put(units), version, phantoms, classifier_uri)
        editing = {"compute": ray.data.ActorPoolStrategy(size=edit.num_actors), "batch_size": edit.batch_size,
                   "num_cpus": edit.cpus_per_actor, "num_gpus": edit.gpus_per_actor or None,
                   "batch_format": "pyarrow"}
        if fused:
            committed = ds.map_batches(FusedStage, fn_constructor_kwargs={**stages, "editor_class": editor},
                                       **editing)
        else:
            cf = ds.map_batches(editor or CounterfactualStage, fn_constructor_kwargs=stages["editor"], **editing)
            measured = cf.map_batches(
                MeasureStage, fn_constructor_kwargs=stages["measure"],
                compute=ray.data.ActorPoolStrategy(size=1),
                batch_size=edit.batch_size * max(len(r.config.edits) for r in plan),
                num_cpus=job.metrics.cpus_per_actor,
                batch_format="pyarrow",
            )
            committed = measured.map_batches(
                CommitStage, fn_constructor_kwargs=stages["commit"],
                compute=ray.data.ActorPoolStrategy(size=1), batch_size=None, num_cpus=0.1, batch_format="pyarrow")
        for batch in committed.iter_batches(batch_format="pyarrow", batch_size=None):
            failed = int(sum(batch["failed"].to_pylist()))
            progress.update(done=batch.num_rows - failed, failed=failed)
    removed_done, done_keys = commit.deduplicate_keys(results_uri, job.storage)
    removed_failed, failed_keys = commit.deduplicate_keys(failures_uri, job.storage)
    removed = removed_done + removed_failed
    done_keys &= set(keys["key"])
    failed_keys &= set(keys["key"])
    summary = {
        "planned": int(len(keys)), "done": len(done_keys), "failed": len(failed_keys - done_keys),
        "missing": int(len(set(keys["key"]) - done_keys - failed_keys)),
        "done_before": len(done_before), "failed_before": len(failed_before),
        "written_this_run": len(done_keys - done_before), "duplicates_removed": int(removed),
        "model_uri": model_uri, "model_version": version, "plan": plan_summary(keys),
        "stages": "fused" if fused else "separate",
        "seconds": round(progress.elapsed, 3),
        "counterfactuals_per_s": round((len(done_keys - done_before)) / max(progress.elapsed, 1e-9), 4),
        "results_uri": results_uri, "failures_uri": failures_uri,
    }
    write_bytes(join_uri(out, "summary.json"), json.dumps(summary, indent=1).encode(), job.storage)
    progress.line("finished", force=True)
    if summary["missing"]:
        raise RuntimeError(f"generation ended with {summary['missing']} planned keys neither done nor failed "
                           f"(planned {summary['planned']}, done {summary['done']}, failed {summary['failed']}); "
                           f"rerun to finish them")
    return GenerateResult(results_uri, summary["written_this_run"], images_skipped, summary["planned"],
                          summary["done"], summary["failed"], summary, keys_uri)


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
