"""Verdicts from the rank test plus minimum effect size (benchmarks/stats.py).

The samples here are generated, not timed: these tests pin the decision rule.
The timed, end-to-end versions (A/A, +15%, +2%) are in test_bench_regressions.py.
"""

import numpy as np
import pytest

from benchmarks.stats import IMPROVED, REGRESSED, UNCHANGED, compare_samples


def samples(center: float, n: int = 10, spread: float = 0.02, seed: int = 0) -> list[float]:
    """Timing-like samples: log-normal noise around ``center``."""
    rng = np.random.default_rng(seed)
    return list(center * np.exp(rng.normal(0, spread, n)))


def test_a_fifteen_percent_slower_rate_is_regressed():
    verdict = compare_samples(samples(100, seed=1), samples(85, seed=2), higher_is_better=True)
    assert verdict.verdict == REGRESSED
    assert verdict.change == pytest.approx(-0.15, abs=0.03)
    assert verdict.p_value < 0.01


def test_a_fifteen_percent_faster_rate_is_improved():
    verdict = compare_samples(samples(100, seed=1), samples(115, seed=2), higher_is_better=True)
    assert verdict.verdict == IMPROVED


def test_direction_follows_the_metric_lower_time_is_an_improvement():
    base, head = samples(1.0, seed=1), samples(0.85, seed=2)
    assert compare_samples(base, head, higher_is_better=False).verdict == IMPROVED
    assert compare_samples(head, base, higher_is_better=False).verdict == REGRESSED


def test_same_distribution_is_unchanged():
    verdict = compare_samples(samples(100, seed=1), samples(100, seed=2), higher_is_better=True)
    assert verdict.verdict == UNCHANGED


def test_a_significant_shift_below_the_minimum_effect_is_unchanged_with_a_note():
    # Very tight samples: a 1% shift is statistically clear but below the 2% threshold.
    base = samples(100, n=20, spread=0.002, seed=1)
    head = samples(99, n=20, spread=0.002, seed=2)
    verdict = compare_samples(base, head, higher_is_better=True)
    assert verdict.p_value < 0.001
    assert verdict.verdict == UNCHANGED
    assert "below the 2% minimum effect" in verdict.note
    # ... and a caller who cares about 0.5% changes gets the regression.
    assert compare_samples(base, head, True, min_effect=0.005).verdict == REGRESSED


def test_a_large_but_noisy_shift_without_rank_evidence_is_unchanged():
    # Medians differ by 10%, but the samples overlap completely: no rank evidence.
    base = [100, 60, 140, 90, 110, 70, 130]
    head = [90, 55, 145, 80, 105, 65, 135]
    verdict = compare_samples(base, head, higher_is_better=True)
    assert verdict.head_median / verdict.base_median - 1 == pytest.approx(-0.10)
    assert verdict.p_value > 0.05 and verdict.low < 0 < verdict.high
    assert verdict.verdict == UNCHANGED


def test_one_outlier_does_not_fake_a_regression_that_a_mean_rule_would_report():
    base = samples(100, seed=1)
    head = samples(100, seed=2)
    head[3] = 5.0  # one hiccup (a page fault storm, a preempted trial)
    mean_change = np.mean(head) / np.mean(base) - 1
    assert mean_change < -0.05  # a "mean got 5% worse" rule would call this a regression
    assert compare_samples(base, head, higher_is_better=True).verdict == UNCHANGED


def test_too_few_samples_are_never_a_verdict():
    verdict = compare_samples([100, 101, 99], [50, 51, 49], higher_is_better=True)
    assert verdict.verdict == UNCHANGED
    assert verdict.p_value is None
    assert "too few samples" in verdict.note


def test_identical_constant_samples_are_unchanged():
    verdict = compare_samples([3.0] * 6, [3.0] * 6, higher_is_better=True)
    assert verdict.verdict == UNCHANGED and verdict.change == 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="non-empty"):
        compare_samples([], [1.0], True)
    with pytest.raises(ValueError, match="alpha"):
        compare_samples([1.0], [1.0], True, alpha=1.5)
    with pytest.raises(ValueError, match="min_effect"):
        compare_samples([1.0], [1.0], True, min_effect=-0.1)
