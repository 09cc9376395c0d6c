"""Jobs after `make demo` use what the output folder holds where the config names nothing (`cfgen.pipeline.outputs`)."""

import json

from cfgen.config import JobConfig
from cfgen.pipeline.outputs import classifier_to_use, model_to_edit, with_output_models


def _job(tmp_path, **sections):
    return JobConfig.model_validate({"output_uri": str(tmp_path / "run"), **sections})


def _fine_tuned(tmp_path, base):
    models = tmp_path / "run" / "models"
    (models / "finetuned").mkdir(parents=True)
    (models / "finetuned" / "model_index.json").write_text("{}")
    (models / "finetuned.json").write_text(json.dumps({"settings": {"model": {"pretrained": base}}}))
    return str(models / "finetuned")


def test_an_editing_job_uses_the_model_its_config_trained_not_the_base_it_trained_from(tmp_path):
    base = str(tmp_path / "base")
    assert model_to_edit(_job(tmp_path)) is None  # nothing named, nothing trained: the job says so
    assert model_to_edit(_job(tmp_path, model={"pretrained": base})) == base  # nothing trained: the named model
    trained = _fine_tuned(tmp_path, base)
    # the config it was trained with names the base training started from: edit with what training made of it
    assert model_to_edit(_job(tmp_path, model={"pretrained": base})) == trained
    assert model_to_edit(_job(tmp_path)) == trained
    # a model named to edit with, other than that base, is what the user asked for
    named = "models:/cfgen-sd@champion"
    assert model_to_edit(_job(tmp_path, model={"pretrained": named})) == named


def test_a_fine_tuned_model_that_did_not_record_its_base_is_not_guessed_at(tmp_path, caplog):
    base = str(tmp_path / "base")
    _fine_tuned(tmp_path, base)
    (tmp_path / "run" / "models" / "finetuned.json").write_text(json.dumps({"model_uri": "x"}))  # before settings
    with caplog.at_level("WARNING", logger="cfgen"):
        assert model_to_edit(_job(tmp_path, model={"pretrained": base})) == base
    assert "before cfgen recorded" in caplog.text and "models/finetuned" in caplog.text


def test_an_editing_job_chooses_with_the_classifier_the_output_trained_unless_one_is_named(tmp_path):
    job = _job(tmp_path)
    assert classifier_to_use(job) is None and with_output_models(job) is job
    folder = tmp_path / "run" / "models" / "classifier"
    folder.mkdir(parents=True)
    assert classifier_to_use(job) is None  # a classifier still training (no registered.json) is not used
    (folder / "registered.json").write_text("{}")
    assert classifier_to_use(job) == str(folder)
    assert with_output_models(job).classifier.pretrained == str(folder) and job.classifier.pretrained is None
    named = _job(tmp_path, classifier={"pretrained": "models:/cfgen-classifier@champion"})
    assert classifier_to_use(named) == "models:/cfgen-classifier@champion"


def test_serve_loads_what_an_editing_job_of_its_config_would(tmp_path):
    from cfgen.serve.editor import model_reference

    assert model_reference(_job(tmp_path)) == "models:/cfgen-sd@champion"  # nothing here: the registry's alias
    trained = _fine_tuned(tmp_path, str(tmp_path / "base"))
    assert model_reference(_job(tmp_path, model={"pretrained": str(tmp_path / "base")})) == trained
    assert model_reference(_job(tmp_path, serve={"model_uri": "s3://b/sd"})) == "s3://b/sd"
