"""Each per-edit measure on hand-made arrays whose answer is known."""

import math

import numpy as np
import pytest

from cfgen.metrics.edit_report import classifier_metrics, image_metrics
from cfgen.metrics.effectiveness import row_scores, summarize_scores, target_value
from cfgen.metrics.image import change_region, l1, minimality, preservation, psnr, ssim
from cfgen.metrics.realism import frechet_distance, real_baseline, realism_against


def _image(seed=0, size=32):
    return np.random.default_rng(seed).random((size, size)).astype(np.float32)


def test_ssim_and_psnr_of_identical_and_of_known_noise():
    a = _image()
    assert ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, a) == math.inf
    b = np.clip(a + 0.1, 0, 1)  # MSE known up to clipping
    mse = float(np.mean((a - b) ** 2))
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert ssim(a, 1 - a) < 0  # an inverted image is anti-correlated
    noise = np.random.default_rng(1).normal(0, 1, a.shape)
    slight, strong = ssim(a, np.clip(a + 0.05 * noise, 0, 1)), ssim(a, np.clip(a + 0.3 * noise, 0, 1))
    assert 1 > slight > strong > 0


def test_l1_outside_a_region_ignores_what_changed_inside():
    a = np.zeros((10, 10), np.float32)
    b = a.copy()
    b[2:4, 2:4] = 1.0  # the edit
    b[9, 9] = 0.5  # a stray change outside
    region = np.zeros((10, 10), bool)
    region[2:4, 2:4] = True
    m = minimality(a, b, region)
    assert m["l1_outside_region"] == pytest.approx(0.5 / 96)
    assert math.isnan(minimality(a, b, None)["l1_outside_region"])
    assert l1(a, b, np.zeros((10, 10), bool)) != l1(a, b, np.zeros((10, 10), bool))  # NaN for an empty mask


def test_change_region_is_the_true_change_grown_by_the_dilation():
    f = np.zeros((20, 20), np.float32)
    t = f.copy()
    t[5:7, 5:7] = 0.3
    region = change_region(f, t, threshold=0.02, dilation=2)
    # grown by a cross twice: pixels within city-block distance 2 of the changed square
    assert region[5:7, 5:7].all() and region[3, 5] and region[4, 4] and not region[2, 5] and not region[3, 3]
    assert region.sum() == 24
    assert not change_region(f, f).any()


def test_preservation_of_a_perfect_null_edit():
    a = _image(3)
    p = preservation(a, a)
    assert p["null_l1"] == 0 and p["null_ssim"] == pytest.approx(1.0) and p["null_psnr"] == math.inf
    m = image_metrics(a, a, null_edit=None, edit_back=a)
    assert math.isnan(m["null_ssim"]) and m["reversibility_l1"] == 0.0


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    n, d = 20000, 4
    a = rng.normal(0, 1, (n, d))
    b = rng.normal(0, 2, (n, d)) + np.array([1.0, 0, 0, 0])
    # mean term 1 + trace term sum (1 + 4 - 2 * 2) = 4
    assert frechet_distance(a, b) == pytest.approx(5.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :3])
    assert math.isnan(frechet_distance(a[:1], b))


def test_realism_reads_a_real_sample_at_its_baseline_and_a_shifted_one_far_above():
    rng = np.random.default_rng(1)
    real = rng.normal(0, 1, (400, 3))
    same = rng.normal(0, 1, (100, 3))
    shifted = rng.normal(0, 1, (100, 3)) + 2.0
    d_same, base, n = realism_against(real, same)
    d_shift, _, _ = realism_against(real, shifted)
    assert n == 100
    assert d_same < 2 * base and d_shift > 10 * base
    assert real_baseline(real[:200], real[200:], 50) < 1.0


def _reads(p_device, p_effusion, features=None):
    out = {"support_devices": np.asarray(p_device, float), "pleural_effusion": np.asarray(p_effusion, float),
           "age": np.array([60.0] * len(p_device))}
    if features is not None:
        out["features"] = np.asarray(features, float)
    return out


def test_flip_rate_and_off_target_shift_of_perfect_useless_and_entangled_edits():
    before = _reads([0.95, 0.9, 0.1], [0.2, 0.3, 0.2])
    edit = {"support_devices": 0}
    state = np.array([1.0, 1.0, 0.0])  # the third needs no change
    perfect = summarize_scores(row_scores(before, _reads([0.05, 0.1, 0.1], [0.2, 0.3, 0.2]), edit, state))
    assert perfect["n"] == 2 and perfect["flip_rate"] == 1.0 and perfect["max_off_target_shift"] == 0.0
    assert perfect["mean_target_shift"] == pytest.approx(0.85)
    nothing = summarize_scores(row_scores(before, before, edit, state))
    assert nothing["flip_rate"] == 0.0 and nothing["mean_target_shift"] == 0.0
    entangled = summarize_scores(row_scores(before, _reads([0.05, 0.1, 0.1], [0.0, 0.1, 0.2]), edit, state))
    assert entangled["off_target_attribute"] == "pleural_effusion"
    assert entangled["max_off_target_shift"] == pytest.approx(0.2)


