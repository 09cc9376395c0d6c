"""Edit plans: validation before any work, expansion into the key table, deterministic subsets, keyed parts."""

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cfgen.config import JobConfig, StorageConfig
from cfgen.pipeline import commit
from cfgen.pipeline.plan import check_columns, expand, image_rank, key_of, model_version, plan_summary, rules


def _meta(n=40):
    rng = np.random.default_rng(0)
    ages = rng.integers(20, 90, n).astype(float)
    ages[3] = np.nan
    return pd.DataFrame({
        "image_id": [f"img{i:03d}" for i in range(n)],
        "split": ["test" if i % 2 else "train" for i in range(n)],
        "status": ["ok"] * (n - 1) + ["error"],
        "error_stage": [None] * (n - 1) + ["decode"],
        "error_reason": [None] * (n - 1) + ["dicom: no pixel data"],
        "age": ages,
        "sex": ["F" if i % 3 else "M" for i in range(n)],
        "support_devices": [float(i % 3 == 0) for i in range(n)],
        "smoking": [np.nan if i % 5 == 0 else float((i // 2) % 2) for i in range(n)],
    })


def _job(plan=None, **edit):
    return JobConfig.model_validate({"edit": {**({"plan": plan} if plan is not None else {}), **edit}})


def test_without_a_plan_every_row_of_the_splits_gets_every_edit_at_the_seed():
    job = _job(edits=[{"support_devices": 0}, {"smoking": 1}], seed=3)
    keys = expand(rules(job.edit, job.data.prompt), _meta(), "v1", ["test"])
    assert len(keys) == 20 * 2 and set(keys["seed"]) == {3} and set(keys["rule"]) == {"all"}
    assert keys["key"].is_unique
    bad = keys[keys["input_status"] != "ok"]
    assert len(bad) == 2 and bad["input_error"].str.contains("no pixel data").all()  # planned, failing


def test_plan_rules_filter_on_metadata_and_expand_seeds():
    plan = [
        {"name": "remove-devices", "where": {"support_devices": 1}, "edits": [{"support_devices": 0}]},
        {"name": "smoker", "where": {"smoking": 0}, "edits": [{"smoking": 1}], "seeds": [0, 1],
         "settings": {"method": "ddim", "num_inference_steps": 5}},
        {"name": "older", "where": {"age": {"gt": 40}, "sex": ["F"]}, "edits": [{"age": {"shift": 10}}],
         "splits": ["train", "test"]},
    ]
    job = _job(plan)
    plan_rules = rules(job.edit, job.data.prompt)
    assert plan_rules[1].config.method == "ddim" and plan_rules[1].config.num_inference_steps == 5
    assert plan_rules[0].config.method == job.edit.method  # the edit section's own settings elsewhere
    meta = _meta()
    keys = expand(plan_rules, meta, "v1", ["test"])
    test = meta[meta.split == "test"]
    by = keys.groupby("rule").size().to_dict()
    assert by["remove-devices"] == int((test.support_devices == 1).sum())
    assert by["smoker"] == 2 * int((test.smoking == 0).sum())  # two seeds; missing smoking never matches
    older = meta[(meta.age > 40) & (meta.sex == "F")]  # both splits; the missing age is not "over 40"
    assert by["older"] == len(older) and "img003" not in set(keys[keys.rule == "older"].image_id)
    assert set(keys[keys.rule == "smoker"]["method"]) == {"ddim"}
    assert keys["key"].is_unique
    summary = plan_summary(keys)
    assert summary["keys"] == len(keys) and summary["by_rule"] == by


def test_limit_picks_the_same_images_whatever_the_row_order():
    job = _job(edits=[{"smoking": 1}], limit=7)
    meta = _meta()
    first = expand(rules(job.edit, job.data.prompt), meta, "v1", None)
    shuffled = expand(rules(job.edit, job.data.prompt), meta.sample(frac=1, random_state=3), "v1", None)
    assert len(first) == 7 and set(first.image_id) == set(shuffled.image_id)
    ranked = sorted(meta.image_id, key=lambda i: image_rank(i, "all"))[:7]
    assert set(first.image_id) == set(ranked)
    assert set(first.image_id) != set(meta.image_id[:7])  # not the manifest's first rows


def test_keys_are_stable_and_name_every_part_of_the_work():
    k = key_of("img1", "smoking=1", 0, "ddpm", "abc")
    assert k == key_of("img1", "smoking=1", 0, "ddpm", "abc") and len(k) == 24
    assert len({k, key_of("img1", "smoking=1", 1, "ddpm", "abc"), key_of("img1", "smoking=1", 0, "ddim", "abc"),
                key_of("img1", "smoking=1", 0, "ddpm", "abd"), key_of("img2", "smoking=1", 0, "ddpm", "abc")}) == 5


def test_the_key_names_every_setting_that_changes_pixels_and_the_classifier_that_chose_a_sweep():
    from cfgen.config import EditConfig
    from cfgen.pipeline.plan import method_signature

    base = EditConfig(method="ddpm", edit_guidance=3.0, edit_threshold=0.9)
    signature = method_signature(base)
    assert signature.startswith("ddpm/")
    for scale_out in ({"batch_size": 1}, {"num_actors": 4}, {"cpus_per_actor": 2}, {"limit": 5}, {"seed": 3},
                      {"edits": [{"smoking": 1}]}, {"retry_failed": True}, {"stages": "separate"}):
        assert method_signature(base.model_copy(update=scale_out)) == signature, scale_out
    for setting in ({"edit_guidance": 2.0}, {"num_inference_steps": 10}, {"composite": False},
                    {"change_threshold": 0.5}, {"hold": ["support_devices"]}):
        assert method_signature(base.model_copy(update=setting)) != signature, setting
    assert method_signature(base, chooser="clf-a") == signature  # one scale: nothing to choose
    sweep = base.model_copy(update={"edit_guidance": [1.5, 3.0]})
    assert method_signature(sweep, "clf-a") != method_signature(sweep, "clf-b") != method_signature(sweep)


def test_the_chooser_is_the_classifier_files_digest_where_a_rule_sweeps(tmp_path):
    from cfgen.config import EditConfig
    from cfgen.pipeline.plan import chooser_id

    job = JobConfig()
    (tmp_path / "config.json").write_text('{"temperature": 1.0}')
    one, sweep = EditConfig(), EditConfig(method="ddpm", edit_guidance=[1.5, 3.0])
    assert chooser_id(str(tmp_path), job, [one]) is None and chooser_id(None, job, [sweep]) is None
    before = chooser_id(str(tmp_path), job, [one, sweep])
    (tmp_path / "config.json").write_text('{"temperature": 2.0}')  # retrained into the same folder
    assert chooser_id(str(tmp_path), job, [sweep]) != before
    assert chooser_id("models:/cfgen-classifier@champion", job, [sweep]) == "models:/cfgen-classifier@champion"


@pytest.mark.parametrize("edit, match", [
    ({"weight": 1}, "cannot edit 'weight'"),
    ({"smoking": 2}, "set to 0 or 1"),
    ({"sex": "X"}, "'F' or 'M'"),
    ({"age": 300}, r"\[0, 120\]"),
])
def test_impossible_edits_fail_before_any_work(edit, match):
    job = _job([{"edits": [edit]}])
    with pytest.raises(ValueError, match=match):
        rules(job.edit, job.data.prompt)


def test_an_edit_the_template_cannot_say_and_a_filter_on_an_unknown_column_fail_early():
    job = JobConfig.model_validate({"data": {"prompt": {"attributes": ["sex", "age"]}},
                                    "edit": {"plan": [{"edits": [{"smoking": 1}]}]}})
    with pytest.raises(ValueError, match="cannot be expressed"):
        rules(job.edit, job.data.prompt)
    job = _job([{"where": {"weight": {"gt": 3}}, "edits": [{"smoking": 1}]}])
    with pytest.raises(ValueError, match=r"filters on \['weight'\]"):
        check_columns(rules(job.edit, job.data.prompt), _meta().columns)
    with pytest.raises(ValueError, match="not a valid edit section"):
        r = _job([{"edits": [{"smoking": 1}], "settings": {"method": "magic"}}])
        rules(r.edit, r.data.prompt)
    with pytest.raises(ValueError, match="operators are"):
        _job([{"where": {"age": {"older_than": 3}}, "edits": [{"smoking": 1}]}])
    with pytest.raises(ValueError, match="named 'a'"):
        r = _job([{"name": "a", "edits": [{"smoking": 1}]}, {"name": "a", "edits": [{"smoking": 0}]}])
        rules(r.edit, r.data.prompt)


def test_model_version_changes_with_the_weights_and_not_with_the_path(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "model_index.json").write_text('{"x": 1}')
        (tmp_path / name / "unet" / "w.safetensors").write_bytes(b"0" * 100)
    job = JobConfig()
    assert model_version(str(tmp_path / "a"), job) == model_version(str(tmp_path / "b"), job)
    (tmp_path / "b" / "unet" / "w.safetensors").write_bytes(b"0" * 101)
    assert model_version(str(tmp_path / "a"), job) != model_version(str(tmp_path / "b"), job)


# ------------------------------------------------------------------------------------------ keyed parts
def _table(keys, value=0):
    return pa.table({"key": keys, "value": [value] * len(keys)})


def test_a_part_is_named_by_its_keys_so_a_retried_batch_replaces_it(tmp_path):
    folder = str(tmp_path / "results")
    first = commit.write_part(_table(["b", "a"]), folder)
    again = commit.write_part(_table(["a", "b"], value=1), folder)
    assert first == again and len(commit.part_files(folder)) == 1
    assert commit.read_parts(folder)["value"].to_pylist() == [1, 1]
    assert commit.write_part(_table([]), folder) is None


def test_a_half_written_part_is_never_read_as_data(tmp_path):
    folder = tmp_path / "results"
    commit.write_part(_table(["a"]), str(folder))
    buf = io.BytesIO()
    pq.write_table(_table(["z"]), buf)
    (folder / ".tmp-part-killed.parquet").write_bytes(buf.getvalue()[:40])  # a writer killed mid-file
    assert commit.committed_keys(str(folder)) == {"a"}
    assert pd.read_parquet(folder)["key"].tolist() == ["a"]  # other readers skip it too
    assert commit.dataset(str(folder)).count_rows() == 1


def test_deduplicate_keeps_each_key_once_and_leaves_other_parts_alone(tmp_path):
    folder = str(tmp_path / "results")
    commit.write_part(_table(["a", "b"]), folder)
    commit.write_part(_table(["b", "c"], value=1), folder)
    untouched = commit.write_part(_table(["d"]), folder)
    assert commit.deduplicate(folder) == 1
    table = commit.read_parts(folder)
    assert sorted(table["key"].to_pylist()) == ["a", "b", "c", "d"]
    assert untouched in [("/" if not f.startswith("/") else "") + f for f in commit.part_files(folder)]
    assert commit.deduplicate(folder) == 0
    assert commit.deduplicate_keys(folder) == (0, {"a", "b", "c", "d"})  # the keys come with the pass
    assert commit.deduplicate_keys(str(tmp_path / "nothing")) == (0, set())


def test_parts_on_a_real_s3_server(s3_storage, bucket):
    folder = f"s3://{bucket}/gen/results"
    commit.write_part(_table(["a", "b"]), folder, s3_storage)
    commit.write_part(_table(["b", "c"]), folder, s3_storage)
    assert commit.committed_keys(folder, s3_storage) == {"a", "b", "c"}
    assert commit.deduplicate(folder, s3_storage) == 1
    assert sorted(commit.read_parts(folder, s3_storage)["key"].to_pylist()) == ["a", "b", "c"]
    assert isinstance(s3_storage, StorageConfig)


def test_the_stage_layout_is_fused_without_gpus_and_separate_with_them():
    from cfgen.config import EditConfig
    from cfgen.pipeline.generate import fused_stages

    assert fused_stages(EditConfig()) is True
    assert fused_stages(EditConfig(gpus_per_actor=1)) is False
    assert fused_stages(EditConfig(gpus_per_actor=1, stages="fused")) is True
    assert fused_stages(EditConfig(stages="separate")) is False
    with pytest.raises(ValueError):
        EditConfig(stages="pipelined")
