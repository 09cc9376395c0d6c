"""The classifier-based choice of a sweep setting: a real small classifier (built from config, its device head set
to see a bright "device" box) scores candidates of which one is plainly the best edit."""

import numpy as np
import pytest
import torch

from cfgen.classify.network import AttributeClassifier, network_config
from cfgen.config import ClassifierConfig
from cfgen.metrics.selection import classifier_selection, effect_score, selection_scores

SMALL = ClassifierConfig(attributes=["support_devices", "sex", "age"], init_features=8, growth_rate=4,
                         block_config=[2, 2], image_size=32)


def _with_device(images: np.ndarray) -> np.ndarray:
    out = images.copy()
    out[:, 8:18, 20:28] = 0.95  # a pacemaker-like bright box
    return out


def _backgrounds(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.5, (n, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def device_reader() -> AttributeClassifier:
    """A classifier whose support_devices head reads the box: the random trunk's features of plain and boxed
    images, and the head set to the linear discriminant between the two means (the other heads stay random)."""
    torch.manual_seed(0)
    model = AttributeClassifier(network_config(SMALL, age_mean=50, age_sd=10)).eval()
    plain = _backgrounds(16, 0)
    f_plain = model.predict(plain)["features"].mean(0)
    f_box = model.predict(_with_device(plain))["features"].mean(0)
    direction = torch.from_numpy(f_box - f_plain)
    scale = 12.0 / float(direction @ direction)  # logits -6 and +6 at the two means
    with torch.no_grad():
        head = model.net.class_layers.out
        head.weight[0] = scale * direction
        head.bias[0] = -scale * float(direction @ torch.from_numpy((f_box + f_plain) / 2))
    probe = _backgrounds(4, 1)
    assert model.predict(_with_device(probe))["support_devices"].min() > 0.9
    assert model.predict(probe)["support_devices"].max() < 0.1
    return model


def test_the_candidate_that_makes_the_edit_and_changes_nothing_else_wins(device_reader):
    image = _backgrounds(3, 2)
    noise = np.random.default_rng(3).normal(0, 0.15, image.shape).astype(np.float32)
    untouched, edited = image, _with_device(image)
    edited_and_noisy = np.clip(edited + noise, 0, 1)
    select = classifier_selection(device_reader, [{"support_devices": 0}, {"support_devices": 1}])
    scores = select([untouched, edited_and_noisy, edited], image, 1)
    assert scores.shape == (3, 3)
    assert (scores.argmax(axis=0) == 2).all()  # adds the device, and only the device
    assert (scores[2] - scores[0] > 0.5).all()  # the effect term, not a tie-break, separates edit from no edit
    removal = select([edited, untouched], _with_device(image), 0)  # the same classifier, the other direction
    assert (removal.argmax(axis=0) == 1).all()


def test_the_pixel_term_costs_its_documented_weight_per_unit_of_mean_change(device_reader):
    image = _with_device(_backgrounds(2, 4))
    slightly, much = image + 0.01, image + 0.05
    scores = selection_scores(device_reader, [much, slightly], image, {"support_devices": 1})
    classifier_only = selection_scores(device_reader, [much, slightly], image, {"support_devices": 1},
                                       pixel_weight=0.0)
    np.testing.assert_allclose(scores - classifier_only, [[-5.0 * 0.05] * 2, [-5.0 * 0.01] * 2], atol=1e-6)
    assert (scores.argmax(axis=0) == 1).all()


def test_an_edit_the_classifier_cannot_read_is_ranked_by_preservation_alone(device_reader):
    image = _backgrounds(2, 5)
    scores = selection_scores(device_reader, [_with_device(image), image], image, {"cardiomegaly": 1})
    assert (scores.argmax(axis=0) == 1).all() and np.allclose(scores[1], 0.0)


def test_age_effect_is_closeness_to_the_target_in_years():
    effect = effect_score({"age": np.array([70.0, 75.0, 40.0])}, {"age": 70.0})
    np.testing.assert_allclose(effect, [1.0, 0.5, 5.0 / 35.0])  # half credit at the 5-year tolerance
    both = effect_score({"age": np.array([70.0]), "smoking": np.array([0.2])}, {"age": 70.0, "smoking": 0.0})
    np.testing.assert_allclose(both, [0.9])  # an edit of two attributes averages them


def test_a_bad_edit_value_fails_when_the_selection_is_built(device_reader):
    with pytest.raises(ValueError, match="sex"):
        classifier_selection(device_reader, [{"sex": "X"}])


def test_the_least_change_that_makes_the_edit_wins_and_where_none_makes_it_the_closest_does(device_reader):
    image = _backgrounds(2, 6)
    select = classifier_selection(device_reader, [{"support_devices": 1}])
    faint, half, full = (np.where(_with_device(image) > image, image + a * (0.95 - image), image) for a in
                         (0.15, 0.5, 1.0))
    p = {name: device_reader.predict(c)["support_devices"] for name, c in (("faint", faint), ("half", half),
                                                                            ("full", full))}
    assert (p["faint"] < p["half"]).all() and (p["half"] < 0.5).all() and (p["full"] > 0.9).all()
    # the full box makes the edit and beats both, though it changes the most pixels
    assert (select([faint, half, full], image, 0).argmax(axis=0) == 2).all()
    # neither makes it: the one closer to the target wins, not the one that changes less
    assert (select([faint, half], image, 0).argmax(axis=0) == 1).all()
    # both make it: the one that changes less wins (the box drawn twice over on top is only more change)
    brighter = np.clip(full + 0.04, 0, 1)
    assert (select([brighter, full], image, 0).argmax(axis=0) == 1).all()
