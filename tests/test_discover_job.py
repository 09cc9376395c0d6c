"""`cfgen discover` end to end on local Ray: phantoms -> ingest -> generation per seed -> streamed analysis ->
tables, report and MLflow run; resumed without new work; and the errors a user meets before any editing."""

import json

import numpy as np
import pandas as pd
import pytest

from cfgen.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def discovered(tmp_path_factory, ray_local):
    import torch

    from cfgen.classify.network import AttributeClassifier, network_config
    from cfgen.classify.store import save_classifier
    from cfgen.config import ClassifierConfig
    from cfgen.models.sd import build_tiny_pipeline, save_pipeline
    from cfgen.pipeline.discover import run_discover
    from cfgen.pipeline.ingest import ingest
    from cfgen.pipeline.workflows import run_phantoms

    root = tmp_path_factory.mktemp("discover")
    torch.manual_seed(0)
    attributes = ["support_devices", "smoking", "age"]
    save_classifier(AttributeClassifier(network_config(ClassifierConfig(
        attributes=attributes, init_features=8, growth_rate=4, block_config=[2, 2], image_size=32))),
        str(root / "clf"))
    job = load_config("configs/demo.yaml", [
        f"output_uri={root}/run", f"tracking.tracking_uri=sqlite:///{root}/m.db", "phantoms.n=48",
        f"model.pretrained={root}/sd", f"classifier.pretrained={root}/clf", f"classifier.attributes={attributes}",
        "edit.method=ddim", "edit.edit_guidance=1", "edit.edit_threshold=0",  # the demo edits directed (ddpm only)
        "discovery.edit={}",  # and discovers at 3x
        "edit.num_inference_steps=2", "edit.batch_size=8", "edit.age_range=[20, 90]",
        "discovery.interventions=[{smoking: 1}, {age: {shift: 30}}]", "discovery.null_controls=[{support_devices: 1}]",
        "discovery.splits=[train, validate, test]", "discovery.seeds=[0, 1]", "discovery.limit=16",
        "discovery.min_subjects=3", "discovery.bootstrap=200", "discovery.examples=2"])
    save_pipeline(build_tiny_pipeline(job.model, seed=0), str(root / "sd"))
    job.data.manifest_uri = run_phantoms(job)["manifest_parquet"]
    decoded = ingest(job).decoded_uri
    return job, decoded, run_discover(job, decoded)


def test_discover_writes_one_region_row_per_intervention_and_region(discovered):
    from cfgen.discovery.analysis import region_names

    job, _, out = discovered
    regions = pd.read_parquet(out["regions_uri"])
    names = region_names(job.discovery)
    assert len(regions) == 3 * len(names)
    assert set(regions["intervention"]) == {"smoking=1", "age=+30", "support_devices=1"}
    assert regions.loc[regions["intervention"] == "support_devices=1", "null_control"].all()
    assert regions["unit"].tolist().count("per decade") == len(names)
    eligible = out["eligibility"]
    subjects = pd.read_parquet(f"{job.output_uri}/discover/subjects.parquet")
    smokers = eligible["smoking=1"].get("already smoking=1", 0)
    assert eligible["smoking=1"]["eligible_subjects"] == (subjects["edit_name"] == "smoking=1").sum() > 0
    assert smokers > 0 and (subjects.loc[subjects["edit_name"] == "smoking=1", "smoking"] == 0).all()
    assert (subjects["n_seeds"] == 2).all()  # both seeds of a subject averaged into one observation
    assert sum(v for k, v in eligible["age=+30"].items() if "outside 20..90" in k) > 0  # old subjects skipped
    tested = regions[regions["n"] >= job.discovery.min_subjects]
    assert tested["ci_low"].notna().all() and (tested["ci_low"] <= tested["mean_diff"]).all()
    assert (tested["mean_diff"] <= tested["ci_high"]).all() and tested["q_value"].between(0, 1).all()


def test_discover_writes_entanglement_report_and_an_mlflow_run(discovered):
    import mlflow

    job, _, out = discovered
    folder = f"{job.output_uri}/discover"
    entanglement = pd.read_csv(f"{folder}/entanglement.csv")
    assert len(entanglement) == 3 * 3  # interventions x classifier heads
    assert entanglement.loc[(entanglement["intervened"] == "smoking=1") & (entanglement["other"] == "smoking"),
                            "expected"].all()
    assert np.isfinite(entanglement["data_correlation"]).any()
    import re

    html = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", open(out["report"]).read())
    assert "smoking=1" in html and not re.search(r"\bnan\b", html.lower())  # NaN is printed as a dash
    summary = json.loads(open(f"{folder}/discovery.json").read())
    assert len(summary["regions"]) == len(pd.read_parquet(out["regions_uri"]))
    mlflow.set_tracking_uri(job.tracking.tracking_uri)
    run = mlflow.get_run(out["run_id"])
    assert "findings" in run.data.metrics and run.info.status == "FINISHED"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"], "discovery")}
    assert {"discovery/report.html", "discovery/regions.csv"} <= artifacts


def test_discover_again_edits_nothing_new(discovered):
    from cfgen.pipeline.discover import run_discover

    job, decoded, out = discovered
    results = pd.read_parquet(out["results_uri"])
    assert sorted(results["seed"].unique()) == [0, 1]
    again = run_discover(job, decoded)
    assert len(pd.read_parquet(again["results_uri"])) == len(results)
    pd.testing.assert_frame_equal(pd.read_parquet(again["regions_uri"]), pd.read_parquet(out["regions_uri"]))


def test_an_intervention_the_template_cannot_say_fails_before_editing(discovered):
    from cfgen.pipeline.discover import run_discover

    job, decoded, _ = discovered
    bad = job.model_copy(deep=True)
    bad.output_uri = job.output_uri + "-bad"
    bad.data.prompt.attributes = ["sex", "age"]
    with pytest.raises(ValueError, match="cannot be expressed"):
        run_discover(bad, decoded)
