"""Implied sampler distributions (checked against mlx-lm's own filters) and the fit test."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import sample_utils

from conformance.protocol import SamplerSettings
from conformance.sampling_stats import goodness_of_fit, implied_distribution


def random_logprobs(seed: int, size: int = 50) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=2.0, size=size)
    return logits - np.log(np.exp(logits).sum())


def mlx_lm_kept(logprobs: np.ndarray, s: SamplerSettings) -> np.ndarray:
    """Which tokens mlx-lm's own filter functions keep, in make_sampler's order."""
    x = mx.array(logprobs[None].astype(np.float32))
    if 0 < s.top_p < 1:
        x = sample_utils.apply_top_p(x, s.top_p)
    if s.min_p > 0:
        x = sample_utils.apply_min_p(x, s.min_p, s.min_tokens_to_keep)
    if s.top_k > 0:
        x = sample_utils.apply_top_k(x, s.top_k)
    return np.isfinite(np.array(x[0]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "settings",
    [
        SamplerSettings(temp=1.0, top_p=0.9),
        SamplerSettings(temp=0.7, top_p=0.5),
        SamplerSettings(temp=1.0, min_p=0.1),
        SamplerSettings(temp=1.0, min_p=0.3, min_tokens_to_keep=4),
        SamplerSettings(temp=1.0, top_k=5),
        SamplerSettings(temp=0.8, top_p=0.95, min_p=0.05, top_k=10),
    ],
)
def test_the_implied_support_is_what_mlx_lm_keeps(settings, seed):
    logprobs = random_logprobs(seed)
    probs = implied_distribution(logprobs, settings)
    np.testing.assert_array_equal(probs > 0, mlx_lm_kept(logprobs, settings))
    assert probs.sum() == pytest.approx(1.0)


def test_temperature_reshapes_the_kept_tokens():
    logprobs = random_logprobs(1)
    probs = implied_distribution(logprobs, SamplerSettings(temp=0.5))
    expected = np.exp(logprobs / 0.5) / np.exp(logprobs / 0.5).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    # Filters act on the untempered probabilities: top_p 0.5 keeps the same tokens at any temp.
    kept = [
        implied_distribution(logprobs, SamplerSettings(temp=t, top_p=0.5)) > 0 for t in (0.3, 1, 3)
    ]
    assert (kept[0] == kept[1]).all() and (kept[1] == kept[2]).all()


def test_draws_from_the_right_distribution_fit_and_wrong_ones_do_not():
    rng = np.random.default_rng(5)
    probs = implied_distribution(random_logprobs(2), SamplerSettings(temp=1.0, top_k=8))
    right = rng.choice(len(probs), size=2000, p=probs)
    fit = goodness_of_fit(list(right), probs)
    assert fit.passed(alpha=1e-3) and fit.df >= 1 and fit.draws == 2000
    hotter = implied_distribution(random_logprobs(2), SamplerSettings(temp=1.6, top_k=8))
    wrong = rng.choice(len(probs), size=2000, p=hotter)
    fit = goodness_of_fit(list(wrong), probs)
    assert not fit.passed(alpha=1e-3) and fit.p_value < 1e-6
    assert not fit.outside_support  # same support, wrong frequencies


def test_a_single_draw_outside_the_support_fails():
    probs = np.array([0.5, 0.5, 0.0, 0.0])
    fit = goodness_of_fit([0, 1, 0, 1, 3] * 20, probs)
    assert fit.outside_support == {3: 20} and not fit.passed(alpha=1e-9)
    assert goodness_of_fit([0, 1] * 50 + [7], probs).outside_support == {7: 1}


def test_rare_tokens_are_pooled_so_expected_counts_stay_valid():
    probs = np.array([0.6, 0.3, 0.05, 0.03, 0.02])
    fit = goodness_of_fit([0] * 60 + [1] * 30 + [2] * 5 + [3] * 3 + [4] * 2, probs)
    assert all(expected >= 5 for _, _, expected in fit.bins)
    assert sorted(t for tokens, _, _ in fit.bins for t in tokens) == [0, 1, 2, 3, 4]
    assert fit.p_value > 0.9
    assert goodness_of_fit([0] * 10, np.array([1.0, 0.0])).p_value == 1.0
