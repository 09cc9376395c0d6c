"""Discovery statistics against answers known in advance: coverage and error rates over repeated draws,
hand-computed q-values, and scipy's own routines where one exists."""

import math
import pickle
import tracemalloc

import numpy as np
import pytest
from scipy import stats as sps

from cfgen.discovery.stats import (
    PairedPixelAccumulator,
    PairedSummaries,
    SlopeAccumulator,
    benjamini_hochberg,
    ols_slope,
    paired_summary,
    subject_keys,
    wilson_interval,
)

# Repeated-draw tests of rates use 400 draws: the SE of a 5% rejection rate is then about 1.1%.
DRAWS = 400

# Coverage uses 1,000 draws (SE about 0.7%): a correct 95% interval of the mean covers about 0.935 on this
# lognormal at n = 40 (every bootstrap interval undercovers skewed data at small n; 4,000 draws measured) and
# 0.95 on the normal, while a 90% interval covers about 0.90 and fails the lower bound, and an interval of the
# median (-0.13 here, 1.4 SE of the mean away from the mean) covers about 0.75.
COVERAGE_DRAWS = 1000

# Draw n paired differences: a skewed case (lognormal shifted to mean 0) and a normal one, with their means.
DIFFERENCE_DISTRIBUTIONS = {
    "lognormal": (lambda rng, n: rng.lognormal(0.0, 0.5, n) - math.exp(0.5**2 / 2), 0.0),
    "normal": (lambda rng, n: rng.normal(0.3, 1.0, n), 0.3),
}


@pytest.mark.parametrize("name", sorted(DIFFERENCE_DISTRIBUTIONS))
def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time(name):
    rng, (draw, mu) = np.random.default_rng(11), DIFFERENCE_DISTRIBUTIONS[name]
    covered = 0
    for i in range(COVERAGE_DRAWS):
        s = paired_summary(draw(rng, 40), n_boot=500, seed=i)
        covered += s["ci_low"] <= mu <= s["ci_high"]
    assert 0.92 <= covered / COVERAGE_DRAWS <= 0.975


@pytest.mark.parametrize("test", ["t", "wilcoxon"])
def test_p_values_are_uniform_when_there_is_no_effect(test):
    rng = np.random.default_rng(5)
    p = np.array([paired_summary(rng.normal(0, 1, 40), test=test, n_boot=100, seed=i)["p_value"]
                  for i in range(DRAWS)])
    assert 0.02 <= np.mean(p < 0.05) <= 0.09
    assert 0.42 <= np.mean(p < 0.5) <= 0.58


def test_paired_t_is_two_sided_and_matches_scipy():
    x = np.random.default_rng(0).normal(0.2, 1, 25)
    p = paired_summary(x)["p_value"]
    assert p == pytest.approx(sps.ttest_1samp(x, 0).pvalue, rel=1e-10)
    assert paired_summary(-x)["p_value"] == pytest.approx(p, rel=1e-12)
    assert paired_summary(x, test="wilcoxon")["p_value"] == pytest.approx(sps.wilcoxon(x).pvalue)


def test_paired_t_detects_a_half_sd_effect_in_60_subjects():
    rng = np.random.default_rng(3)
    p = np.array([paired_summary(rng.normal(0.5, 1, 60), n_boot=100, seed=i)["p_value"] for i in range(200)])
    assert np.mean(p < 0.05) > 0.9


def test_summary_reports_mean_sd_and_cohens_dz():
    s = paired_summary([1.0, 2.0, 3.0, 4.0])
    assert (s["n"], s["mean"], s["reason"]) == (4, 2.5, None)
    assert s["sd"] == pytest.approx(math.sqrt(5 / 3))
    assert s["effect_size"] == pytest.approx(2.5 / math.sqrt(5 / 3))
    assert s["ci_low"] < 2.5 < s["ci_high"]
    assert (s["test"], s["ci_method"]) == ("paired-t", "bootstrap-bca-expanded")


@pytest.mark.parametrize("test", ["t", "wilcoxon"])
def test_a_region_the_edit_never_touches_is_a_definite_non_finding(test):
    s = paired_summary(np.zeros(50), test=test)
    assert s["p_value"] == 1.0
    assert (s["ci_low"], s["ci_high"], s["mean"], s["sd"]) == (0.0, 0.0, 0.0, 0.0)
    assert s["reason"] == "no variation"
    assert math.isnan(s["effect_size"])


def test_constant_nonzero_differences_have_no_p_value_and_no_infinite_effect():
    s = paired_summary(np.full(30, 0.1))
    assert math.isnan(s["p_value"]) and math.isnan(s["effect_size"])
    assert (s["mean"], s["ci_low"], s["ci_high"], s["reason"]) == (0.1, 0.1, 0.1, "no variation")


