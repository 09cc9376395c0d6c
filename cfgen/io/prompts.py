"""Metadata to text, by versioned template (DESIGN.md §2).

A model is trained on one template, so templates are never edited in place: a new wording is a new version in
`TEMPLATES`. Template "v1" reads

    a chest x-ray of a 63 year old female patient, smoker, with support devices, without pleural effusion

Age and sex form the subject ("of a 63 year old female patient"; "of a patient" when both are unknown); the other
attributes follow in `PromptConfig.attributes` order. A missing value (None, NaN, pd.NA, blank, absent key) drops its
phrase entirely rather than being imputed; with nothing known the prompt is just "a chest x-ray".

Findings: 1 -> "with X", 0 -> "without X" (dropped when `PromptConfig.negatives == "omit"`), -1 (CheXpert's
uncertain) by `PromptConfig.uncertain`: "omit" (the config's default) drops it, "positive"/"negative" read it as
1/0, "uncertain" writes "with possible X". Smoking: "smoker" / "non-smoker" (a demographic fact, always stated).

Token alignment (needed to swap attention maps, Prompt-to-Prompt style): a binary edit of a known value changes one
whitespace token in place ("with" <-> "without", "smoker," <-> "non-smoker,"); an age or sex edit changes one word.
Alignment cannot hold when the factual value is missing (the counterfactual inserts the phrase at its canonical
position), when negatives are omitted, or when an uncertain value is omitted or written as "with possible X".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cfgen.config import PromptConfig
from cfgen.io.schema import FINDINGS, normalize_sex

__all__ = [
    "KNOWN_ATTRIBUTES",
    "BINARY_ATTRIBUTES",
    "FINDING_NAMES",
    "PromptTemplate",
    "TEMPLATES",
    "get_template",
    "build_prompt",
    "apply_edit",
    "resolve_edit",
    "is_shift",
    "EditNotApplicable",
    "counterfactual_prompt",
    "unsaid_edit",
    "check_hold",
    "hold_prompts",
    "batch_prompts",
]

KNOWN_ATTRIBUTES: tuple[str, ...] = ("sex", "age", "smoking", *FINDINGS)
BINARY_ATTRIBUTES: tuple[str, ...] = ("smoking", *FINDINGS)

#: The words a radiologist would use for each finding column.
FINDING_NAMES: dict[str, str] = {
    "no_finding": "normal findings",
    "enlarged_cardiomediastinum": "enlarged cardiomediastinum",
    "cardiomegaly": "cardiomegaly",
    "lung_opacity": "lung opacity",
    "lung_lesion": "lung lesion",
    "edema": "edema",
    "consolidation": "consolidation",
    "pneumonia": "pneumonia",
    "atelectasis": "atelectasis",
    "pneumothorax": "pneumothorax",
    "pleural_effusion": "pleural effusion",
    "pleural_other": "other pleural findings",
    "fracture": "fracture",
    "support_devices": "support devices",
}


@dataclass(frozen=True)
class PromptTemplate:
    """The wording of one template version. Every phrase of a binary attribute keeps its word count per value
    where alignment is promised ("with X" / "without X")."""

    version: str
    prefix: str = "a chest x-ray"
    subject: str = "of a {} patient"
    separator: str = ", "
    age: str = "{} year old"
    sexes: Mapping[str, str] = field(default_factory=lambda: {"F": "female", "M": "male"})
    positive: str = "with {}"
    negative: str = "without {}"
    uncertain: str = "with possible {}"
    smoking: Mapping[float, str] = field(
        default_factory=lambda: {1.0: "smoker", 0.0: "non-smoker", -1.0: "possible smoker"}
    )
    finding_names: Mapping[str, str] = field(default_factory=lambda: dict(FINDING_NAMES))


TEMPLATES: dict[str, PromptTemplate] = {"v1": PromptTemplate(version="v1")}


def get_template(version: str) -> PromptTemplate:
    try:
        return TEMPLATES[version]
    except KeyError:
        raise ValueError(f"prompt template {version!r} is unknown; known: {sorted(TEMPLATES)}") from None


# ------------------------------------------------------------------------------------------------------ values
def _get(row: Any, name: str) -> Any:
    """A value from a dict, a pandas row, or a Ray/pyarrow row; absent means missing."""
    try:
        return row.get(name) if hasattr(row, "get") else row[name]
    except (KeyError, IndexError):
        return None


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        return value.strip().lower() in ("", "nan", "none", "null", "<na>")
    return value is pd.NA or value is pd.NaT


def _number(name: str, value: Any) -> float | None:
    if _missing(value):
        return None
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a number") from None


def _label(name: str, value: Any) -> float | None:
    number = _number(name, value)
    if number is not None and number not in (1.0, 0.0, -1.0):
        raise ValueError(f"{name}: {value!r} is not one of 1, 0, -1 or missing")
    return number


def _sex(value: Any) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return normalize_sex(value)


#: The readers of metadata values, for code that decides on them as the prompts do (discovery's eligibility).
is_missing = _missing
label_value = _label
number_value = _number
sex_value = _sex


# ----------------------------------------------------------------------------------------------------- phrases
def _finding_phrase(name: str, value: float | None, template: PromptTemplate, cfg: PromptConfig) -> str | None:
    if value is None:
        return None
    if value == -1.0:
        if cfg.uncertain == "omit":
            return None
        if cfg.uncertain == "uncertain":
            return template.uncertain.format(template.finding_names[name])
        value = 1.0 if cfg.uncertain == "positive" else 0.0
    if value == 0.0 and cfg.negatives == "omit":
        return None
    return (template.positive if value == 1.0 else template.negative).format(template.finding_names[name])


def _smoking_phrase(value: float | None, template: PromptTemplate, cfg: PromptConfig) -> str | None:
    if value == -1.0:
        if cfg.uncertain == "omit":
            return None
        if cfg.uncertain != "uncertain":
            value = 1.0 if cfg.uncertain == "positive" else 0.0
    return None if value is None else template.smoking[value]


def _check_attributes(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in KNOWN_ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown prompt attributes {unknown}; known: {list(KNOWN_ATTRIBUTES)}")


def build_prompt(row: Any, cfg: PromptConfig | None = None) -> str:
    """The prompt for one image's metadata (see the module docstring for the wording)."""
    cfg = cfg or PromptConfig()
    template = get_template(cfg.template_version)
    _check_attributes(cfg.attributes)

    demographics = []
    if "age" in cfg.attributes:
        age = _number("age", _get(row, "age"))
        if age is not None:
            if age < 0:
                raise ValueError(f"age: {age} is negative")
            demographics.append(template.age.format(int(math.floor(age))))
    if "sex" in cfg.attributes:
        sex = _sex(_get(row, "sex"))
        if sex is not None:
            demographics.append(template.sexes[sex])

    phrases = []
    for name in cfg.attributes:
        if name in ("age", "sex"):
            continue
        if name == "smoking":
            phrase = _smoking_phrase(_label(name, _get(row, name)), template, cfg)
        else:
            phrase = _finding_phrase(name, _label(name, _get(row, name)), template, cfg)
        if phrase:
            phrases.append(phrase)

    if not demographics and not phrases:
        return template.prefix
    head = f"{template.prefix} {template.subject.format(' '.join(demographics)) if demographics else 'of a patient'}"
    return template.separator.join([head, *phrases])


