"""Intervention plans: which subjects get which do(), and how large a change of the attribute that is.

A plan is checked before any image is edited: an unknown attribute, an intervention on more than one attribute, or
one the prompt template cannot say is a ValueError that names the fix. Per subject, eligibility is a fact about the
row (a known factual value that differs from the target; an age shift that stays in range): an ineligible subject
is counted with its reason, never edited into a null edit that would dilute the estimate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cfgen.config import JobConfig
from cfgen.io.prompts import EditNotApplicable, is_missing, is_shift, label_value, number_value, resolve_edit, \
    sex_value


@dataclass(frozen=True)
class Intervention:
    """do(attribute = value) (or a shift of age) on a population; `null_control`: should change nothing."""

    attribute: str
    value: Any
    null_control: bool = False
    per: float = 1.0  # effect sizes are reported per this many units (10: per decade of age)

    @property
    def edit(self) -> dict[str, Any]:
        return {self.attribute: self.value}

    @property
    def name(self) -> str:
        from cfgen.pipeline.generate import edit_name

        return edit_name(self.edit)

    @property
    def unit(self) -> str:
        if self.attribute == "age":
            return "per decade" if self.per == 10 else f"per {self.per:g} years"
        return "per 1" if self.per == 1 else f"per {self.per:g}"

    def eligibility(self, row: Mapping[str, Any], age_range: tuple[float, float] = (0, 120)) -> str | None:
        """None when this subject can take the intervention, else why not."""
        factual = row.get(self.attribute)
        if is_missing(factual):
            return f"{self.attribute} unknown"
        if is_shift(self.value):
            try:
                resolve_edit(row, self.edit, age_range)
            except EditNotApplicable as err:
                return str(err)
            return None
        if self.attribute == "sex":
            return "already " + str(self.value) if sex_value(factual) == sex_value(self.value) else None
        if self.attribute == "age":
            return f"already {self.value:g}" if number_value("age", factual) == float(self.value) else None
        label = label_value(self.attribute, factual)
        if label not in (0.0, 1.0):
            return f"{self.attribute} uncertain"
        return f"already {self.attribute}={int(label)}" if label == float(self.value) else None

    def units(self, row: Mapping[str, Any]) -> float:
        """How many reporting units the attribute moves for this subject (signed): +1 for 0 -> 1, -1 for 1 -> 0,
        +1 for an age shift of +10 reported per decade."""
        if is_shift(self.value):
            return float(self.value) / self.per
        if self.attribute == "sex":
            return 1.0 if sex_value(self.value) == "M" else -1.0  # per unit of P(male), as the classifier reads sex
        if self.attribute == "age":
            return (float(self.value) - float(number_value("age", row.get("age")))) / self.per
        return (float(self.value) - float(label_value(self.attribute, row.get(self.attribute)))) / self.per


def _one(edit: Mapping[str, Any], null_control: bool, job: JobConfig) -> Intervention:
    if len(edit) != 1:
        raise ValueError(f"discovery intervenes on one attribute at a time, got {dict(edit)}: list each separately")
    ((attribute, value),) = edit.items()
    from cfgen.pipeline.plan import check_edit

    check_edit(edit, job.data.prompt)
    per = float(job.discovery.per_unit.get(attribute, 1.0))
    return Intervention(attribute, value, null_control, per)


def plan(job: JobConfig) -> list[Intervention]:
    """The interventions of `job.discovery`, validated against the prompt template."""
    d = job.discovery
    out = [_one(e, False, job) for e in d.interventions] + [_one(e, True, job) for e in d.null_controls]
    names = [i.name for i in out]
    if not out:
        raise ValueError("discovery.interventions is empty: nothing to discover")
    if len(set(names)) != len(names):
        raise ValueError(f"an intervention is listed twice: {names}")
    return out


def eligible_counts(interventions: Sequence[Intervention], rows: Sequence[Mapping[str, Any]],
                    age_range: tuple[float, float] = (0, 120)) -> dict[str, dict[str, int]]:
    """Per intervention: how many subjects are eligible and how many are not, by reason (for the report)."""
    from collections import Counter

    out = {}
    for i in interventions:
        reasons = Counter(i.eligibility(r, age_range) for r in rows)
        out[i.name] = {"eligible": reasons.pop(None, 0), **{str(k): v for k, v in reasons.items()}}
    return out
