"""A finished output is reused only with the settings it was made with (`cfgen.pipeline.reuse`)."""

import json

import pytest

from cfgen.config import JobConfig
from cfgen.pipeline.reuse import check_reuse, differences


def test_differences_name_the_settings_as_override_keys():
    recorded = {"data": {"prompt": {"negatives": "state"}, "decode": {"size": 64}}, "train": {"lr": 0.1}}
    current = {"data": {"prompt": {"negatives": "omit"}, "decode": {"size": 64}}, "train": {"lr": 0.1, "seed": 1}}
    assert differences(recorded, current) == ["data.prompt.negatives: 'state' -> 'omit'", "train.seed: None -> 1"]
    assert differences(recorded, recorded) == []


def test_other_settings_stop_with_the_differences_and_the_fix():
    with pytest.raises(ValueError, match=r"runs/x was made with other settings \(a: 1 -> 2\).*remove runs/x"):
        check_reuse("runs/x", {"a": 1}, {"a": 2}, unrecorded_ok=True)
    check_reuse("runs/x", {"a": 1}, {"a": 1}, unrecorded_ok=False)  # the same: reused
    check_reuse("runs/x", None, {"a": 1}, unrecorded_ok=True)  # older output: reused with a warning
    with pytest.raises(ValueError, match="older cfgen"):
        check_reuse("runs/x", None, {"a": 1}, unrecorded_ok=False)


def _trained(tmp_path, job: JobConfig, step: int, settings=None):
    from cfgen.pipeline.workflows import training_settings

    folder = tmp_path / "run" / "models"
    folder.mkdir(parents=True)
    record = {"model_uri": str(folder / "finetuned"), "metrics": {"step": step}}
    if settings != "none":
        record["settings"] = settings or training_settings(job)
    (folder / "finetuned.json").write_text(json.dumps(record))
    return record


def _job(tmp_path, **train):
    return JobConfig.model_validate({"output_uri": str(tmp_path / "run"), "train": {"max_steps": 10, **train}})


def test_a_finished_model_is_reused_only_by_the_config_that_trained_it(tmp_path):
    from cfgen.pipeline.workflows import run_train

    job = _job(tmp_path)
    record = _trained(tmp_path, job, step=10)
    assert run_train(job)["model_uri"] == record["model_uri"]  # the same settings: nothing to do
    with pytest.raises(ValueError, match=r"train.lr: 0.0001 -> 0.001"):
        run_train(_job(tmp_path, lr=0.001))
    with pytest.raises(ValueError, match=r"data.prompt.negatives: 'state' -> 'omit'"):
        run_train(job.model_copy(update={"data": job.data.model_copy(update={
            "prompt": job.data.prompt.model_copy(update={"negatives": "omit"})})}))


def test_training_on_from_a_model_whose_settings_were_not_recorded_is_refused(tmp_path):
    """The demo's old 300-step model under the new 1,200-step recipe: training on from its DeepSpeed checkpoint
    with other workers and a trained text encoder would fail deep inside DeepSpeed, or mix two recipes."""
    from cfgen.pipeline.workflows import run_train

    _trained(tmp_path, _job(tmp_path), step=5, settings="none")
    with pytest.raises(ValueError, match=f"older cfgen.*remove {tmp_path / 'run'} to redo"):
        run_train(_job(tmp_path))
    assert run_train(_job(tmp_path, max_steps=5))["metrics"]["step"] == 5  # finished: reused as it is


@pytest.mark.slow
def test_an_ingest_rerun_with_other_captions_stops_instead_of_reusing_the_old_ones(ray_local, tmp_path):
    from cfgen.config import PhantomConfig
    from cfgen.phantoms.writers import write_phantoms
    from cfgen.pipeline.ingest import ingest

    write_phantoms(PhantomConfig(n=12, size=64, seed=2), str(tmp_path / "ph"))
    job = JobConfig.model_validate({"output_uri": str(tmp_path / "out"),
                                    "data": {"manifest_uri": str(tmp_path / "ph" / "manifest.parquet")}})
    first = ingest(job)
    assert ingest(job.model_copy(update={"data": job.data.model_copy(update={"read_concurrency": 2})})) == first
    omit = job.data.model_copy(update={"prompt": job.data.prompt.model_copy(update={"negatives": "omit"})})
    with pytest.raises(ValueError, match=r"data.prompt.negatives: 'state' -> 'omit'.*remove"):
        ingest(job.model_copy(update={"data": omit}))


def test_a_job_after_the_demo_reads_the_demos_phantoms_and_so_reuses_its_ingest(tmp_path):
    """`cfgen generate --config configs/demo.yaml` after `make demo`: no manifest in the config, the demo's phantoms in
    the output. It used to stop at the demo's ingest, whose recorded settings name that manifest."""
    from cfgen.pipeline.ingest import ingest_settings
    from cfgen.pipeline.outputs import with_output_phantoms

    job = JobConfig.model_validate({"output_uri": str(tmp_path / "run")})
    assert with_output_phantoms(job) is job  # no phantoms there: the ingest says what is missing, as before
    manifest = tmp_path / "run" / "phantoms" / "manifest.parquet"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b"")
    demo = job.model_copy(deep=True)
    demo.data.manifest_uri = str(manifest)  # what the demo ingested with, and recorded
    resolved = with_output_phantoms(job)
    assert resolved.data.manifest_uri == str(manifest) and job.data.manifest_uri is None
    check_reuse("ingest", ingest_settings(demo), ingest_settings(resolved), unrecorded_ok=False)
    own = JobConfig.model_validate({"output_uri": str(tmp_path / "run"), "data": {"manifest_uri": "s3://b/m.csv"}})
    assert with_output_phantoms(own).data.manifest_uri == "s3://b/m.csv"  # a manifest of its own is kept
