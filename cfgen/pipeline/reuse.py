"""Reusing a finished output only with the settings it was made with.

Ingest and training skip work their output folder already holds (a `_SUCCESS` marker, `finetuned.json`). A job
rerun into the same folder with other settings used to take that output as its own: a demo whose captions or
training recipe had changed reused the old captions and trained on from the old model's DeepSpeed checkpoint. The
markers now record the settings; a reuse whose settings differ stops with the differences and the fix."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: differences named as the config's override keys."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: recorded -> current' for every setting that differs."""
    a, b = flatten(recorded), flatten(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_reuse(folder: str, recorded: Mapping[str, Any] | None, current: Mapping[str, Any], *,
                unrecorded_ok: bool, redo: str | None = None) -> None:
    """Raise where `folder` was made with other settings than `current`. An output written before settings were
    recorded (`recorded` None) is reused with a warning where `unrecorded_ok`, and refused otherwise. `redo`: what
    to remove to redo it (default `folder`; a model's whole run folder, whose base model and latents share its
    settings)."""
    remedy = f"write to another output_uri, or remove {redo or folder} to redo it"
    if recorded is None:
        if unrecorded_ok:
            log.warning("%s was written by an older cfgen that did not record its settings: reused as it is", folder)
            return
        raise ValueError(f"{folder} was written by an older cfgen that did not record its settings, so it cannot "
                         f"be checked against this config: {remedy}")
    diff = differences(recorded, current)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ValueError(f"{folder} was made with other settings ({shown}): {remedy}")
