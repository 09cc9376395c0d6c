"""What a Serve replica does with edit requests: the batch job's engine, prompts and instrument, one image at a time
or a dynamic batch of them. No Ray, no HTTP: `cfgen.serve.deployment` wraps it, the tests and the load benchmark
call it directly too.

A request is an uploaded X-ray (already decoded to the model's size by `cfgen.serve.inputs`), the patient's known
metadata (the factual prompt; missing values are left out, as in training) and the attributes to set. Requests
that share a method and its settings are edited in one engine call; each keeps its own prompts and its own noise
seed (a hash of the image's bytes and the request's seed), so a counterfactual does not depend on what it was
batched with.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cfgen.config import EditConfig, JobConfig
from cfgen.pipeline.outputs import classifier_to_use, model_to_edit

log = logging.getLogger("cfgen.serve")


@dataclass
class EditItem:
    """One request, validated: the image [H,W] uint8 at the model's size and what to do with it."""

    image: np.ndarray
    factual: dict[str, Any]
    edit: dict[str, Any]
    method: str
    steps: int
    guidance: float
    seed: int = 0
    mask: np.ndarray | None = None
    digest: str = ""


@dataclass
class EditOutcome:
    counterfactual: np.ndarray  # float32 [H,W] in [0,1]
    factual_image: np.ndarray
    factual_prompt: str
    counterfactual_prompt: str
    edit_applied: dict[str, Any] | None
    edit_error: str | None
    unet_evaluations: int
    metrics: dict[str, Any] = field(default_factory=dict)
    setting: dict[str, Any] = field(default_factory=dict)  # the sweep setting kept ({} without a sweep)


def model_reference(job: JobConfig) -> str:
    """The model to serve: serve.model_uri, else the one an editing job of this config uses (the output's fine-tuned
    model, or model.pretrained: `cfgen.pipeline.outputs.model_to_edit`), else the registry alias."""
    return job.serve.model_uri or model_to_edit(job) or f"models:/{job.tracking.registered_model}@{job.tracking.alias}"


def resolve_model(job: JobConfig, uri: str | None = None) -> str:
    """The folder to load (`model_reference`); `models:/` URIs are downloaded from MLflow."""
    uri = uri or model_reference(job)
    if uri.startswith("models:/"):
        from cfgen.tracking.runs import download_model

        return download_model(job.tracking, uri)
    return uri


