"""Samplers and logits processors: support sets, seeding, and agreement with mlx-lm."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from reference import make_logits_processors, make_sampler
from reference.sampler import apply_min_p, apply_top_k, apply_top_p

mlx_lm_sample_utils = pytest.importorskip(
    "mlx_lm.sample_utils", reason="peer mlx-lm not installed: pip install 'lmconform[peers]'"
)


def random_logprobs(seed: int, vocab: int = 50) -> mx.array:
    logits = mx.array(np.random.default_rng(seed).normal(size=(1, vocab)) * 2, dtype=mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kept(logprobs: mx.array) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.array(logprobs[0]))).tolist())


def test_top_k_keeps_exactly_k_most_likely():
    lp = random_logprobs(0)
    order = np.argsort(-np.array(lp[0]))
    assert kept(apply_top_k(lp, 5)) == set(order[:5].tolist())
    with pytest.raises(ValueError, match="top_k"):
        apply_top_k(lp, 50)


def test_top_p_keeps_smallest_set_reaching_mass():
    lp = random_logprobs(1)
    probs = np.exp(np.array(lp[0], dtype=np.float64))
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    n_needed = int(np.searchsorted(cumulative, 0.9) + 1)
    assert kept(apply_top_p(lp, 0.9)) == set(order[:n_needed].tolist())


def test_min_p_is_relative_to_the_top_probability():
    lp = random_logprobs(2)
    probs = np.exp(np.array(lp[0], dtype=np.float64))
    expected = set(np.flatnonzero(probs >= 0.1 * probs.max()).tolist())
    assert kept(apply_min_p(lp, 0.1)) == expected
    assert len(kept(apply_min_p(lp, 0.999, min_tokens_to_keep=3))) == 3


@pytest.mark.parametrize(
    "settings",
    [
        {"temp": 0.7},
        {"temp": 1.0, "top_k": 5},
        {"temp": 1.0, "top_p": 0.9},
        {"temp": 1.0, "min_p": 0.1},
        {"temp": 0.8, "top_p": 0.95, "top_k": 10, "min_p": 0.05},
    ],
)
def test_seeded_draws_equal_mlx_lm(settings):
    ours, theirs = make_sampler(**settings), mlx_lm_sample_utils.make_sampler(**settings)
    for seed in range(20):
        lp = random_logprobs(100 + seed)
        mx.random.seed(seed)
        a = ours(lp).item()
        mx.random.seed(seed)
        b = theirs(lp).item()
        assert a == b


def test_draws_stay_in_support_and_follow_temperature():
    lp = random_logprobs(3, vocab=8)
    sampler = make_sampler(temp=0.5, top_k=3)
    support = kept(apply_top_k(lp, 3))
    mx.random.seed(0)
    draws = [sampler(lp).item() for _ in range(3000)]
    assert set(draws) <= support
    # Empirical frequencies match softmax(logprobs / temp) restricted to the top 3.
    scaled = np.array(lp[0], dtype=np.float64) / 0.5
    idx = sorted(support)
    p = np.exp(scaled[idx] - scaled[idx].max())
    p /= p.sum()
    freq = np.array([draws.count(i) for i in idx]) / len(draws)
    assert np.abs(freq - p).max() < 4 * math.sqrt(0.25 / len(draws))


def test_greedy_when_temperature_is_zero():
    lp = random_logprobs(4)
    assert make_sampler(temp=0.0)(lp).item() == int(np.argmax(np.array(lp[0])))
    with pytest.raises(ValueError, match="temp"):
        make_sampler(temp=-1.0)


@pytest.mark.parametrize(
    "settings",
    [
        {"logit_bias": {3: 5.0, 7: -2.5}},
        {"repetition_penalty": 1.3, "repetition_context_size": 4},
        {"presence_penalty": 0.7},
        {"frequency_penalty": 0.4, "frequency_context_size": 6},
        {
            "logit_bias": {1: 1.0},
            "repetition_penalty": 1.1,
            "presence_penalty": 0.2,
            "frequency_penalty": 0.3,
        },
    ],
)
def test_logits_processors_equal_mlx_lm(settings):
    tokens = mx.array([1, 3, 3, 7, 9, 3, 12, 7])
    logits = random_logprobs(5) * 3
    original = np.array(logits)
    ours = logits
    for processor in make_logits_processors(**settings):
        ours = processor(tokens, ours)
    # mlx-lm's penalties write into their input, so give them a copy.
    theirs = mx.array(original)
    for processor in mlx_lm_sample_utils.make_logits_processors(**settings):
        theirs = processor(tokens, theirs)
    assert mx.allclose(ours, theirs, atol=1e-6).item()
    assert not np.allclose(np.array(ours), original)
    # Ours never modify the caller's array.
    assert np.array_equal(np.array(logits), original)


def test_frequency_penalty_counts_occurrences():
    tokens = mx.array([3, 3, 3, 5])
    logits = mx.zeros((1, 8))
    (processor,) = make_logits_processors(frequency_penalty=0.5)
    out = processor(tokens, logits)[0].tolist()
    assert out[3] == pytest.approx(-1.5) and out[5] == pytest.approx(-0.5) and out[0] == 0.0
