"""Discovery: regions, intervention plans, the region and entanglement tables, the streaming stage (no Ray here;
the job end to end is in test_discover_job.py)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cfgen.config import DiscoveryConfig, JobConfig, PhantomConfig, load_config
from cfgen.discovery.analysis import RegionStage, _Reduction, entanglement_table, region_names, region_table, \
    subject_table, summarize
from cfgen.discovery.plans import Intervention, plan
from cfgen.discovery.regions import lung_regions, region_masks, split_lungs
from cfgen.phantoms.scm import PhantomSCM


def _lungs(index=0, size=64):
    scm = PhantomSCM(PhantomConfig(n=10, size=size, seed=1))
    image, lungs = scm.render(scm.subject(index))
    return scm, image, lungs.astype(bool)


# ----------------------------------------------------------------------------------------------------- regions
def test_the_right_lung_is_on_the_image_left_and_its_zones_partition_it():
    _, _, lungs = _lungs()
    sides = split_lungs(lungs)
    cols = np.arange(lungs.shape[1])
    assert cols[sides["right_lung"].any(axis=0)].mean() < lungs.shape[1] / 2 < cols[sides["left_lung"].any(
        axis=0)].mean()
    regions = lung_regions(lungs)
    for side in ("right_lung", "left_lung"):
        parts = [regions[f"{side}_{z}"] for z in ("upper", "middle", "lower")]
        assert all(p.any() for p in parts)
        assert np.array_equal(parts[0] | parts[1] | parts[2], regions[side])
        assert not (parts[0] & parts[1]).any() and not (parts[1] & parts[2]).any()
        rows = [np.nonzero(p.any(axis=1))[0] for p in parts]
        assert rows[0].max() < rows[1].min() and rows[1].max() < rows[2].min()  # upper above middle above lower
    assert np.array_equal(regions["right_lung"] | regions["left_lung"], lungs)
    assert not (regions["outside_lungs"] & lungs).any() and regions["outside_lungs"].sum() > lungs.sum()


def test_a_lung_mask_in_one_piece_is_split_at_its_midline():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 3:17] = True
    sides = split_lungs(mask)
    assert sides["right_lung"].sum() == sides["left_lung"].sum() == 70


def test_a_mask_of_the_wrong_shape_is_an_error_that_names_it():
    with pytest.raises(ValueError, match="'heart' has shape"):
        region_masks({"lungs": np.ones((8, 8)), "heart": np.ones((4, 4))}, (8, 8))


# ------------------------------------------------------------------------------------------------------- plans
def test_plans_reject_what_the_template_cannot_say():
    with pytest.raises(ValueError, match="cannot edit 'weight'"):
        plan(JobConfig.model_validate({"discovery": {"interventions": [{"weight": 1}]}}))
    with pytest.raises(ValueError, match="cannot be expressed"):
        plan(JobConfig.model_validate({"data": {"prompt": {"attributes": ["sex", "age"]}},
                                       "discovery": {"interventions": [{"smoking": 1}]}}))
    with pytest.raises(ValueError, match="one attribute at a time"):
        plan(JobConfig.model_validate({"discovery": {"interventions": [{"smoking": 1, "cardiomegaly": 1}]}}))
    with pytest.raises(ValueError, match="only age can be shifted"):
        JobConfig.model_validate({"discovery": {"interventions": [{"smoking": {"shift": 1}}]}})


def test_an_age_shift_survives_yaml_and_is_reported_per_decade(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("discovery:\n  interventions:\n    - {age: {shift: 10}}\n    - {smoking: 1}\n"
                    "  null_controls:\n    - {age: '-5'}\n")
    interventions = plan(load_config(path))
    age, smoking, control = interventions
    assert (age.name, age.unit, age.units({"age": 40})) == ("age=+10", "per decade", 1.0)
    assert control.null_control and control.units({"age": 40}) == -0.5
    assert age.eligibility({"age": 85}, (20, 90)).endswith("outside 20..90")
    assert age.eligibility({"age": None}) == "age unknown"
    assert smoking.eligibility({"smoking": 1.0}) == "already smoking=1"
    assert smoking.eligibility({"smoking": -1.0}) == "smoking uncertain"
    assert smoking.eligibility({"smoking": 0}) is None and smoking.units({"smoking": 0}) == 1.0
    assert Intervention("smoking", 0).units({"smoking": 1}) == -1.0


def test_a_row_that_cannot_take_an_age_shift_is_a_null_edit_that_says_why():
    from cfgen.config import EditConfig, PromptConfig
    from cfgen.pipeline.generate import planned_edit

    edit = EditConfig(edits=[{"age": {"shift": 10}}], age_range=(20, 90))
    ok = planned_edit({"age": 50, "sex": "F"}, "factual", edit.edits[0], edit, PromptConfig())
    assert json.loads(ok.applied) == {"age": 60} and "60 year old" in ok.prompt and ok.error is None
    far = planned_edit({"age": 85, "sex": "F"}, "factual", edit.edits[0], edit, PromptConfig())
    assert (far.prompt, far.applied) == ("factual", None) and "outside 20..90" in far.error


# ------------------------------------------------------------------------------------------------------ tables
def _subjects(n=60, effect=0.05, seed=0):
    rng = np.random.default_rng(seed)
    config = DiscoveryConfig(bootstrap=500)
    rows = []
    for i in range(n):
        row = {"edit_name": "smoking=1", "image_id": f"s{i}", "units": 1.0, "smoking": 0}
        for r in region_names(config):
            inside = r.startswith(("lungs", "right_lung", "left_lung"))
            row[f"d__{r}"] = (effect if inside else 0.0) + rng.normal(0, 0.01)
            row[f"f__{r}"] = 0.3 + rng.normal(0, 0.02)
        row["p_before__smoking"], row["p_after__smoking"] = 0.1, 0.9
        row["p_before__support_devices"], row["p_after__support_devices"] = 0.2, 0.2 + rng.normal(0.3, 0.05)
        row["p_before__cardiomegaly"], row["p_after__cardiomegaly"] = 0.3, 0.3 + rng.normal(0, 0.05)
        rows.append(row)
    return config, pd.DataFrame(rows)


def test_the_region_table_flags_the_lungs_and_nothing_outside():
    config, subjects = _subjects()
    population = subjects.assign(smoking=[0, 1] * 30)
    population["f__lungs"] = 0.3 + 0.05 * population["smoking"] + np.random.default_rng(1).normal(0, 0.01, 60)
    table, notes = region_table(subjects, population, [Intervention("smoking", 1)], config)
    by = table.set_index("region")
    assert not notes
    assert by.loc["lungs", "flagged"] and by.loc["left_lung_lower", "flagged"]
    assert by.loc["lungs", "ci_low"] < 0.05 < by.loc["lungs", "ci_high"] and by.loc["lungs", "p_value"] < 1e-6
    assert by.loc["lungs", "per_unit"] == pytest.approx(by.loc["lungs", "mean_diff"])
    assert not by.loc["outside_lungs", "flagged"] and by.loc["outside_lungs", "p_value"] > 0.01
    assert by.loc["lungs", "obs_slope"] == pytest.approx(0.05, abs=0.01)  # the baseline across subjects
    assert by.loc["lungs", "test"] == "paired-t" and by.loc["lungs", "n"] == 60



def test_the_wilcoxon_region_table_ranks_every_subject_and_keeps_the_bootstrap_ci():
    """discovery.test: wilcoxon is the one statistic that keeps values while streaming: its p-value must be
    scipy's on all the subjects, and its CI the same as the t run's (the CI is of the mean either way)."""
    from scipy import stats as sps

    config, subjects = _subjects(effect=0.003, seed=4)
    ranked = config.model_copy(update={"test": "wilcoxon"})
    t_table, _ = region_table(subjects, subjects, [Intervention("smoking", 1)], config)
    w_table, _ = region_table(subjects, subjects, [Intervention("smoking", 1)], ranked)
    t, w = t_table.set_index("region").loc["lungs"], w_table.set_index("region").loc["lungs"]
    assert w["test"] == "wilcoxon-signed-rank" and w["n"] == 60
    assert w["p_value"] == pytest.approx(sps.wilcoxon(subjects["d__lungs"]).pvalue)
    assert w["p_value"] != pytest.approx(t["p_value"])
    assert (w["ci_low"], w["ci_high"]) == (t["ci_low"], t["ci_high"])

def test_a_small_effect_is_significant_but_not_a_finding_below_the_minimum_effect():
    # 0.004 everywhere in the lungs, n 60, noise 0.01: the CI excludes 0, but not the pre-set margin of 0.01
    config, subjects = _subjects(effect=0.004)
    table, notes = region_table(subjects, subjects, [Intervention("smoking", 1)], config)
    lungs = table.set_index("region").loc["lungs"]
    assert lungs["significant"] and not lungs["flagged"] and lungs["min_effect"] == 0.01
    assert lungs["ci_low"] > 0 and lungs["ci_high"] < 0.01
    assert any("not flagged" in n and "+/-0.01" in n for n in notes)
    bare, _ = region_table(subjects, subjects, [Intervention("smoking", 1)],
                           config.model_copy(update={"min_effect": 0}))
    assert bare.set_index("region").loc["lungs", "flagged"]  # margin 0: the bare CI test


def test_a_finding_must_clear_what_the_null_control_found_in_its_region():
    from cfgen.discovery.analysis import verdicts

    table = pd.DataFrame([
        {"intervention": "smoking=1", "region": "lungs", "null_control": False, "ci_low": 0.012, "ci_high": 0.02,
         "q_value": 1e-9},
        {"intervention": "smoking=1", "region": "heart", "null_control": False, "ci_low": 0.012, "ci_high": 0.02,
         "q_value": 1e-9},
        {"intervention": "sex=F", "region": "lungs", "null_control": True, "ci_low": -0.015, "ci_high": -0.011,
         "q_value": 1e-9},
    ])
    out = verdicts(table, alpha=0.05, min_effect=0.01).set_index(["intervention", "region"])
    # the null control moved the lungs by up to 0.015: a lung effect whose CI starts at 0.012 does not clear it
    assert not out.loc[("smoking=1", "lungs"), "flagged"] and out.loc[("smoking=1", "lungs"), "null_bound"] == 0.015
    assert out.loc[("smoking=1", "heart"), "flagged"]  # no null control there: the margin alone
    assert out.loc[("sex=F", "lungs"), "flagged"]  # the control itself is judged on the margin: a red warning


def test_too_few_subjects_is_a_note_not_a_nan_table():
    config, subjects = _subjects(n=4)
    table, notes = region_table(subjects, subjects, [Intervention("smoking", 1)], config)
    assert notes == ["smoking=1: 4 eligible subjects, fewer than discovery.min_subjects (10): no test"]
    assert table["reason"].str.startswith("too few subjects").all() and not table["flagged"].any()


def test_per_unit_turns_sign_for_an_intervention_that_removes_the_attribute():
    config, subjects = _subjects()
    subjects = subjects.assign(edit_name="smoking=0", units=-1.0)
    table, _ = region_table(subjects, subjects, [Intervention("smoking", 0)], config)
    lungs = table.set_index("region").loc["lungs"]
    assert lungs["per_unit"] == pytest.approx(-lungs["mean_diff"])
    assert lungs["per_unit_ci_low"] == pytest.approx(-lungs["ci_high"])


def test_entanglement_flags_an_unexpected_shift_and_not_the_intended_one():
    config, subjects = _subjects()
    corr = pd.DataFrame([[1.0, 0.4], [0.4, 1.0]], index=["smoking", "support_devices"],
                        columns=["smoking", "support_devices"])
    table = entanglement_table(subjects, [Intervention("smoking", 1)], corr, config).set_index("other")
    assert table.loc["smoking", "expected"] and not table.loc["smoking", "flagged"]
    assert table.loc["support_devices", "flagged"] and table.loc["support_devices", "data_correlation"] == 0.4
    assert not table.loc["cardiomegaly", "flagged"]  # no shift
    allowed = DiscoveryConfig(bootstrap=500, expected_effects={"smoking": ["support_devices"]})
    again = entanglement_table(subjects, [Intervention("smoking", 1)], corr, allowed).set_index("other")
    assert not again.loc["support_devices", "flagged"]


def test_a_subjects_seeds_are_averaged_into_one_observation():
    rows = [{"edit_name": "smoking=1", "image_id": "a", "seed": s, "units": 1.0, "d__lungs": v, "smoking": 0}
            for s, v in ((0, 0.1), (1, 0.3))]
    table = subject_table(rows)
    assert len(table) == 1 and table.loc[0, "d__lungs"] == pytest.approx(0.2) and table.loc[0, "n_seeds"] == 2



def test_a_spill_writes_a_record_batch_per_row_group_and_reads_back_filtered(tmp_path, monkeypatch):
    """Batches of a few rows are written as one record batch per SPILL_ROW_GROUP rows (not one per append, whose
    array headers would dwarf the numbers on every read), in both formats, and read back with a filter."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import cfgen.discovery.analysis as analysis

    monkeypatch.setattr(analysis, "SPILL_ROW_GROUP", 40)
    for fmt, name in (("ipc", "rows.arrow"), ("parquet", "rows.parquet")):
        spill = analysis._Spill(str(tmp_path / name), format=fmt)
        for start in range(0, 100, 10):
            spill.append({"edit_name": np.array(["a=1", "b=1"] * 5, dtype=object),
                          "x": np.arange(start, start + 10, dtype=float)})
        spill.close()
        if fmt == "ipc":  # 10 appends of 10 rows, flushed every 40
            assert [b.num_rows for b in spill.batches()] == [40, 40, 20]
            with pa.ipc.open_file(spill.files[0]) as reader:
                assert reader.num_record_batches == 3
        else:
            assert pq.ParquetFile(spill.files[0]).metadata.num_row_groups == 3
        only_a = spill.read(("edit_name", "a=1"))
        assert only_a["x"].tolist() == list(range(0, 100, 2)), fmt
        assert spill.read(("edit_name", "c=1")).empty


