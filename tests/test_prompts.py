"""Prompts from metadata: wording, missing values, uncertain policies, token-aligned counterfactuals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cfgen.config import PromptConfig
from cfgen.io.prompts import TEMPLATES, apply_edit, batch_prompts, build_prompt, counterfactual_prompt

ROW = {"age": 63.0, "sex": "F", "smoking": 1.0, "support_devices": 1.0, "pleural_effusion": 0.0, "cardiomegaly": 1.0}
FULL = ("a chest x-ray of a 63 year old female patient, smoker, with support devices, without pleural effusion, "
        "with cardiomegaly")


def _diff(a: str, b: str) -> list[int]:
    ta, tb = a.split(), b.split()
    assert len(ta) == len(tb), (a, b)
    return [i for i, (x, y) in enumerate(zip(ta, tb)) if x != y]


def test_v1_wording():
    assert "v1" in TEMPLATES
    assert build_prompt(ROW, PromptConfig()) == FULL


def test_missing_values_are_left_out_not_imputed():
    row = dict(ROW, age=float("nan"), smoking=None, pleural_effusion=pd.NA)
    del row["cardiomegaly"]
    assert build_prompt(row, PromptConfig()) == "a chest x-ray of a female patient, with support devices"


def test_nothing_known_gives_the_bare_prompt():
    assert build_prompt({}, PromptConfig()) == "a chest x-ray"
    assert build_prompt({"sex": None, "age": np.nan, "cardiomegaly": ""}, PromptConfig()) == "a chest x-ray"


def test_only_findings_known():
    assert build_prompt({"cardiomegaly": 1.0}, PromptConfig()) == "a chest x-ray of a patient, with cardiomegaly"


def test_age_is_an_integer_and_sex_words():
    assert build_prompt({"age": 70.9, "sex": "Male"}, PromptConfig()) == "a chest x-ray of a 70 year old male patient"


def test_order_follows_config_attributes():
    cfg = PromptConfig(attributes=["cardiomegaly", "smoking", "sex", "enlarged_cardiomediastinum", "pleural_other"])
    row = {"sex": "M", "smoking": 0.0, "cardiomegaly": 1.0, "enlarged_cardiomediastinum": 0.0, "pleural_other": 1.0,
           "age": 50}  # age is not in the attributes: not described
    assert build_prompt(row, cfg) == ("a chest x-ray of a male patient, with cardiomegaly, non-smoker, "
                                      "without enlarged cardiomediastinum, with other pleural findings")


def test_negatives_omit():
    cfg = PromptConfig(negatives="omit")
    assert build_prompt(ROW, cfg) == ("a chest x-ray of a 63 year old female patient, smoker, with support devices, "
                                      "with cardiomegaly")


def test_an_edit_the_prompt_cannot_say_is_refused_with_the_reason_and_a_true_null_edit_is_not():
    from cfgen.config import EditConfig
    from cfgen.io.prompts import unsaid_edit
    from cfgen.pipeline.generate import planned_edit

    omit = PromptConfig(negatives="omit")
    unknown = {"age": 51, "sex": "F", "pleural_effusion": 1}  # devices missing from the metadata
    factual = build_prompt(unknown, omit)
    edit = EditConfig(edits=[{"support_devices": 0}])
    # captions that leave absent findings out say "no devices" as they say "devices unknown": nothing to edit with
    planned = planned_edit(unknown, factual, {"support_devices": 0}, edit, omit)
    assert (planned.prompt, planned.applied) == (factual, None)
    assert "support_devices is unknown or uncertain" in planned.error
    assert "support_devices is unknown" in unsaid_edit({**unknown, "support_devices": -1}, {"support_devices": 0},
                                                       factual, factual)
    # the same row, the finding added: the prompt says it, so the edit is made
    added = planned_edit(unknown, factual, {"support_devices": 1}, edit, omit)
    assert added.error is None and "with support devices" in added.prompt
    # with negatives worded, "without support devices" says the removal
    worded = PromptConfig()
    said = planned_edit(unknown, build_prompt(unknown, worded), {"support_devices": 0}, edit, worded)
    assert said.error is None and "without support devices" in said.prompt
    # a known 0 set to 0 is a true null edit: applied, nothing to report
    known = {**unknown, "support_devices": 0}
    null = planned_edit(known, build_prompt(known, omit), {"support_devices": 0}, edit, omit)
    assert null.error is None and null.applied is not None and null.prompt == build_prompt(known, omit)


@pytest.mark.parametrize(
    "policy, phrase",
    [("omit", None), ("positive", "with cardiomegaly"), ("negative", "without cardiomegaly"),
     ("uncertain", "with possible cardiomegaly")],
)
def test_uncertain_policies(policy, phrase):
    prompt = build_prompt({"sex": "F", "cardiomegaly": -1.0}, PromptConfig(uncertain=policy))
    expected = "a chest x-ray of a female patient" + (f", {phrase}" if phrase else "")
    assert prompt == expected


def test_uncertain_negative_with_negatives_omitted_is_dropped():
    cfg = PromptConfig(uncertain="negative", negatives="omit")
    assert build_prompt({"cardiomegaly": -1.0}, cfg) == "a chest x-ray"


def test_rows_from_pandas_pyarrow_and_numpy_batches_agree():
    frame = pd.DataFrame([ROW, {"age": None, "sex": None, "support_devices": 0.0}])
    from_pandas = [build_prompt(r, PromptConfig()) for _, r in frame.iterrows()]
    from_arrow = [build_prompt(r, PromptConfig()) for r in pa.Table.from_pandas(frame).to_pylist()]
    numpy_batch = {k: frame[k].to_numpy() for k in frame.columns}
    assert from_pandas == from_arrow == batch_prompts(numpy_batch, PromptConfig()) == batch_prompts(frame)
    assert from_pandas[0] == FULL
    assert from_pandas[1] == "a chest x-ray of a patient, without support devices"
    row = {k: np.float64(v) if isinstance(v, float) else np.str_(v) for k, v in ROW.items()}
    assert build_prompt(row, PromptConfig()) == FULL


@pytest.mark.parametrize(
    "edit, changed",
    [({"support_devices": 0}, ("with", "without")), ({"pleural_effusion": 1}, ("without", "with")),
     ({"smoking": 0}, ("smoker,", "non-smoker,")), ({"sex": "M"}, ("female", "male")), ({"age": 40}, ("63", "40"))],
)
def test_counterfactual_prompt_differs_in_exactly_one_token(edit, changed):
    factual = build_prompt(ROW, PromptConfig())
    counterfactual = counterfactual_prompt(ROW, edit, PromptConfig())
    positions = _diff(factual, counterfactual)
    assert len(positions) == 1
    i = positions[0]
    assert (factual.split()[i], counterfactual.split()[i]) == changed


def test_counterfactual_of_missing_value_inserts_at_canonical_position():
    row = dict(ROW, pleural_effusion=None)
    counterfactual = counterfactual_prompt(row, {"pleural_effusion": 1}, PromptConfig())
    assert counterfactual == FULL.replace("without pleural effusion", "with pleural effusion")


def test_apply_edit_copies_and_normalises():
    edited = apply_edit(pd.Series(ROW), {"sex": "male", "support_devices": True})
    assert edited["sex"] == "M" and edited["support_devices"] == 1.0
    assert ROW["sex"] == "F"


@pytest.mark.parametrize("edit", [{"pacemaker": 1}, {"Support Devices": 0}, {}])
def test_unknown_attribute_is_a_value_error(edit):
    with pytest.raises(ValueError):
        apply_edit(ROW, edit)


def test_bad_edit_values_are_value_errors():
    with pytest.raises(ValueError):
        apply_edit(ROW, {"support_devices": 2})
    with pytest.raises(ValueError):
        apply_edit(ROW, {"sex": "unknown-ish"})


def test_edit_of_an_attribute_the_template_does_not_describe_is_refused():
    with pytest.raises(ValueError, match="PromptConfig.attributes"):
        counterfactual_prompt(ROW, {"edema": 1}, PromptConfig())


def test_unknown_template_version_is_refused():
    with pytest.raises(ValueError, match="template"):
        build_prompt(ROW, PromptConfig(template_version="v999"))


def test_invalid_label_value_is_refused():
    with pytest.raises(ValueError):
        build_prompt({"cardiomegaly": 0.5}, PromptConfig())


def test_hold_prompts_change_each_held_attribute_the_edit_leaves_alone_in_the_counterfactual_prompt():
    from cfgen.io.prompts import hold_prompts

    cfg = PromptConfig(negatives="omit")
    row = dict(ROW, cardiomegaly=None)  # missing: held against being added
    held = hold_prompts(row, {"pleural_effusion": 1}, ["support_devices", "pleural_effusion", "cardiomegaly"], cfg)
    # the edit's own attribute is not held; devices 1 -> 0, cardiomegaly missing -> 1; the rest is the edited row
    assert held == ["a chest x-ray of a 63 year old female patient, smoker, with pleural effusion",
                    "a chest x-ray of a 63 year old female patient, smoker, with support devices, with pleural "
                    "effusion, with cardiomegaly"]
    assert hold_prompts(row, {"smoking": 0}, [], cfg) == []
    # an edit the row cannot take (a shift of a missing age) leaves the row factual: its held prompts are too
    assert hold_prompts(dict(row, age=None), {"age": "+10"}, ["support_devices"], cfg) == [
        "a chest x-ray of a female patient, smoker"]
    with pytest.raises(ValueError, match="only binary attributes"):
        hold_prompts(row, {"smoking": 0}, ["age"], cfg)
    with pytest.raises(ValueError, match="only binary attributes"):  # not in the template: nothing to change
        hold_prompts(row, {"smoking": 0}, ["edema"], cfg)
