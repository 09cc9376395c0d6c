"""Edit plans expanded into the key table the generation job is counted against.

A key is one counterfactual: (image id, edit, seed, method, model version). The plan (`EditConfig.plan`, or the
edit section itself as one rule over every row) is checked before any work: an attribute the prompt template
cannot say, a value an attribute cannot take, a filter on a column the data does not have, or settings that are no
`EditConfig` are ValueErrors that say what to fix. Expansion happens on the driver from the decoded table's
metadata (no pixels read), so the job knows `planned` before the first image is edited; a row that failed to
decode is planned like any other and becomes a failure row with the decoder's reason, never a silent gap.

Subsets (`limit`) are chosen by a hash of the image id, not by file order, so two fresh runs edit the same images
and a subset is not biased towards whatever the manifest lists first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cfgen.config import EditConfig, JobConfig, PlanRule, PromptConfig
from cfgen.io.prompts import BINARY_ATTRIBUTES, KNOWN_ATTRIBUTES, check_hold, is_shift

#: Columns of the key table, in order.
KEY_COLUMNS = ("key", "image_id", "rule", "edit", "edit_name", "seed", "method", "method_signature",
               "model_version", "input_status", "input_error")


def edit_name(edit: Mapping[str, Any]) -> str:
    """A stable, path-safe name for an edit: {"support_devices": 0} -> "support_devices=0"."""
    return ",".join(f"{k}={edit[k]}" for k in sorted(edit))


def key_of(image_id: Any, edit: str, seed: int, method: str, model_version: str) -> str:
    """The key of one counterfactual (hex): equal keys are the same work, whichever run or rule planned it."""
    text = json.dumps([str(image_id), edit, int(seed), method, model_version])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


#: EditConfig fields that change no pixel of a counterfactual: the key's own parts (edits, seed), which rows are
#: planned (limit, plan), scale-out, resume and output options
NON_PIXEL_FIELDS = frozenset({"edits", "seed", "limit", "plan", "batch_size", "pad_batches", "num_actors",
                              "cpus_per_actor", "gpus_per_actor", "stages", "retry_failed", "output"})


def method_signature(config: EditConfig, chooser: str | None = None) -> str:
    """'<method>/<hash>' of every setting that decides a counterfactual's pixels (all but `NON_PIXEL_FIELDS`) and,
    where the method makes a sweep and `chooser` (the classifier's id) picks among it, of the chooser: the key's
    method part. A rerun into the same output with other settings or another classifier plans new keys beside
    the old rows instead of skipping them as done."""
    blob = {"settings": config.model_dump(mode="json", exclude=set(NON_PIXEL_FIELDS)),
            "chooser": chooser if config.sweep_size > 1 else None}
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.method}/{digest}"


def image_rank(image_id: Any, salt: str = "") -> int:
    """The deterministic order `limit` picks images in."""
    return int(hashlib.sha256(f"{salt}|{image_id}".encode()).hexdigest()[:15], 16)


def check_edit(edit: Mapping[str, Any], prompt: PromptConfig) -> None:
    """Raise if the prompt template cannot express `edit` or a value is impossible for its attribute."""
    for attribute, value in edit.items():
        if attribute not in KNOWN_ATTRIBUTES:
            raise ValueError(f"cannot edit {attribute!r}: known attributes are {list(KNOWN_ATTRIBUTES)}")
        if attribute not in prompt.attributes:
            raise ValueError(f"an edit of {attribute} cannot be expressed: the prompt template (data.prompt."
                             f"attributes {list(prompt.attributes)}) does not mention {attribute}, so the model "
                             "was never told about it")
        if is_shift(value) and attribute != "age":
            raise ValueError(f"{attribute}={value!r}: only age can be shifted")
        if attribute in BINARY_ATTRIBUTES and (isinstance(value, bool) or value not in (0, 1)):
            raise ValueError(f"{attribute}={value!r}: a binary attribute is set to 0 or 1")
        if attribute == "sex" and str(value).upper() not in ("F", "M"):
            raise ValueError(f"sex={value!r}: sex is set to 'F' or 'M'")
        if attribute == "age" and not is_shift(value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 120:
                raise ValueError(f"age={value!r}: an absolute age is a number of years in [0, 120] (a shift is "
                                 "{shift: 10})")


@dataclass(frozen=True)
class Rule:
    """A validated plan rule: its name, the EditConfig it edits with, and its selection."""

    name: str
    config: EditConfig
    rule: PlanRule


def rules(edit: EditConfig, prompt: PromptConfig) -> list[Rule]:
    """The plan's rules, each with its own EditConfig; without a plan, one rule: every row, `edits`, `seed`."""
    plan = edit.plan or [PlanRule(name="all", edits=edit.edits, seeds=[edit.seed], limit=edit.limit)]
    base = edit.model_dump(exclude={"plan"})
    out, names = [], set()
    for i, rule in enumerate(plan):
        name = rule.name or f"rule-{i}"
        if name in names:
            raise ValueError(f"two plan rules are named {name!r}")
        names.add(name)
        for e in rule.edits:
            check_edit(e, prompt)
        try:
            config = EditConfig.model_validate({**base, **rule.settings, "edits": rule.edits})
        except ValueError as err:
            raise ValueError(f"plan rule {name!r}: its settings are not a valid edit section: {err}") from None
        check_hold(config.hold, prompt)
        out.append(Rule(name, config, rule))
    return out


def check_columns(plan: Iterable[Rule], columns: Iterable[str]) -> None:
    """Raise if a rule filters on a column the decoded data does not have."""
    have = set(columns)
    for r in plan:
        missing = sorted(set(r.rule.where) - have - {"split"})
        if missing:
            raise ValueError(f"plan rule {r.name!r} filters on {missing}, which the data does not have; columns "
                             f"are {sorted(have)}")


def _numeric(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce")


def _condition(series: pd.Series, op: str, value: Any) -> np.ndarray:
    missing = series.isna() | series.astype(str).str.strip().str.lower().isin(["", "nan", "none", "null", "<na>"])
    if op == "missing":
        return (missing if value else ~missing).to_numpy()
    if op in ("gt", "ge", "lt", "le"):
        x = _numeric(series)
        ops = {"gt": x > value, "ge": x >= value, "lt": x < value, "le": x <= value}
        return (ops[op] & ~missing).fillna(False).to_numpy(dtype=bool)
    values = value if op == "in" else [value]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        hit = _numeric(series).isin([float(v) for v in values])
    else:
        hit = series.astype(str).str.strip().str.upper().isin([str(v).strip().upper() for v in values])
    hit = hit & ~missing
    return (~hit & ~missing).to_numpy() if op == "ne" else hit.to_numpy()


def matches(rule: PlanRule, meta: pd.DataFrame, splits: Iterable[str] | None) -> np.ndarray:
    """Which rows of `meta` a rule selects (its `splits`, else the job's; then every filter)."""
    keep = np.ones(len(meta), dtype=bool)
    chosen = rule.splits if rule.splits is not None else (list(splits) if splits else None)
    if chosen:
        keep &= meta["split"].isin(list(chosen)).to_numpy()
    for column, conds in rule.where.items():
        for op, value in conds.items():
            keep &= _condition(meta[column], op, value)
    return keep


def expand(plan: list[Rule], meta: pd.DataFrame, model_version: str,
           splits: Iterable[str] | None = ("test",), chooser: str | None = None) -> pd.DataFrame:
    """The key table: one row per (selected image, rule edit, seed). `meta` holds the decoded table's metadata
    (image_id, split, status, error_reason, and every filtered column). A key two rules both plan is kept once,
    under the first rule. The key's method part is the rule's `method_signature` (`chooser`: the id of the
    classifier that picks among a sweep's candidates)."""
    frames = []
    for r in plan:
        rows = meta[matches(r.rule, meta, splits)]
        if r.rule.limit is not None and len(rows) > r.rule.limit:
            ranks = np.array([image_rank(i, r.name) for i in rows["image_id"]])
            rows = rows.iloc[np.sort(np.argsort(ranks, kind="stable")[: r.rule.limit])]
        status = rows["status"].astype(str).to_numpy()
        errors = rows["error_reason"] if "error_reason" in rows else pd.Series([None] * len(rows))
        stage = rows["error_stage"] if "error_stage" in rows else pd.Series([None] * len(rows))
        reasons = [None if s == "ok" else f"input {st or 'decode'} failed: {e}"
                   for s, st, e in zip(status, stage.tolist(), errors.tolist())]
        signature = method_signature(r.config, chooser)
        for edit in r.config.edits:
            name = edit_name(edit)
            for seed in r.rule.seeds:
                frames.append(pd.DataFrame({
                    "image_id": rows["image_id"].astype(str).to_numpy(), "rule": r.name,
                    "edit": json.dumps(edit, sort_keys=True), "edit_name": name, "seed": int(seed),
                    "method": r.config.method, "model_version": model_version,
                    "input_status": status, "input_error": reasons, "method_signature": signature,
                }))
    keys = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=KEY_COLUMNS[1:])
    keys.insert(0, "key", [key_of(i, e, s, m, v) for i, e, s, m, v in
                           zip(keys["image_id"], keys["edit_name"], keys["seed"], keys["method_signature"],
                               keys["model_version"])])
    keys["seed"] = keys["seed"].astype("int64")
    return keys.drop_duplicates("key", keep="first").reset_index(drop=True)[list(KEY_COLUMNS)]


def chooser_id(classifier_uri: str | None, job: JobConfig, configs: Iterable[EditConfig]) -> str | None:
    """What identifies the classifier that picks among a sweep's candidates (`method_signature`'s chooser): its
    files' digest, so a classifier retrained into the same folder is another chooser, or a `models:/` URI as it
    is. None where no config sweeps or there is no classifier."""
    if not classifier_uri or all(c.sweep_size < 2 for c in configs):
        return None
    return classifier_uri if classifier_uri.startswith("models:/") else model_version(classifier_uri, job)


def model_version(model_uri: str, job: JobConfig) -> str:
    """A short id of the model's weights: every file's name and size and every JSON file's content (a weight
    change is a new version without reading gigabytes; `models:/` URIs are resolved before this)."""
    from cfgen.io.storage import fsspec_filesystem

    fs, root = fsspec_filesystem(model_uri, job.storage)
    digest = hashlib.sha256()
    for path in sorted(fs.find(root)):
        rel = path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/")) else path
        if rel.startswith(".") or "/." in rel:
            continue
        size = fs.size(path)
        digest.update(f"{rel}|{size}".encode())
        if rel.endswith(".json"):
            digest.update(fs.cat_file(path))
    return digest.hexdigest()[:12]


def plan_summary(keys: pd.DataFrame) -> dict[str, Any]:
    """Counts of the key table by rule, edit and input status (for logs and the summary)."""
    return {
        "keys": int(len(keys)), "images": int(keys["image_id"].nunique()) if len(keys) else 0,
        "by_rule": {str(k): int(v) for k, v in keys.groupby("rule").size().items()} if len(keys) else {},
        "by_edit": {str(k): int(v) for k, v in keys.groupby("edit_name").size().items()} if len(keys) else {},
        "input_errors": int((keys["input_status"] != "ok").sum()) if len(keys) else 0,
    }


#: The columns of the key table the editing actors receive.
UNIT_COLUMNS = ["key", "image_id", "rule", "edit", "edit_name", "seed", "method", "method_signature",
                "model_version"]


def unit_table(keys: pd.DataFrame):
    """The key table's rows as the editing stage takes them (a pyarrow table of `UNIT_COLUMNS`)."""
    import pyarrow as pa

    return pa.Table.from_pandas(keys[UNIT_COLUMNS], preserve_index=False)


def batch_units(job: JobConfig, rows: pd.DataFrame, model_version: str = ""):
    """Every key the plan gives these rows, whatever their split (for calling the editing stage directly)."""
    keys = expand(rules(job.edit, job.data.prompt), rows.assign(status=rows.get("status", "ok")), model_version,
                  None)
    return unit_table(keys)
