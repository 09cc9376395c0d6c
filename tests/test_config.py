import pytest
from pydantic import ValidationError

from cfgen.config import JobConfig, load_config


def test_demo_config_loads_with_overrides(tmp_path):
    job = load_config("configs/demo.yaml", ["train.max_steps=7", "edit.edits=[{cardiomegaly: 1}]", "output_uri=x"])
    assert job.train.max_steps == 7
    assert job.edit.edits == [{"cardiomegaly": 1}]
    assert job.output_uri.startswith("/") and job.output_uri.endswith("/x")  # made absolute for Ray workers
    assert job.phantoms.n == 2000  # from the YAML, untouched


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_stpes: 3\n")
    with pytest.raises(ValidationError, match="max_stpes"):
        load_config(path)


def test_fp16_on_cpu_fails_early():
    with pytest.raises(ValidationError, match="fp16 needs a GPU"):
        load_config(None, ["train.precision=fp16"])


def test_override_without_equals_sign_is_explained():
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


def test_secrets_never_appear_in_dumps():
    job = JobConfig.model_validate({"storage": {"aws_access_key_id": "AKIAABCDEFGHIJKLMNOP",
                                                "aws_secret_access_key": "s3cr3t-value-never-logged"}})
    for text in (str(job), repr(job), job.model_dump_json()):
        assert "s3cr3t-value-never-logged" not in text
        assert "AKIAABCDEFGHIJKLMNOP" not in text
    assert job.storage.aws_secret_access_key.get_secret_value() == "s3cr3t-value-never-logged"


def test_mlflow_params_carry_the_config_but_no_secret():
    from cfgen.tracking.runs import flatten_config

    job = JobConfig.model_validate({"storage": {"endpoint_url": "http://127.0.0.1:9000",
                                                "aws_secret_access_key": "s3cr3t-value-never-logged"}})
    params = flatten_config(job)
    assert params["storage.endpoint_url"] == "http://127.0.0.1:9000"
    assert params["train.zero_stage"] == "2"
    assert not any("s3cr3t" in v for v in params.values())


def test_relative_sqlite_tracking_uri_is_made_absolute():
    job = load_config(None, ["tracking.tracking_uri=sqlite:///runs/x.db"])
    assert job.tracking.tracking_uri.startswith("sqlite:////") and job.tracking.tracking_uri.endswith("/runs/x.db")


def test_edit_description_names_the_settings_that_shape_the_output():
    from cfgen.config import EditConfig

    demo = load_config("configs/demo.yaml").edit
    assert demo.describe() == ("ddpm, 20 steps, guidance 1, skip 0, directed 1.5/2/3x (a sweep, one kept per image) "
                               "above the 0.9 quantile, composite True, change mask 0.5 grown to 0.25 (fill "
                               "composite), confine none")
    held = EditConfig(method="ddpm", hold=["support_devices"], change_threshold=0.5, change_fill="edited")
    assert "holding support_devices" in held.describe() and "fill edited" in held.describe()
    assert EditConfig(method="sdedit", strength=0.8).describe().startswith("sdedit, 20 steps, guidance 1, strength 0.8")
    assert "directed" not in EditConfig(method="ddpm").describe()
