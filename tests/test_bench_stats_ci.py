"""Effect sizes and confidence intervals (benchmarks/stats.py): estimates checked by hand,
intervals checked by their coverage on simulated timings, the minimum detectable effect
checked by the power it promises."""

import math

import numpy as np
import pytest

from benchmarks.stats import (
    REGRESSED,
    UNCHANGED,
    Verdict,
    compare_samples,
    describe,
    hodges_lehmann_paired,
    hodges_lehmann_unpaired,
    median_interval,
    minimum_detectable_effect,
    shift_interval,
)


def timings(center: float, n: int, spread: float, rng) -> list[float]:
    return list(center * np.exp(rng.normal(0, spread, n)))


def test_unpaired_estimate_is_the_median_of_all_pairwise_differences():
    # head - base for base (1, 2, 3), head (2, 4): -1, 0, 1, 1, 2, 3 -> median 1.
    interval = hodges_lehmann_unpaired(np.array([1.0, 2, 3]), np.array([2.0, 4]), 0.05)
    assert interval.estimate == 1.0
    assert (interval.low, interval.high) == (-math.inf, math.inf)  # 2 x 3 samples: no 95% CI


def test_paired_estimate_is_the_median_of_the_walsh_averages():
    # Walsh averages of (1, 2, 6): 1, 1.5, 3.5, 2, 4, 6 -> sorted middle pair (2, 3.5).
    assert hodges_lehmann_paired(np.array([1.0, 2, 6]), 0.05).estimate == 2.75


@pytest.mark.parametrize("paired", [False, True])
def test_the_95_percent_interval_covers_the_true_change_about_95_times_in_100(paired):
    rng = np.random.default_rng(7)
    covered, trials = 0, 400
    for _ in range(trials):
        base, head = timings(100, 12, 0.03, rng), timings(97, 12, 0.03, rng)
        interval = shift_interval(base, head, 0.05, paired)
        covered += interval.low <= math.log(0.97) <= interval.high
    # Binomial(400, 0.95) lies in [0.92, 0.975] with probability > 99.9%.
    assert 0.92 <= covered / trials <= 0.975


def test_the_minimum_detectable_effect_is_detected_about_80_percent_of_the_time():
    rng = np.random.default_rng(3)
    n, spread = 15, 0.02
    reference = [minimum_detectable_effect(shift_interval(
        timings(100, n, spread, rng), timings(100, n, spread, rng), 0.05, False), 0.05)
        for _ in range(50)]
    mde = float(np.median(reference))
    assert 0.01 < mde < 0.04  # about 2.8 standard errors of a 15-vs-15 comparison at 2% noise
    detected = sum(
        compare_samples(timings(100, n, spread, rng), timings(100 / (1 + mde), n, spread, rng),
                        True, min_effect=0).verdict == REGRESSED
        for _ in range(200))
    assert 0.68 <= detected / 200 <= 0.92


def test_one_outlier_barely_moves_the_estimate():
    rng = np.random.default_rng(1)
    base, head = timings(100, 12, 0.01, rng), timings(97, 12, 0.01, rng)
    clean = compare_samples(base, head, True).change
    head[4] = 5.0  # a trial preempted for a whole time slice
    assert compare_samples(base, head, True).change == pytest.approx(clean, abs=0.003)


def test_pairing_cancels_load_that_hits_both_sides_of_a_block_alike():
    rng = np.random.default_rng(2)
    load = np.exp(rng.normal(0, 0.15, 20))  # each block's machine state: +-15%
    base = list(100 * load * np.exp(rng.normal(0, 0.005, 20)))
    head = list(97 * load * np.exp(rng.normal(0, 0.005, 20)))
    paired = compare_samples(base, head, True, paired=True)
    assert paired.verdict == REGRESSED and paired.low < -0.03 + 0.01 and paired.high > -0.03 - 0.01
    assert compare_samples(base, head, True).verdict == UNCHANGED  # lost in the load


def test_paired_samples_must_pair_up():
    with pytest.raises(ValueError, match="equal counts"):
        compare_samples([1.0] * 5, [1.0] * 6, True, paired=True)
    with pytest.raises(ValueError, match="finite"):
        compare_samples([1.0, math.nan, 1, 1], [1.0] * 4, True)


def test_a_metric_that_can_be_zero_is_compared_on_its_own_scale():
    base = [0.0, 0.1, 0.2, 0.1, 0.0, 0.1, 0.2, 0.1]  # draft acceptance rates
    verdict = compare_samples(base, [v + 0.5 for v in base], higher_is_better=True)
    assert verdict.change == pytest.approx(0.5 / 0.1)  # shift 0.5 over the base median 0.1


def test_unchanged_verdicts_say_what_change_they_rule_out():
    rng = np.random.default_rng(4)
    verdict = compare_samples(timings(100, 20, 0.01, rng), timings(100, 20, 0.01, rng), True)
    assert verdict.verdict == UNCHANGED
    assert 0 < verdict.mde < 0.02
    assert verdict.note == f"no change detectable above {verdict.mde:.1%}"
    assert describe(verdict, True).startswith(f"no change detectable above {verdict.mde:.1%}")


def made(change, low, high) -> Verdict:
    return Verdict("regressed", 1.0, 1.0 + change, change, 0.001, 10, 10, low=low, high=high)


def test_describe_reads_as_a_sentence_in_the_metrics_direction():
    # tokens/s fell 3.1%: slower; the interval's ends as magnitudes, smaller first.
    assert describe(made(-0.031, -0.044, -0.018), higher_is_better=True) == (
        "slower by 3.1% (95% CI 1.8-4.4%)")
    # a time grew 3.1%: also slower; a size grew: worse; a rate grew: faster.
    assert describe(made(0.031, 0.018, 0.044), higher_is_better=False).startswith("slower by 3.1%")
    assert describe(made(0.031, 0.018, 0.044), False, speed=False).startswith("worse by 3.1%")
    assert describe(made(0.031, 0.018, 0.044), True).startswith("faster by 3.1%")


def test_median_interval_covers_the_median_about_95_times_in_100():
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(400):
        low, high = median_interval(list(rng.exponential(1.0, 25)))
        hits += low <= math.log(2) <= high  # the exponential's median
    # n = 25: depth 12.5 - 1.96 * 2.5 = 7.6, rounded down to 7 (conservative); the exact
    # coverage is P(7 <= Binomial(25, 1/2) <= 18) = 0.985.
    assert 0.96 <= hits / 400 <= 1.0
    assert sorted(median_interval(list(range(1, 26)))) == [7, 19]
    assert median_interval([1.0, 2.0]) == (-math.inf, math.inf)


def test_rank_test_p_values_agree_with_scipys_normal_approximation():
    from scipy.stats import mannwhitneyu, wilcoxon

    from benchmarks.stats import rank_test_p

    rng = np.random.default_rng(9)
    for _ in range(5):
        base, head = list(rng.normal(0, 1, 15)), list(rng.normal(0.5, 1, 15))
        assert rank_test_p(base, head, paired=False) == pytest.approx(
            mannwhitneyu(base, head, method="asymptotic").pvalue, rel=1e-9)
        assert rank_test_p(base, head, paired=True) == pytest.approx(
            wilcoxon(base, head, method="approx", correction=True).pvalue, rel=1e-9)
    tied_base, tied_head = [1, 2, 2, 3, 3, 3, 4], [2, 3, 3, 4, 4, 5, 5]
    assert rank_test_p(tied_base, tied_head, paired=False) == pytest.approx(
        mannwhitneyu(tied_base, tied_head, method="asymptotic").pvalue, rel=1e-9)
