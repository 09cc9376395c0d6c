"""The classify job on local Ray: phantoms -> ingest -> Ray Train (DDP, 2 workers) -> calibrated, evaluated,
registered classifier; and the early errors a user meets before any worker starts."""

import json

import numpy as np
import pytest

from cfgen.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory, ray_local):
    from cfgen.pipeline.ingest import ingest
    from cfgen.pipeline.workflows import run_phantoms

    root = tmp_path_factory.mktemp("classify")
    job = load_config("configs/demo.yaml", [f"output_uri={root}/run", f"tracking.tracking_uri=sqlite:///{root}/m.db",
                                            "phantoms.n=480", "classifier.train.epochs=4",
                                            "classifier.train.batch_size=24", "classifier.bootstrap=50"])
    job.data.manifest_uri = run_phantoms(job)["manifest_parquet"]
    return job, ingest(job).decoded_uri


def test_classifier_trains_on_ray_and_reads_the_device(phantom_set):
    from cfgen.classify.store import load_classifier
    from cfgen.pipeline.classify import run_classify

    job, decoded = phantom_set
    out = run_classify(job, decoded)
    evaluation = out["evaluation"]
    assert set(evaluation["attributes"]) == set(job.classifier.attributes)
    devices = evaluation["attributes"]["support_devices"]
    assert devices["auroc"] > 0.9 and devices["auroc_ci_low"] <= devices["auroc"] <= devices["auroc_ci_high"]
    assert 0 < evaluation["attributes"]["age"]["mae_years"] < 30
    assert evaluation["n_train"] + evaluation["n_validate"] + evaluation["n_test"] == 480
    assert all(0.05 <= c["temperature"] <= 20 for c in evaluation["calibration"].values())
    folder = out["classifier_uri"]
    stored = json.loads(open(f"{folder}/evaluation.json").read())
    assert stored["attributes"]["support_devices"]["auroc"] == pytest.approx(devices["auroc"])

    by_alias = load_classifier(out["registered"], tracking=job.tracking)
    local = load_classifier(folder)
    images = np.random.default_rng(0).integers(0, 255, (4, 64, 64), dtype=np.uint8)
    np.testing.assert_allclose(by_alias.predict(images)["support_devices"], local.predict(images)["support_devices"])
    assert run_classify(job, decoded)["run_id"] == out["run_id"]  # finished: reused, not retrained


def test_a_requested_attribute_without_labels_fails_before_training(phantom_set):
    from cfgen.pipeline.classify import run_classify

    job, decoded = phantom_set
    bad = job.model_copy(deep=True)
    bad.output_uri = job.output_uri + "-bad"
    bad.classifier.attributes = ["support_devices", "pneumothorax"]  # phantoms never label it
    with pytest.raises(ValueError, match="pneumothorax"):
        run_classify(bad, decoded)