def test_too_few_subjects_give_nans_and_a_reason():
    s = paired_summary([0.1, 0.2])
    assert s["n"] == 2 and s["reason"] == "too few subjects: 2 < 3"
    assert all(math.isnan(s[k]) for k in ("mean", "sd", "ci_low", "ci_high", "p_value", "effect_size"))


def test_nan_differences_are_dropped_and_counted():
    s = paired_summary([np.nan, 1.0, 2.0, np.nan, 3.0])
    assert (s["n"], s["n_dropped_nan"], s["mean"]) == (3, 2, 2.0)
    empty = paired_summary([np.nan] * 4)
    assert (empty["n"], empty["n_dropped_nan"], empty["reason"]) == (0, 4, "too few subjects: 0 < 3")


@pytest.mark.parametrize("kwargs", [{"test": "ttest"}, {"alpha": 1.0}, {"alpha": 0.0}, {"n_boot": 50}])
def test_caller_mistakes_raise(kwargs):
    with pytest.raises(ValueError):
        paired_summary([1.0, 2.0, 3.0], **kwargs)


def test_bootstrap_of_100000_subjects_stays_in_bounded_memory_and_matches_the_normal_interval():
    x = np.random.default_rng(1).normal(0.01, 1.0, 100_000)
    tracemalloc.start()
    try:
        s = paired_summary(x, n_boot=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 150e6  # one [1000, 100000] index matrix would be 800 MB
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert s["ci_low"] == pytest.approx(x.mean() - half, abs=0.2 * half)
    assert s["ci_high"] == pytest.approx(x.mean() + half, abs=0.2 * half)


def test_bootstrap_is_reproducible_from_its_seed():
    x = np.random.default_rng(2).exponential(1.0, 50)
    a, b, c = paired_summary(x, seed=3), paired_summary(x, seed=3), paired_summary(x, seed=4)
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"]) != (c["ci_low"], c["ci_high"])


def test_benjamini_hochberg_by_hand():
    reject, q = benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4p/rank = 0.02, 0.02, 0.04, 0.04
    np.testing.assert_allclose(q, [0.02, 0.04, 0.04, 0.02])
    assert reject.all()
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005], alpha=0.03)[0].tolist() == [True, False, False, True]
    # 4p/rank = 0.04, 0.024, 0.4, 0.31: the step-up rule carries the smaller later values back
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.012, 0.3, 0.31])[1], [0.024, 0.024, 0.31, 0.31])


def test_benjamini_hochberg_matches_scipy_on_a_2d_map():
    p = np.random.default_rng(2).random((20, 30)) ** 3
    _, q = benjamini_hochberg(p)
    assert q.shape == p.shape
    np.testing.assert_allclose(q, sps.false_discovery_control(p.ravel()).reshape(p.shape))


def test_benjamini_hochberg_leaves_nan_out_of_m():
    reject, q = benjamini_hochberg([0.01, np.nan, 0.04])
    np.testing.assert_allclose(q, [0.02, np.nan, 0.04])
    assert reject.tolist() == [True, False, True]
    with pytest.raises(ValueError):
        benjamini_hochberg([0.5, 1.5])


def _planted_block(rng, effect, n_subjects=None):
    block = np.zeros((64, 64), dtype=bool)
    block[20:30, 35:45] = True
    if n_subjects is None:  # one z-score per pixel
        return block, rng.normal(0, 1, block.shape) + effect * block
    return block, rng.normal(0, 1, (n_subjects, *block.shape)) + effect * block


def test_benjamini_hochberg_finds_a_planted_block_with_few_false_discoveries():
    rng = np.random.default_rng(8)
    fdp, power, naive_false = [], [], []
    for _ in range(5):
        block, z = _planted_block(rng, 4.5)
        p = 2 * sps.norm.sf(np.abs(z))
        reject, _ = benjamini_hochberg(p)
        fdp.append(np.sum(reject & ~block) / max(1, np.sum(reject)))
        power.append(np.mean(reject[block]))
        naive_false.append(np.sum((p < 0.05) & ~block))
    assert np.mean(power) > 0.9
    assert np.mean(fdp) <= 0.1
    assert np.mean(naive_false) > 100  # unadjusted, about 5% of the 3,996 null pixels light up


def _direct_pixel_stats(d):
    n = len(d)
    mean, sd = d.mean(axis=0), d.std(axis=0, ddof=1)
    return mean, sd, mean / (sd / math.sqrt(n))