# ------------------------------------------------------------------------------------------------------- edits
def _edit_value(name: str, value: Any) -> Any:
    if _missing(value):
        return None
    if name == "sex":
        sex = _sex(value)
        if sex is None:
            raise ValueError(f"edit sex={value!r}: give 'F'/'M' (or female/male)")
        return sex
    if name == "age":
        age = _number(name, value)
        if age < 0:
            raise ValueError(f"edit age={value!r}: age must be non-negative")
        return age
    number = _number(name, value)
    if number not in (0.0, 1.0):
        raise ValueError(f"edit {name}={value!r}: a binary attribute is set to 1 or 0")
    return number


class EditNotApplicable(ValueError):
    """The edit cannot be made to this row (a shift of a missing age, a shift out of range): a fact about the row,
    which the job records on the row, not a mistake in the config."""


def is_shift(value: Any) -> bool:
    """A relative edit of age: a signed number of years as text, "+10" or "-5" (do(age = age + 10))."""
    return isinstance(value, str) and value.strip()[:1] in ("+", "-")


def _shift_years(value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise ValueError(f"edit age={value!r}: a shift is a signed number of years, e.g. '+10'") from None


def resolve_edit(row: Any, edit: Mapping[str, Any], age_range: tuple[float, float] = (0, 120)) -> dict[str, Any]:
    """The edit with relative values made absolute for this row ({"age": "+10"} of a 63 year old ->
    {"age": 73}). A shift of a missing age, or one that leaves `age_range`, cannot be applied to this row: a
    `EditNotApplicable` that says why (callers turn it into a row that is not edited). Only age can shift."""
    if not isinstance(edit, Mapping) or not edit:
        raise ValueError(f"an edit is a non-empty mapping attribute -> value, got {edit!r}")
    out = dict(edit)
    for name, value in edit.items():
        if not is_shift(value):
            continue
        if name != "age":
            raise ValueError(f"edit {name}={value!r}: only age can be shifted; set {name} to 0 or 1")
        shift = _shift_years(value)
        age = _number("age", _get(row, "age"))
        if age is None:
            raise EditNotApplicable(f"edit age={value}: the factual age is missing")
        target = age + shift
        lo, hi = age_range
        if not lo <= target <= hi:
            raise EditNotApplicable(f"edit age={value}: {age:g} {value} = {target:g} is outside {lo:g}..{hi:g}")
        out[name] = int(target) if float(target).is_integer() else target
    return out


def _as_dict(row: Any) -> dict[str, Any]:
    """A copy of a row (dict, pandas or Ray/pyarrow row) as a plain dict."""
    return dict(row.items()) if hasattr(row, "items") else dict(row)


def apply_edit(row: Any, edit: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `row` as a dict with the intervention applied (shifts resolved against the row); unknown
    attribute names are a ValueError."""
    if not isinstance(edit, Mapping) or not edit:
        raise ValueError(f"an edit is a non-empty mapping attribute -> value, got {edit!r}")
    _check_attributes(list(edit))
    edit = resolve_edit(row, edit)
    edited = _as_dict(row)
    for name, value in edit.items():
        edited[name] = _edit_value(name, value)
    return edited


def counterfactual_prompt(row: Any, edit: Mapping[str, Any], cfg: PromptConfig | None = None) -> str:
    """The prompt of the edited metadata. An edited attribute the template does not describe is a ValueError:
    the edit would silently produce the factual prompt."""
    cfg = cfg or PromptConfig()
    silent = [name for name in edit if name in KNOWN_ATTRIBUTES and name not in cfg.attributes]
    if silent:
        raise ValueError(f"edit of {silent}: not in PromptConfig.attributes {list(cfg.attributes)}")
    return build_prompt(apply_edit(row, edit), cfg)


def _current_value(name: str, row: Any) -> Any:
    value = _get(row, name)
    if name == "sex":
        return _sex(value)
    return _number(name, value) if name == "age" else _label(name, value)


def unsaid_edit(row: Any, edit: Mapping[str, Any], factual_prompt: str, edited_prompt: str) -> str | None:
    """Why this row's prompt cannot say the (resolved) `edit`, or None when it can.

    The prompt is the only way an edit reaches the model. When the edited attribute is unknown or uncertain in the
    row and the template words the target value as it words an unknown one (captions that omit absent findings,
    `negatives: omit`), the counterfactual prompt comes out as the factual one: the edit would silently return the
    input. A row whose known value already is the target is a true null edit, and says nothing here."""
    if edited_prompt != factual_prompt:
        return None
    unsaid = [name for name, value in edit.items() if _current_value(name, row) != _edit_value(name, value)]
    if not unsaid:
        return None
    return (f"the prompt cannot say this edit: {', '.join(unsaid)} is unknown or uncertain in this row and the "
            f"template words the edited value as it words an unknown one (data.prompt negatives/uncertain: omit), "
            f"so the counterfactual prompt is the factual one")


def check_hold(hold: Sequence[str], cfg: PromptConfig) -> None:
    """Raise unless every held attribute is a binary one the template describes (only those can be changed in a
    prompt to read off the direction to hold)."""
    holdable = [a for a in cfg.attributes if a in BINARY_ATTRIBUTES]
    bad = [a for a in hold if a not in holdable]
    if bad:
        raise ValueError(f"edit.hold {bad}: only binary attributes the prompt template describes can be held: "
                         f"{holdable}")


def hold_prompts(row: Any, edit: Mapping[str, Any], hold: Sequence[str], cfg: PromptConfig | None = None) -> list[str]:
    """For an edit that must keep the attributes `hold` as they are: one prompt per held attribute the edit does not
    set itself (the same list for every row of one edit), the *counterfactual* prompt with that attribute changed
    from its factual value: 1 -> 0; 0, uncertain or missing -> 1. The engine reads the direction "this attribute
    changes too" off each and removes it from the edit (`cfgen.editing.ddpm_inversion`)."""
    cfg = cfg or PromptConfig()
    check_hold(hold, cfg)
    try:
        edited = apply_edit(row, edit)
    except EditNotApplicable:  # the row is not edited (its prompt stays factual), so nothing is held
        edited = _as_dict(row)
    out = []
    for name in hold:
        if name in edit:
            continue
        value = _label(name, _get(row, name))
        out.append(build_prompt({**edited, name: 0 if value == 1.0 else 1}, cfg))
    return out


def batch_prompts(batch: Any, cfg: PromptConfig | None = None) -> list[str]:
    """Prompts for a Ray Data batch: a dict of column arrays (numpy/pyarrow batch format) or a pandas DataFrame."""
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):
        rows = batch.to_dict("records")
    else:
        columns = {k: list(v) for k, v in batch.items()}
        n = len(next(iter(columns.values()))) if columns else 0
        rows = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    return [build_prompt(row, cfg) for row in rows]