class Editor:
    """Holds the pipeline and the attribute classifier; `edit` takes a list of items and returns their outcomes
    (an item that cannot be edited gets its exception in its place, the others go on)."""

    def __init__(self, job: JobConfig):
        import torch

        from cfgen.io.prompts import check_hold
        from cfgen.models.sd import load_pipeline, pick_device
        from cfgen.pipeline.plan import model_version

        check_hold(job.edit.hold, job.data.prompt)  # a bad edit.hold fails the deployment, not every request
        self.job = job
        self.model_reference = model_reference(job)
        self.model_uri = resolve_model(job, self.model_reference)
        self.device = pick_device(job.model.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipe = load_pipeline(self.model_uri, job.storage, device=self.device, dtype=dtype)
        try:
            self.model_version = model_version(self.model_uri, job)
        except (OSError, ValueError):
            self.model_version = ""
        self.classifier = None
        classifier = classifier_to_use(job)  # named, else the one `make demo` trained into the output
        if classifier:
            from cfgen.classify.store import load_classifier

            self.classifier = load_classifier(classifier, job.storage, job.tracking, device=self.device)
        self._lock = threading.Lock()  # one engine call at a time per replica (the UNet is not re-entrant)

    # ---------------------------------------------------------------------------------------------- description
    def info(self) -> dict[str, Any]:
        from cfgen.editing.engine import METHODS
        from cfgen.io.prompts import BINARY_ATTRIBUTES

        attributes = {}
        for name in self.job.data.prompt.attributes:
            if name in BINARY_ATTRIBUTES:
                attributes[name] = {"type": "binary", "values": [0, 1]}
            elif name == "sex":
                attributes[name] = {"type": "category", "values": ["F", "M"]}
            elif name == "age":
                attributes[name] = {"type": "years", "range": list(self.job.edit.age_range),
                                    "shift": "{\"shift\": 10} adds 10 years"}
        s = self.job.serve
        return {
            "model_uri": self.model_reference,
            "model_version": self.model_version, "resolution": self.job.data.decode.size,
            "attributes": attributes, "methods": list(METHODS), "default_method": self.job.edit.method,
            "default_steps": self.job.edit.num_inference_steps, "default_guidance": self.job.edit.guidance_scale,
            "classifier": list(self.classifier.attributes) if self.classifier is not None else None,
            "limits": {"max_upload_mb": s.max_upload_mb, "max_pixels": s.max_pixels, "max_steps": s.max_steps,
                       "max_guidance": s.max_guidance, "max_edits": s.max_edits, "max_batch_size": s.max_batch_size,
                       "max_ongoing_requests": s.max_ongoing_requests},
        }

    # -------------------------------------------------------------------------------------------------- editing
    def edit(self, items: list[EditItem]) -> list[EditOutcome | Exception]:
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((item.method, item.steps, item.guidance, item.mask is not None), []).append(i)
        out: list[EditOutcome | Exception] = [None] * len(items)  # type: ignore[list-item]
        for (method, steps, guidance, masked), members in groups.items():
            try:
                results = self._edit_group([items[i] for i in members], method, steps, guidance, masked)
            except Exception:  # noqa: BLE001 - one bad item must not fail the batch: retry each alone
                results = []
                for i in members:
                    try:
                        results.extend(self._edit_group([items[i]], method, steps, guidance, masked))
                    except Exception as err:  # noqa: BLE001
                        log.warning("edit failed: %s", type(err).__name__)
                        results.append(err)
            for i, r in zip(members, results):
                out[i] = r
        return out

    def _edit_group(self, items: list[EditItem], method: str, steps: int, guidance: float, masked: bool):
        from cfgen.editing.engine import engine_options
        from cfgen.editing.padding import engine_call
        from cfgen.io.prompts import build_prompt
        from cfgen.metrics.image import as_unit_float
        from cfgen.metrics.selection import sweep_selection
        from cfgen.pipeline.generate import edit_hold_prompts, edit_seed, planned_edit

        base = self.job.edit.model_dump(exclude={"plan"})
        config = EditConfig.model_validate({**base, "method": method, "num_inference_steps": steps,
                                            "guidance_scale": guidance, "edits": [items[0].edit],
                                            "confine": "mask" if masked else "none"})
        prompt_cfg = self.job.data.prompt
        factual_prompts = [build_prompt(item.factual, prompt_cfg) for item in items]
        planned = [planned_edit(item.factual, p, item.edit, config, prompt_cfg)
                   for item, p in zip(items, factual_prompts)]
        images = np.stack([item.image for item in items])
        masks = np.stack([item.mask for item in items]).astype(np.float32) if masked else None
        seeds = [edit_seed(item.digest, item.seed) for item in items]  # the batch job's per-image seed
        options = dict(engine_options(config), masks=masks, seeds=seeds,
                       hold_prompts=edit_hold_prompts([item.factual for item in items],
                                                      [[item.edit for item in items]], config, prompt_cfg))
        with self._lock:
            edit_images = engine_call(self.job.serve.max_batch_size if config.pad_batches else None)
            result = edit_images(self.pipe, images, factual_prompts, [[p.prompt for p in planned]],
                                 select=sweep_selection(config, (lambda: self.classifier) if self.classifier else None),
                                 **options)
        cfs = result.counterfactuals[0]
        metrics = self._metrics(images, cfs, result.null_edit, items, planned)
        return [EditOutcome(
            counterfactual=cfs[i], factual_image=as_unit_float(images[i]), factual_prompt=factual_prompts[i],
            counterfactual_prompt=planned[i].prompt,
            edit_applied=json.loads(planned[i].applied) if planned[i].applied else None,
            edit_error=planned[i].error, unet_evaluations=result.unet_forward_per_image, metrics=metrics[i],
            setting=result.settings[0][i])
            for i in range(len(items))]

    def _metrics(self, images, cfs, null_edit, items, planned) -> list[dict[str, Any]]:
        """Per item: difference statistics, preservation (the null edit against the input) and, with the
        classifier, effectiveness (its reading of the edited attribute before and after)."""
        from cfgen.metrics.image import as_unit_float, preservation

        x = as_unit_float(images)
        out = []
        for i in range(len(items)):
            diff = cfs[i] - x[i]
            m: dict[str, Any] = {
                "difference": {"mean_abs": float(np.abs(diff).mean()), "max_abs": float(np.abs(diff).max()),
                               "mean": float(diff.mean()), "changed_fraction": float((np.abs(diff) > 2 / 255).mean())},
                "preservation": {k: float(v) for k, v in preservation(x[i], null_edit[i]).items()}
                if null_edit is not None else None,
            }
            out.append(m)
        if self.classifier is not None:
            before, after = self.classifier.predict(x), self.classifier.predict(cfs)
            for i, item in enumerate(items):
                effect = {}
                applied = json.loads(planned[i].applied) if planned[i].applied else {}
                for name in applied:
                    if name in before:
                        effect[name] = {"before": float(before[name][i]), "after": float(after[name][i]),
                                        "target": applied[name] if name != "sex" else applied[name]}
                out[i]["effectiveness"] = effect
                out[i]["classifier"] = {a: {"before": float(before[a][i]), "after": float(after[a][i])}
                                        for a in self.classifier.attributes}
        return out