def test_accumulator_streamed_in_uneven_batches_equals_the_stacked_computation():
    # An offset 10^6 times the spread: naive sums of squares keep about 4 of float64's 16 digits here.
    d = 1e6 + np.random.default_rng(4).normal(0, 1, (40, 8, 6))
    acc = PairedPixelAccumulator((8, 6))
    for lo, hi in [(0, 7), (7, 8), (8, 20), (20, 40)]:
        acc.update(d[lo:hi])
    mean, sd, t = _direct_pixel_stats(d)
    r = acc.result()
    assert r["n"] == 40 and acc.n == 40
    np.testing.assert_allclose(r["mean"], mean)
    np.testing.assert_allclose(r["sd"], sd)
    np.testing.assert_allclose(r["t"], t)
    np.testing.assert_allclose(r["p"], sps.ttest_1samp(d, 0, axis=0).pvalue, rtol=1e-8)
    np.testing.assert_allclose(r["q"], sps.false_discovery_control(r["p"].ravel()).reshape(8, 6))


def test_accumulator_merge_of_two_halves_equals_the_whole():
    d = np.random.default_rng(6).normal(0.2, 1, (33, 5, 5))
    left, right = PairedPixelAccumulator((5, 5)).update(d[:10]), PairedPixelAccumulator((5, 5)).update(d[10:])
    merged = left.merge(right).result()
    mean, sd, t = _direct_pixel_stats(d)
    assert merged["n"] == 33
    np.testing.assert_allclose(merged["mean"], mean)
    np.testing.assert_allclose(merged["sd"], sd)
    np.testing.assert_allclose(merged["t"], t)
    empty = PairedPixelAccumulator((5, 5)).merge(PairedPixelAccumulator((5, 5)).update(d))
    np.testing.assert_allclose(empty.result()["sd"], sd)


def test_accumulator_round_trips_through_a_plain_dict():
    rng = np.random.default_rng(7)
    acc = PairedPixelAccumulator((4, 3)).update(rng.normal(0, 1, (9, 4, 3)), factual=rng.random((9, 4, 3)))
    state = pickle.loads(pickle.dumps(acc.to_dict()))
    assert all(isinstance(v, (int, list, np.ndarray)) for v in state.values())
    back, before = PairedPixelAccumulator.from_dict(state).result(), acc.result()
    assert back["n"] == before["n"] == 9
    for key in ("mean", "sd", "t", "p", "q", "mean_factual"):
        np.testing.assert_array_equal(back[key], before[key])


def test_accumulator_significant_mask_finds_the_planted_block():
    block, d = _planted_block(np.random.default_rng(9), 1.5, n_subjects=30)
    acc = PairedPixelAccumulator(block.shape)
    for start in range(0, 30, 8):
        acc.update(d[start:start + 8])
    sig = acc.result()["significant"]
    assert np.mean(sig[block]) > 0.95
    assert np.sum(sig & ~block) / np.sum(sig) <= 0.1


def test_accumulator_untouched_pixels_are_non_findings_and_constant_ones_untestable():
    d = np.random.default_rng(10).normal(0, 1, (12, 3, 3))
    d[:, 0, 0] = 0.0  # outside the composited edit
    d[:, 1, 1] = 0.1  # shifted by exactly the same amount in every subject
    r = PairedPixelAccumulator((3, 3)).update(d[:5]).update(d[5:]).result()
    assert (r["t"][0, 0], r["p"][0, 0], r["sd"][0, 0], r["significant"][0, 0]) == (0.0, 1.0, 0.0, False)
    assert r["mean"][1, 1] == 0.1 and np.isnan(r["p"][1, 1]) and np.isnan(r["q"][1, 1])
    assert not r["significant"][1, 1]
    assert np.isfinite(r["q"]).sum() == 8  # the untestable pixel is not counted in BH's m


def test_accumulator_mean_factual_and_dropped_maps():
    rng = np.random.default_rng(12)
    d, f = rng.normal(0, 1, (6, 4, 4)), rng.random((6, 4, 4))
    d[2, 1, 3] = np.nan
    r = PairedPixelAccumulator((4, 4)).update(d[:3], factual=f[:3]).update(d[3:], factual=f[3:]).result()
    keep = [0, 1, 3, 4, 5]
    assert (r["n"], r["n_dropped"]) == (5, 1)
    np.testing.assert_allclose(r["mean"], d[keep].mean(axis=0))
    np.testing.assert_allclose(r["mean_factual"], f[keep].mean(axis=0))
    assert PairedPixelAccumulator((4, 4)).update(d[:1]).result()["reason"] == "too few maps: 1 < 2"
    with pytest.raises(ValueError):
        PairedPixelAccumulator((4, 4)).update(np.zeros((2, 4, 5)))


