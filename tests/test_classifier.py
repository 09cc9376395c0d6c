"""The attribute classifier as a unit: labels and their masks, the network, calibration, evaluation, its folder."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cfgen.classify.augment import random_rigid
from cfgen.classify.calibrate import calibrate, expected_calibration_error, fit_temperature
from cfgen.classify.evaluate import auroc, bootstrap_auroc, evaluate
from cfgen.classify.labels import label_targets, uncertain_policy
from cfgen.classify.network import AttributeClassifier, masked_loss, network_config
from cfgen.classify.store import load_classifier, save_classifier
from cfgen.classify.train import label_statistics
from cfgen.config import ClassifierConfig, PromptConfig, StorageConfig

SMALL = ClassifierConfig(attributes=["support_devices", "sex", "age"], init_features=8, growth_rate=4,
                         block_config=[2, 2], image_size=32)


def test_missing_and_uncertain_labels_are_masked_by_the_prompt_policy():
    rows = pd.DataFrame({"support_devices": [1.0, 0.0, -1.0, np.nan], "sex": ["M", "F", None, "M"],
                         "age": [63.0, np.nan, 40.0, 20.0]})
    attrs = ["support_devices", "sex", "age", "smoking"]
    targets, known = label_targets(rows, attrs, "mask")
    assert known[:, 0].tolist() == [True, True, False, False]
    assert targets[:2, 0].tolist() == [1.0, 0.0]
    assert targets[:, 1].tolist() == [1.0, 0.0, 0.0, 1.0] and known[:, 1].tolist() == [True, True, False, True]
    assert known[:, 2].tolist() == [True, False, True, True] and targets[0, 2] == 63.0
    assert not known[:, 3].any()  # a column the data lacks is unknown, not negative
    positive, known_p = label_targets(rows, attrs, "positive")
    assert known_p[2, 0] and positive[2, 0] == 1.0
    assert uncertain_policy(ClassifierConfig(), PromptConfig(uncertain="omit")) == "mask"
    assert uncertain_policy(ClassifierConfig(), PromptConfig(uncertain="negative")) == "negative"
    assert uncertain_policy(ClassifierConfig(uncertain="positive"), PromptConfig()) == "positive"


def test_an_attribute_the_data_cannot_teach_fails_before_training():
    labels = {"support_devices": np.array([1.0, 1.0, 1.0]), "sex": np.array(["M", "F", "M"]),
              "age": np.array([np.nan] * 3)}
    with pytest.raises(ValueError, match="support_devices: 3 known labels, 3 positive.*age: 0 known"):
        label_statistics(labels, SMALL, "mask")
    ok = label_statistics({"support_devices": np.array([1.0, 0, 0, 0, 0]), "sex": np.array(["M", "F"] * 2 + ["M"]),
                           "age": np.array([40.0, 50, 60, 70, 80])}, SMALL, "mask")
    assert ok["pos_weight"][0] == 4.0 and ok["age_mean"] == 60.0


def test_unknown_attribute_is_a_config_error():
    with pytest.raises(ValueError, match="distinct names"):
        ClassifierConfig(attributes=["pacemaker"])


def test_masked_loss_ignores_unknown_labels():
    model = AttributeClassifier(network_config(SMALL))
    logits = torch.zeros(2, 3)
    targets = torch.tensor([[1.0, 0.0, 55.0], [0.0, 1.0, 99.0]])
    known = torch.tensor([[True, True, True], [False, False, False]])
    loss = masked_loss(model, logits, targets, known, torch.ones(3))
    # BCE at logit 0 is log 2 for each known binary label; age z of 55 at mean 55 is 0
    assert loss.item() == pytest.approx(2 * math.log(2) / 3, rel=1e-5)
    changed = masked_loss(model, logits, targets.clone().index_fill_(0, torch.tensor([1]), 123.0), known,
                          torch.ones(3))
    assert changed.item() == pytest.approx(loss.item())


def test_augmentation_never_flips_laterality():
    x = torch.zeros(8, 1, 32, 32)
    x[:, :, 12:20, 22:28] = 1.0  # a "pacemaker" on the image right
    out = random_rigid(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    right, left = out[..., 16:].sum(dim=(1, 2, 3)), out[..., :16].sum(dim=(1, 2, 3))
    assert (right > 5 * left).all()
    assert not torch.equal(out[0], out[1])  # each image its own jitter


def test_temperature_scaling_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(float)
    assert fit_temperature(3.0 * z, y) == pytest.approx(3.0, rel=0.05)
    probs = 1 / (1 + np.exp(-3 * z))
    assert expected_calibration_error(probs, y) > expected_calibration_error(1 / (1 + np.exp(-z)), y) + 0.05
    assert expected_calibration_error(np.array([0.9, 0.9]), np.array([1.0, 1.0])) == pytest.approx(0.1)


def test_auroc_and_its_bootstrap_interval():
    y = np.array([0, 0, 1, 1] * 25, dtype=float)
    assert auroc(y * 0.8 + 0.1, y) == 1.0
    assert auroc(1 - y, y) == 0.0
    noisy = y + np.random.default_rng(0).normal(0, 0.7, len(y))
    value = auroc(noisy, y)
    lo, hi = bootstrap_auroc(noisy, y, 300)
    assert 0.5 < lo < value < hi <= 1.0
    assert math.isnan(auroc(np.ones(4), np.ones(4)))
    report = evaluate({"support_devices": y, "age": np.full(len(y), 50.0), "sex": y},
                      np.stack([y, np.full(len(y), 60.0), y], 1), np.ones((len(y), 3), bool),
                      ["support_devices", "age", "sex"], resamples=20)
    assert report["support_devices"]["auroc"] == 1.0 and report["age"]["mae_years"] == pytest.approx(10.0)


def _model():
    torch.manual_seed(0)
    return AttributeClassifier(network_config(SMALL, age_mean=50, age_sd=10)).eval()


def test_predict_gives_probabilities_years_and_features():
    model = _model()
    images = np.random.default_rng(0).integers(0, 255, (5, 48, 48), dtype=np.uint8)  # resized to 32 inside
    out = model.predict(images, batch_size=2)
    assert out["features"].shape == (5, model.feature_dim)
    assert ((out["support_devices"] > 0) & (out["support_devices"] < 1)).all()
    assert np.allclose(out["age"], out["age"])  # finite years, not probabilities
    model.temperature[0] = 100.0
    assert np.abs(model.predict(images)["support_devices"] - 0.5).max() < 0.01


def test_calibrate_sets_temperatures_on_binary_heads_only():
    model = _model()
    images = np.random.default_rng(1).integers(0, 255, (40, 32, 32), dtype=np.uint8)
    targets = np.zeros((40, 3), np.float32)
    targets[::2, :2] = 1.0
    report = calibrate(model, images, targets, np.ones((40, 3), bool))
    assert set(report) == {"support_devices", "sex"}
    assert model.temperature[2].item() == 1.0


def test_folder_round_trip_local_and_on_s3(tmp_path, s3_storage, bucket):
    model = _model()
    model.temperature[1] = 2.5
    images = np.random.default_rng(2).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    expected = model.predict(images)
    save_classifier(model, str(tmp_path / "clf"), extra={"evaluation.json": {"auroc": 1.0}})
    assert json.loads((tmp_path / "clf" / "evaluation.json").read_text()) == {"auroc": 1.0}
    for uri, storage in ((str(tmp_path / "clf"), None), (f"s3://{bucket}/models/clf", s3_storage)):
        if storage is not None:
            save_classifier(model, uri, storage)
        loaded = load_classifier(uri, storage)
        got = loaded.predict(images)
        assert loaded.temperature[1].item() == 2.5
        for key in ("support_devices", "sex", "age", "features"):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_a_bad_classifier_folder_fails_with_a_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="no classifier folder"):
        load_classifier(str(tmp_path / "nowhere"))
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a cfgen classifier folder"):
        load_classifier(str(tmp_path / "sd"))
    save_classifier(_model(), str(tmp_path / "clf"))
    with pytest.raises(ValueError, match="is a 'densenet'.*asks for 'densenet121'"):
        load_classifier(str(tmp_path / "clf"), architecture="densenet121")
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    config["block_config"] = [3, 3]
    (tmp_path / "clf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="do not fit its config|size mismatch"):
        load_classifier(str(tmp_path / "clf"))


def test_decorrelation_weights_make_a_confounded_pair_independent():
    from cfgen.classify.train import decorrelation_tables, sample_weights

    rng = np.random.default_rng(0)
    effusion = (rng.random(4000) < 0.25).astype(float)
    devices = np.where(rng.random(4000) < 0.6, effusion, rng.random(4000) < 0.25).astype(float)
    cfg = ClassifierConfig(attributes=["support_devices", "pleural_effusion", "sex"])
    labels = {"support_devices": devices, "pleural_effusion": effusion,
              "sex": np.where(rng.random(4000) < 0.5, "M", "F")}
    tables = decorrelation_tables(labels, cfg, "mask")
    assert [t["pair"] for t in tables] == [["support_devices", "pleural_effusion"]]  # sex is independent
    targets, known = label_targets(labels, cfg.attributes, "mask")
    w = sample_weights(targets, known, tables)

    def weighted_phi(a, b):
        ma, mb = np.average(a, weights=w), np.average(b, weights=w)
        cov = np.average((a - ma) * (b - mb), weights=w)
        return cov / np.sqrt(np.average((a - ma) ** 2, weights=w) * np.average((b - mb) ** 2, weights=w))

    assert np.corrcoef(devices, effusion)[0, 1] > 0.5
    assert abs(weighted_phi(devices, effusion)) < 1e-6
    assert decorrelation_tables(labels, cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"decorrelate": None})}), "mask") == []