def test_a_large_spill_is_read_in_slices_that_keep_each_subjects_seeds_together(tmp_path, monkeypatch):
    """Summarising reads the spill a slice at a time (hash-partitioned by subject) once it exceeds GROUP_ROWS;
    the statistics must come out the same as from one read, and no subject's seeds may land in two slices."""
    import cfgen.discovery.analysis as analysis

    rng = np.random.default_rng(3)
    smoking = Intervention("smoking", 1)

    def filled(folder: str) -> _Reduction:
        reduction = _Reduction([smoking], DiscoveryConfig(interventions=[{"smoking": 1}], bootstrap=200),
                               folder=folder)
        for start in range(0, 600, 100):  # 300 subjects x 2 seeds, their two seeds in different batches
            ids = np.array([f"s{(start + k) % 300:03d}" for k in range(100)], dtype=object)
            d = rng.normal(0.05, 0.02, 100)
            reduction.rows.append({"edit_name": np.array(["smoking=1"] * 100, dtype=object), "image_id": ids,
                                   "seed": np.full(100, start // 300), "units": np.ones(100), "d__lungs": d,
                                   "smoking": np.zeros(100)})
            reduction.population_rows.append({"image_id": ids, "smoking": np.zeros(100),
                                              "f__lungs": rng.normal(0.5, 0.1, 100)})
        return reduction

    state = rng.bit_generator.state
    whole = summarize(filled(str(tmp_path / "whole")), pd.DataFrame())
    rng.bit_generator.state = state
    sliced_reduction = filled(str(tmp_path / "sliced"))
    seen = [frame["image_id"].unique() for frame in sliced_reduction.rows.groups(rows=64)]
    assert len(seen) >= 5 and sum(len(s) for s in seen) == 300  # several slices, every subject in exactly one
    monkeypatch.setattr(analysis, "GROUP_ROWS", 64)
    sliced = summarize(sliced_reduction, pd.DataFrame())
    assert list(Path(sliced_reduction.folder).glob("*.part*")) == []  # the slices' files are gone
    a = whole.regions.set_index("region").loc["lungs"]
    b = sliced.regions.set_index("region").loc["lungs"]
    assert a["n"] == b["n"] == 300
    for column in ("mean_diff", "ci_low", "ci_high", "p_value", "obs_slope"):
        assert b[column] == pytest.approx(a[column], nan_ok=True), column
    subjects = pd.read_parquet(sliced.subjects_path)
    assert len(subjects) == 300 and set(subjects["n_seeds"]) == {2}

# ------------------------------------------------------------------------------------------------------ stream
def test_the_region_stage_measures_a_true_smoking_counterfactual_inside_the_lungs_only(tmp_path):
    from PIL import Image

    from cfgen.pipeline.generate import png_bytes

    scm, image, lungs = _lungs(index=2)
    subject = scm.subject(2)
    truth, _ = scm.render(scm.intervene(subject, {"smoking": 1 - subject.smoking}))
    uris = {}
    for name, pixels in (("f", image), ("c", truth)):
        (tmp_path / f"{name}.png").write_bytes(png_bytes(pixels))
        uris[name] = str(tmp_path / f"{name}.png")
    Image.fromarray(lungs.astype(np.uint8) * 255).save(tmp_path / "lungs.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "small.png")
    job = JobConfig.model_validate({"data": {"decode": {"size": 64}}, "discovery": {"bootstrap": 500}})
    batch = {"image_id": np.array(["a", "b", "c"], dtype=object),
             "edit_name": np.array(["smoking=1"] * 3, dtype=object),
             "factual_uri": np.array([uris["f"]] * 3, dtype=object),
             "counterfactual_uri": np.array([uris["c"], str(tmp_path / "gone.png"), uris["c"]], dtype=object),
             "mask_uri": np.array([str(tmp_path / "lungs.png")] * 3, dtype=object),
             "smoking": np.array([0, 0, 1]), "seed": np.array([0, 0, 0]),
             "edit_applied": np.array(['{"smoking": 1}'] * 3, dtype=object)}
    stage = RegionStage(job.model_dump(mode="python"))
    out = stage(batch)
    sign = 1 if subject.smoking == 0 else -1
    shift = job.phantoms.effects.smoking_lung_shift
    assert out["d__lungs"][0] == pytest.approx(sign * shift, abs=0.01)
    assert abs(out["d__outside_lungs"][0]) < 1e-3
    assert out["read_error"][0] is None and "gone.png" in out["read_error"][1] and np.isnan(out["d__lungs"][1])

    # with the interventions, the stage reduces the batch itself: numbers and pixel accumulators, no images
    smoking = Intervention("smoking", 1)
    reduced = RegionStage(job.model_dump(mode="python"), [smoking])(batch)
    assert "diff" not in reduced and "factual" not in reduced
    assert list(reduced["skip_reason"]) == [None, "unreadable", "already smoking=1"]
    assert reduced["partial"][0] is not None and all(p is None for p in reduced["partial"][1:])

    reduction = _Reduction([smoking], job.discovery, folder=str(tmp_path / "spill"))
    reduction.add(reduced)
    assert len(reduction.subjects()) == 1
    assert reduction.ineligible == {"smoking=1": {"unreadable": 1, "already smoking=1": 1}}
    assert reduction.tests["smoking=1"].n == 1 and reduction.means["smoking=1"].n == 1
    assert reduction.means["smoking=1"].mean == pytest.approx(out["diff"][0])  # the one counted row's map
    assert sorted(reduction.population()["image_id"]) == ["a", "c"]  # every readable subject, eligible or not
    assert reduction.subjects().loc[0, "d__lungs"] == pytest.approx(out["d__lungs"][0])
    assert [e["image_id"] for e in reduction.examples["smoking=1"]] == ["a"]
    np.testing.assert_allclose(reduction.examples["smoking=1"][0]["counterfactual"],
                               out["factual"][0] + out["diff"][0])

    # a second batch of the same subjects: merged accumulators, one population row per subject
    reduction.add(RegionStage(job.model_dump(mode="python"), [smoking])(batch))
    assert reduction.means["smoking=1"].n == 2 and len(reduction.population()) == 2
    summary = summarize(reduction, pd.DataFrame())
    assert pd.read_parquet(summary.subjects_path)["n_seeds"].tolist() == [2]
    assert summary.eligibility["smoking=1"]["eligible_subjects"] == 1

    # Arrow hands a batch's column of nothing but missing reasons back as NaN: those rows count, none is a reason
    only_a = {k: v[:1] for k, v in reduced.items()}
    fresh = _Reduction([smoking], job.discovery, folder=str(tmp_path / "spill2"))
    fresh.add({**only_a, "skip_reason": np.array([np.nan], dtype=np.float32)})
    assert fresh.ineligible == {} and len(fresh.subjects()) == 1 and fresh.means["smoking=1"].n == 1


def test_other_edit_settings_or_another_model_never_reuse_generated_rows():
    from cfgen.pipeline.discover import generation_key

    job = JobConfig()
    key = generation_key(job, "m1")
    assert generation_key(job.model_copy(update={"edit": job.edit.model_copy(update={"seed": 3, "limit": 5})}),
                          "m1") == key  # per-row keys and scale-out do not change the pixels
    assert generation_key(job.model_copy(update={"edit": job.edit.model_copy(update={"guidance_scale": 3.0})}),
                          "m1") != key
    assert generation_key(job, "m2") != key
    limited = job.model_copy(update={"discovery": job.discovery.model_copy(update={"limit": 50})})
    assert generation_key(limited, "m1") != key  # the analysis reads the whole folder: 50 subjects, not 100
    sweep = JobConfig.model_validate({"edit": {"method": "ddpm", "edit_guidance": [1.5, 3.0]},
                                      "classifier": {"pretrained": "models:/clf@a"}})
    assert generation_key(sweep, "m1") != generation_key(  # another classifier chooses other candidates
        sweep.model_copy(update={"classifier": sweep.classifier.model_copy(update={"pretrained": "models:/clf@b"})}),
        "m1")


def test_discovery_says_when_the_classifier_chose_the_edit_strength_it_measures_entanglement_at():
    from cfgen.config import JobConfig
    from cfgen.pipeline.discover import selection_notes

    def job(edit, classifier="runs/clf"):
        return JobConfig.model_validate({"edit": {"method": "ddpm", "edit_threshold": 0.9, **edit},
                                         "classifier": {"pretrained": classifier}})

    (note,) = selection_notes(job({"edit_guidance": [1.5, 3.0]}))
    assert "2 settings" in note and "least change" in note and "stronger edit" in note
    assert selection_notes(job({"edit_guidance": 3.0})) == []  # one setting: nothing chosen
    assert selection_notes(job({"edit_guidance": [1.5, 3.0]}, classifier=None)) == []  # the smallest scale, always


def test_discovery_says_its_figures_are_direct_effects_where_the_attribute_causes_others():
    from cfgen.config import JobConfig
    from cfgen.discovery.plans import Intervention
    from cfgen.pipeline.discover import estimand_notes

    job = JobConfig.model_validate({"discovery": {"expected_effects": {"pleural_effusion": ["support_devices"]}}})
    age, sex = Intervention("age", "+10", per=10.0), Intervention("sex", "F")
    effusion, smoking = Intervention("pleural_effusion", 1), Intervention("smoking", 1)
    notes = estimand_notes(job, [age, sex, effusion, smoking, Intervention("smoking", 1, null_control=True)])
    assert len(notes) == 3  # smoking causes nothing listed, and a null control's size is 0 either way
    assert notes[0].startswith("age=+10:") and "direct effect" in notes[0] and "expected_effects" in notes[0]
    assert notes[1].startswith("sex=F:")
    assert notes[2].startswith("pleural_effusion=1:") and "support_devices stay as stated" in notes[2]


def test_discovery_says_when_its_edits_are_confined_to_where_they_change_most():
    from cfgen.config import JobConfig
    from cfgen.pipeline.discover import localization_notes

    def job(**edit):
        return JobConfig.model_validate({"edit": {"method": "ddpm", **edit}})

    (note,) = localization_notes(job(edit_threshold=0.9, change_threshold=0.5))
    assert "edit.edit_threshold 0.9" in note and "edit.change_threshold 0.5" in note and "wrong sign" in note
    (note,) = localization_notes(job(confine="mask"))
    assert "edit.confine" in note and "threshold" not in note
    assert localization_notes(job()) == []  # unconfined: nothing to say


def test_discovery_edits_with_its_own_settings_over_the_generations():
    from cfgen.config import JobConfig

    job = JobConfig.model_validate({"edit": {"method": "ddpm", "edit_guidance": [1.5, 2.0, 3.0], "edit_threshold": 0.9},
                                    "discovery": {"edit": {"edit_guidance": 3}}})
    assert job.discovery_edit().edit_guidance == 3.0 and job.discovery_edit().edit_threshold == 0.9
    assert job.edit.edit_guidance == [1.5, 2.0, 3.0]  # the generation job's own settings are untouched
    assert JobConfig().discovery_edit() == JobConfig().edit
    with pytest.raises(ValueError, match="no valid edit section"):
        JobConfig.model_validate({"discovery": {"edit": {"edit_guidanc": 3}}}).discovery_edit()
    # another job's override of the edit section is no error until discovery runs with it (directed needs ddpm)
    other = JobConfig.model_validate({"edit": {"method": "ddim"}, "discovery": {"edit": {"edit_guidance": 3}}})
    with pytest.raises(ValueError, match=r"fit edit.method, or to \{\}"):
        other.discovery_edit()