def test_ols_slope_recovers_a_known_slope_and_matches_linregress():
    rng = np.random.default_rng(13)
    age = rng.uniform(20, 80, 200)
    y = 1.0 + 0.03 * age + rng.normal(0, 0.5, 200)
    s, ref = ols_slope(age, y), sps.linregress(age, y)
    assert s["ci_low"] < 0.03 < s["ci_high"]
    assert s["slope"] == pytest.approx(ref.slope) and s["intercept"] == pytest.approx(ref.intercept)
    assert s["p_value"] == pytest.approx(ref.pvalue, rel=1e-6)
    half = sps.t.ppf(0.975, 198) * ref.stderr
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((ref.slope - half, ref.slope + half))
    decade = ols_slope(age, y, per=10)
    assert (decade["slope"], decade["ci_low"], decade["ci_high"]) == pytest.approx(
        (10 * s["slope"], 10 * s["ci_low"], 10 * s["ci_high"]))
    assert decade["intercept"] == pytest.approx(s["intercept"])


def test_ols_slope_of_a_binary_attribute_is_the_difference_of_group_means():
    x = np.array([0, 0, 0, 1, 1, 1, 1, np.nan])
    y = np.array([1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 6.0, 100.0])
    s = ols_slope(x, y)
    assert (s["n"], s["n_dropped_nan"]) == (7, 1)
    assert s["slope"] == pytest.approx(6.0 - 2.0)


def test_ols_slope_without_variation():
    s = ols_slope(np.ones(10), np.arange(10.0))
    assert s["reason"] == "attribute does not vary" and math.isnan(s["slope"]) and math.isnan(s["p_value"])
    flat = ols_slope(np.arange(10.0), np.zeros(10))
    assert (flat["slope"], flat["ci_low"], flat["ci_high"], flat["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert ols_slope([1.0, 2.0], [1.0, 3.0])["reason"] == "too few subjects: 2 < 3"


def test_wilson_interval_matches_known_values_and_scipy():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    low, high = wilson_interval(np.array([1, 7, 20]), 20)
    for k, lo, hi in zip([1, 7, 20], low, high):
        ref = sps.binomtest(k, 20).proportion_ci(method="wilson")
        assert (lo, hi) == pytest.approx((ref.low, ref.high))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_an_empty_batch_adds_nothing_to_the_pixel_accumulator():
    acc = PairedPixelAccumulator((4, 4)).update(np.ones((2, 4, 4)), np.zeros((2, 4, 4)))
    acc.update(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))
    assert acc.n == 2 and acc.n_factual == 2 and acc.result()["mean"] == pytest.approx(np.ones((4, 4)))


def test_streamed_summaries_do_not_depend_on_how_the_subjects_were_sliced_or_ordered():
    """Discovery folds subjects in slices whose make-up depends on the spill: every statistic must come out the
    same (the bootstrap's weights are keyed by subject), and equal to the one-shot functions."""
    rng = np.random.default_rng(21)
    n = 500
    keys = subject_keys([f"subject-{i}" for i in range(n)])
    x = np.column_stack([rng.exponential(1.0, n) - 0.8, rng.normal(0.1, 1.0, n)])
    x[rng.random(n) < 0.05, 1] = np.nan
    whole = PairedSummaries(2, n_boot=500, seed=0, keep_values=True).update(x, keys)
    order = rng.permutation(n)
    parts = PairedSummaries(2, n_boot=500, seed=0, keep_values=True)
    for chunk in np.array_split(order, 7):
        parts.update(x[chunk], keys[chunk])
    for j in range(2):
        for test in ("t", "wilcoxon"):
            a, b = whole.result(j, test=test), parts.result(j, test=test)
            for k in ("n", "n_dropped_nan", "mean", "sd", "ci_low", "ci_high", "p_value", "effect_size"):
                assert b[k] == pytest.approx(a[k], rel=1e-9), (j, test, k)
    assert whole.result(1)["n_dropped_nan"] == int(np.isnan(x[:, 1]).sum()) > 0
    one = paired_summary(x[:, 0], n_boot=500)
    assert (one["mean"], one["sd"], one["p_value"]) == pytest.approx(
        (whole.result(0)["mean"], whole.result(0)["sd"], whole.result(0)["p_value"]))
    # another subject's key draws other weights: the CI moves, a little
    other = PairedSummaries(2, n_boot=500, seed=0).update(x, subject_keys([f"s{i}" for i in range(n)])).result(0)
    assert other["ci_low"] != whole.result(0)["ci_low"]
    assert other["ci_low"] == pytest.approx(whole.result(0)["ci_low"], abs=0.05)

    age = rng.uniform(20, 80, n)
    y = np.column_stack([0.01 * age + rng.normal(0, 0.3, n), rng.normal(0, 1, n)])
    slopes = SlopeAccumulator(2)
    for chunk in np.array_split(order, 5):
        slopes.update(age[chunk], y[chunk])
    for j in range(2):
        a, b = ols_slope(age, y[:, j], per=10), slopes.result(j, per=10)
        for k in ("n", "slope", "ci_low", "ci_high", "p_value", "intercept"):
            assert b[k] == pytest.approx(a[k], rel=1e-9), (j, k)