def test_unknown_factual_state_falls_back_to_the_classifier_and_sex_targets_read_as_male():
    before = _reads([0.95, 0.1], [0.5, 0.5])
    cols = row_scores(before, _reads([0.9, 0.9], [0.5, 0.5]), {"support_devices": 1}, np.array([np.nan, np.nan]))
    assert cols["needs_change"].tolist() == [False, True]
    assert target_value("sex", "M") == 1.0 and target_value("sex", "female") == 0.0
    with pytest.raises(ValueError):
        target_value("sex", "X")


def test_rows_the_classifier_cannot_score_get_nan_and_a_reason():
    feats = np.eye(3)
    before, after = _reads([0.9, 0.9, 0.9], [0.1, 0.1, 0.1], feats), _reads([0.1, 0.1, 0.9], [0.1, 0.1, 0.1], feats)
    edits = [{"support_devices": 0}, {"cardiomegaly": 1}, {"support_devices": 0, "pleural_effusion": 1}]
    cols, reasons = classifier_metrics(before, after, edits, np.array([1.0, 0.0, np.nan]))
    assert reasons[0] is None and cols["reached_target"][0] == 1.0 and cols["feature_distance"][0] == 0.0
    assert reasons[1].startswith("unscorable_edit") and "cardiomegaly" in reasons[1]
    assert math.isnan(cols["target_after"][1]) and reasons[2].startswith("unscorable_edit")
    assert cols["p_after__support_devices"].tolist() == [0.1, 0.1, 0.9]


def test_matched_realism_removes_a_population_difference_that_is_not_unrealism():
    """Real images' features depend on B; the generated set is perfectly real but mostly B=1 while the reference
    group is mostly B=0 (A and B correlated): unmatched, it looks unreal; matched on B, it reads as real."""
    from cfgen.metrics.realism import matched_realism, propensity_weights

    rng = np.random.default_rng(0)

    def real_images(n, p_b):
        b = (rng.random(n) < p_b).astype(float)
        return rng.normal(0, 1, (n, 4)) + 3.0 * b[:, None], b[:, None]

    generated, g_cov = real_images(150, 0.8)
    reference, r_cov = real_images(600, 0.2)
    pool, p_cov = real_images(600, 0.2)
    zero = np.zeros
    unmatched, base_u, _ = matched_realism(generated, zero((150, 0)), reference, zero((600, 0)), pool, zero((600, 0)))
    matched, base_m, n = matched_realism(generated, g_cov, reference, r_cov, pool, p_cov)
    assert n == 150
    assert unmatched > 10 * base_u
    assert matched < 2.0 * base_m
    w = propensity_weights(g_cov, r_cov)
    assert np.average(r_cov[:, 0], weights=w) == pytest.approx(g_cov.mean(), abs=0.02)
    fake = generated + 2.0  # unrealistic: shifted off every real population
    assert matched_realism(fake, g_cov, reference, r_cov, pool, p_cov)[0] > 5 * base_m


def test_calibration_table_scores_truth_as_unchanged_outside_its_region_and_says_when_too_few():
    """The instrument check on SCM-rendered phantoms with an untrained classifier: the table's structure and the
    figures that do not depend on the classifier (the true counterfactual is the truth, doing nothing is the
    input), and a row with a note where the split is too small for an edit."""
    import torch

    from cfgen.classify.network import AttributeClassifier, network_config
    from cfgen.config import ClassifierConfig, DecodeConfig, PhantomConfig
    from cfgen.phantoms.scm import PhantomSCM
    from cfgen.phantoms.truth import true_counterfactual
    from cfgen.pipeline.instrument import calibration_table, check_calibration

    torch.manual_seed(0)
    scm = PhantomSCM(PhantomConfig(n=60, size=64, seed=2))
    decode = DecodeConfig(size=64)
    model = AttributeClassifier(network_config(ClassifierConfig(
        attributes=["support_devices", "smoking", "sex"], init_features=8, growth_rate=4, block_config=[2, 2])))

    def split(indices):
        return {"image": np.stack([true_counterfactual(scm, i, {}, decode) for i in indices]),
                "phantom_index": np.array(indices), "sex": np.array([scm.subject(i).sex for i in indices])}

    rows = calibration_table(model, scm, split(list(range(30))), split(list(range(30, 60))),
                             [{"support_devices": 0}, {"smoking": 1}], decode)
    by = {(r["set"], r["edit"]): r for r in rows}
    assert set(by) == {(s, e) for s in ("true", "nothing", "other") for e in ("support_devices=0", "smoking=1")}
    true_dev = by[("true", "support_devices=0")]
    assert true_dev["n"] == sum(scm.subject(i).support_devices for i in range(30))
    assert true_dev["l1_to_truth"] == 0.0 and true_dev["l1_outside_region"] == 0.0
    assert by[("nothing", "smoking=1")]["l1_to_input"] == 0.0 and by[("nothing", "smoking=1")]["mean_target_shift"] == 0.0
    assert by[("other", "smoking=1")]["ssim_to_input"] < 0.95

    tiny = calibration_table(model, scm, split([0, 1]), split(list(range(30, 60))), [{"support_devices": 0}], decode)
    assert all(r["note"] and "too few" in r["note"] for r in tiny)
    assert any("too few" in p for p in check_calibration(tiny))
