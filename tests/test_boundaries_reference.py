"""Boundaries of every filter, penalty and stop rule of the reference engine.

Each rule is probed on both sides of its edge (and exactly on it where float32
arithmetic makes the edge reachable), so that an off-by-one, a ``<`` for ``<=`` or a
wrong sign changes an assertion. Expected values are derived in the comments from
the rule the module docstring states. Where a mutant cannot be observed with floats
the comment says why.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from reference import make_sampler, stream_generate
from reference.batch import BatchGenerator, Request
from reference.logits_processors import (
    make_frequency_penalty,
    make_logit_bias,
    make_logits_processors,
    make_presence_penalty,
    make_repetition_penalty,
)
from reference.sampler import apply_min_p, apply_top_k, apply_top_p


def kept(filtered: mx.array) -> set[int]:
    """The token ids a filter left finite."""
    return set(np.flatnonzero(np.isfinite(np.array(filtered).reshape(-1))).tolist())


def logprobs_of(probs) -> mx.array:
    return mx.log(mx.array([probs], dtype=mx.float32))


# -- top-k ----------------------------------------------------------------------------------

PROBS = [0.1, 0.5, 0.15, 0.25]  # ranked: 1, 3, 2, 0; cumulative mass above: 0, .5, .75, .9


@pytest.mark.parametrize("k, expected", [(1, {1}), (2, {1, 3}), (3, {1, 3, 2})])
def test_top_k_keeps_exactly_the_k_most_likely(k, expected):
    assert kept(apply_top_k(logprobs_of(PROBS), k)) == expected


@pytest.mark.parametrize("k", [0, 4, -1, 1.0])
def test_top_k_outside_1_to_vocab_minus_1_is_refused(k):
    # k = vocab keeps everything: the caller should disable the filter (top_k=0) instead.
    with pytest.raises(ValueError, match="top_k"):
        apply_top_k(logprobs_of(PROBS), k)


def test_top_k_with_a_tie_at_the_kth_place_keeps_exactly_k():
    # Which of two tied tokens survives is the partition's choice, but never both.
    survivors = kept(apply_top_k(logprobs_of([0.4, 0.2, 0.2, 0.2]), 2))
    assert len(survivors) == 2 and 0 in survivors


# -- top-p ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_p, expected",
    [(0.45, {1}), (0.55, {1, 3}), (0.7, {1, 3}), (0.8, {1, 3, 2}), (0.85, {1, 3, 2})],
)
def test_top_p_keeps_the_token_that_crosses_the_mass(top_p, expected):
    # A token survives iff the mass strictly above it is below top_p: 3 (0.5 above) needs
    # top_p > 0.5, 2 (0.75 above) needs top_p > 0.75, 0 (0.9 above) is dropped at 0.85.
    assert kept(apply_top_p(logprobs_of(PROBS), top_p)) == expected


def test_top_p_keeps_every_token_tied_at_the_threshold():
    # Sorted, the second 0.25 has 0.75 of mass above it, but it ties the first (0.5 above)
    # and ties at the threshold all survive.
    assert kept(apply_top_p(logprobs_of([0.5, 0.25, 0.25]), 0.6)) == {0, 1, 2}


def test_top_p_is_relative_to_the_total_mass():
    # Unnormalised logprobs (x2 mass): the same relative mass decides.
    doubled = logprobs_of(PROBS) + math.log(2.0)
    assert kept(apply_top_p(doubled, 0.55)) == {1, 3}
    assert kept(apply_top_p(doubled, 0.45)) == {1}


# -- min-p ----------------------------------------------------------------------------------


@pytest.mark.parametrize("min_p, expected", [(0.45, {1, 3}), (0.55, {1}), (0.25, {1, 3, 2})])
def test_min_p_is_relative_to_the_top_token(min_p, expected):
    # Relative to the top (0.5): 3 has ratio 0.5, 2 has 0.3, 0 has 0.2.
    assert kept(apply_min_p(logprobs_of(PROBS), min_p)) == expected


def test_min_p_keeps_a_token_exactly_at_the_threshold():
    # In float32, max + log(0.5) = 0 + log(0.5) rounds to the same float32 as the stored
    # log(0.5), so the token sits exactly on the threshold: "keep at least min_p times the
    # top" keeps it ("<" drops below; a "<=" would drop it).
    logprobs = mx.array([[0.0, math.log(0.5), -3.0]], dtype=mx.float32)
    assert kept(apply_min_p(logprobs, 0.5)) == {0, 1}


def test_min_p_zero_keeps_everything_and_one_keeps_the_top_ties():
    assert kept(apply_min_p(logprobs_of(PROBS), 0.0)) == {0, 1, 2, 3}
    assert kept(apply_min_p(logprobs_of([0.4, 0.4, 0.2]), 1.0)) == {0, 1}


@pytest.mark.parametrize("keep, expected", [(1, {1}), (2, {1, 3}), (3, {1, 3, 2})])
def test_min_tokens_to_keep_overrides_min_p(keep, expected):
    assert kept(apply_min_p(logprobs_of(PROBS), 0.9, keep)) == expected


@pytest.mark.parametrize(
    "min_p, keep, message",
    [
        (-0.1, 1, r"min_p must be in \[0, 1\]"),
        (1.1, 1, r"min_p must be in \[0, 1\]"),
        (0.5, 0, "min_tokens_to_keep must be a positive integer"),
    ],
)
def test_min_p_settings_outside_their_range_are_refused(min_p, keep, message):
    with pytest.raises(ValueError, match=message):
        apply_min_p(logprobs_of(PROBS), min_p, keep)


# -- a batch of rows: every filter works row by row -----------------------------------------

ROWS = [[0.1, 0.5, 0.15, 0.25], [0.4, 0.05, 0.3, 0.25]]


@pytest.mark.parametrize(
    "apply",
    [
        lambda x: apply_top_k(x, 2),
        lambda x: apply_top_p(x, 0.6),
        lambda x: apply_min_p(x, 0.7),
        lambda x: apply_min_p(x, 0.9, 2),
    ],
    ids=["top_k", "top_p", "min_p", "min_tokens_to_keep"],
)
def test_filters_on_a_batch_equal_filters_on_each_row(apply):
    # A batch generator samples (rows, vocab) at once: sorting, sums, maxima and
    # partitions must run along the vocabulary, never across rows. (axis=+1 for -1 is
    # equivalent here: logprobs are always two-dimensional.)
    batch = np.array(apply(mx.log(mx.array(ROWS, dtype=mx.float32))))
    for i, row in enumerate(ROWS):
        alone = np.array(apply(logprobs_of(row)))
        assert batch.shape == (2, 4)
        np.testing.assert_array_equal(batch[i : i + 1], alone)


# -- make_sampler: temperature, disabled filters --------------------------------------------


def draws(sampler, logprobs: mx.array, n: int = 64, seed: int = 7) -> list[int]:
    mx.random.seed(seed)
    return [sampler(logprobs).item() for _ in range(n)]


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_the_sampler_draws_from_logprobs_over_temp(temp):
    # Same seed, same categorical draw on logprobs / temp: the same tokens.
    logprobs = logprobs_of(PROBS)
    mx.random.seed(3)
    wanted = [mx.random.categorical(logprobs / temp).item() for _ in range(64)]
    assert draws(make_sampler(temp=temp), logprobs, seed=3) == wanted


def test_temperature_zero_is_greedy_and_negative_is_refused():
    assert set(draws(make_sampler(temp=0.0), logprobs_of(PROBS), n=8)) == {1}
    with pytest.raises(ValueError, match="temp"):
        make_sampler(temp=-0.1)


@pytest.mark.parametrize("top_p", [0.0, 1.0])
def test_top_p_of_0_or_1_disables_the_filter(top_p):
    # Token 0 (0.1) is drawn sometimes when nothing filters it.
    sampled = draws(make_sampler(temp=1.0, top_p=top_p), logprobs_of(PROBS), n=200)
    assert set(sampled) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"top_p": -0.1}, r"top_p must be in \[0, 1\], got -0.1"),
        ({"top_p": 1.1}, r"top_p must be in \[0, 1\], got 1.1"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
        ({"min_p": -0.5}, r"min_p must be in \[0, 1\]"),
        ({"temp": math.nan}, "temp must be a finite number >= 0, got nan"),
        ({"temp": math.inf}, "temp must be a finite number >= 0"),
        ({"temp": "0.5"}, "temp must be"),
        ({"top_p": True}, "top_p must be"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.0}, "top_k must be an integer >= 0"),
        ({"top_k": True}, "top_k must be an integer >= 0"),
        ({"min_tokens_to_keep": 0}, "min_tokens_to_keep must be a positive integer"),
        ({"min_tokens_to_keep": 1.0}, "min_tokens_to_keep must be a positive integer"),
    ],
)
def test_sampler_settings_outside_their_range_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(**{"temp": 1.0, **settings})


def test_sampler_settings_at_the_ends_of_their_range_are_accepted():
    # min_p 1 keeps only the top token; top_p 1 disables its filter; temp 0 is greedy.
    sampler = make_sampler(temp=1.0, min_p=1.0, top_p=1.0)
    assert set(draws(sampler, logprobs_of(PROBS), n=16)) == {1}
    assert set(draws(make_sampler(temp=0.0, top_p=0.0, min_p=0.0), logprobs_of(PROBS))) == {1}


def test_top_k_must_be_below_the_vocabulary_when_generation_starts():
    sampler = make_sampler(temp=1.0, top_k=4)
    with pytest.raises(ValueError, match="top_k must be below the vocabulary size 4, got 4"):
        sampler.check_vocabulary(4)
    sampler.check_vocabulary(5)


def test_the_sampler_applies_every_filter():
    # top_p 0.8 keeps {1, 3, 2}, min_p 0.45 keeps {1, 3}, top_k 1 keeps {1}; each alone
    # would allow more. (The order top-p, min-p, top-k cannot be observed here: each
    # filter keeps a most-likely prefix, so their composition is the intersection.)
    logprobs = logprobs_of(PROBS)
    assert set(draws(make_sampler(temp=1.0, top_p=0.8, min_p=0.45), logprobs, n=100)) == {1, 3}
    assert set(draws(make_sampler(temp=1.0, top_p=0.8, top_k=1), logprobs, n=20)) == {1}


# -- logits processors ----------------------------------------------------------------------


def logits(values) -> mx.array:
    return mx.array([values], dtype=mx.float32)


def as_list(array: mx.array) -> list[float]:
    return np.array(array).reshape(-1).tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    penalise = make_repetition_penalty(2.0, context_size=20)
    out = penalise(mx.array([0, 1, 2]), logits([4.0, -4.0, 0.0, 3.0]))
    # Token 0: 4 / 2; token 1: -4 x 2; token 2: 0 either way (so "<" vs "<=" at 0 cannot
    # be observed: 0 x p == 0 / p); token 3 unseen.
    assert as_list(out) == [2.0, -8.0, 0.0, 3.0]


def test_repetition_penalty_window_is_the_last_context_size_tokens():
    penalise = make_repetition_penalty(2.0, context_size=2)
    out = penalise(mx.array([0, 1, 2]), logits([4.0, 4.0, 4.0, 4.0]))
    assert as_list(out) == [4.0, 2.0, 2.0, 4.0]  # token 0 is three tokens back
    assert as_list(penalise(mx.array([], dtype=mx.int32), logits([4.0, 4.0]))) == [4.0, 4.0]


def test_repetition_penalty_counts_a_repeated_token_once():
    out = make_repetition_penalty(2.0)(mx.array([0, 0, 0]), logits([8.0, 8.0]))
    assert as_list(out) == [4.0, 8.0]


def test_repetition_penalty_must_be_a_non_negative_number():
    with pytest.raises(ValueError):
        make_repetition_penalty(-0.5)


def test_presence_penalty_subtracts_once_within_the_window():
    penalise = make_presence_penalty(1.5, context_size=3)
    out = penalise(mx.array([0, 1, 1, 2]), logits([1.0, 1.0, 1.0, 1.0]))
    assert as_list(out) == [1.0, -0.5, -0.5, 1.0]  # 1 counted once; 0 outside the window
    assert as_list(penalise(mx.array([], dtype=mx.int32), logits([1.0]))) == [1.0]


def test_frequency_penalty_subtracts_per_occurrence_within_the_window():
    penalise = make_frequency_penalty(0.5, context_size=3)
    out = penalise(mx.array([1, 0, 1, 1, 2]), logits([0.0, 0.0, 0.0, 0.0]))
    # The window is [1, 1, 2]: token 1 twice, token 2 once, token 0 (further back) not.
    assert as_list(out) == [0.0, -1.0, -0.5, 0.0]
    assert as_list(penalise(mx.array([], dtype=mx.int32), logits([1.0]))) == [1.0]


def test_logit_bias_adds_to_the_named_tokens():
    out = make_logit_bias({1: 2.5, 3: -1.0})(mx.array([0]), logits([0.0, 0.0, 0.0, 0.0]))
    assert as_list(out) == [0.0, 2.5, 0.0, -1.0]


def test_processors_run_bias_first_then_repetition_presence_frequency():
    processors = make_logits_processors(
        logit_bias={0: 1.0},
        repetition_penalty=2.0,
        presence_penalty=0.25,
        frequency_penalty=0.125,
    )
    out = logits([1.0, 1.0])
    for processor in processors:
        out = processor(mx.array([0, 0]), out)
    # (1 + 1) / 2 = 1, - 0.25 = 0.75, - 2 x 0.125 = 0.5; bias after the penalty would give
    # 1.25. Token 1 is unseen and unbiased.
    assert as_list(out) == [0.5, 1.0]


def test_zero_or_missing_penalties_add_no_processor():
    assert make_logits_processors(repetition_penalty=0.0, presence_penalty=None) == []
    assert len(make_logits_processors(logit_bias={1: 1.0}, frequency_penalty=0.1)) == 2


def test_processors_leave_the_callers_logits_unchanged():
    original = logits([4.0, -4.0])
    for processor in make_logits_processors(
        logit_bias={0: 1.0}, repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=1.0
    ):
        processor(mx.array([0, 1]), original)
    assert as_list(original) == [4.0, -4.0]


# -- stop rules: single sequence ------------------------------------------------------------


def force_token_at(token: int, step: int, prompt_length: int):
    """A logits processor that makes ``token`` certain at generation step ``step`` (1-based)."""

    def force(tokens, logits):
        if tokens.size == prompt_length + step - 1:
            return logits.at[:, token].add(1e4)
        return logits

    return force


PROMPT = [1, 5, 9, 13]


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_max_tokens_is_exact(dummy, max_tokens):
    model, tokenizer = dummy
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=max_tokens))
    assert len(responses) == max_tokens
    assert [r.finish_reason for r in responses] == [None] * (max_tokens - 1) + ["length"]


@pytest.mark.parametrize(
    "eos_step, max_tokens, reason, count",
    [(3, 3, "stop", 3), (4, 3, "length", 3), (2, 3, "stop", 2)],
)
def test_eos_on_the_last_allowed_step_is_a_stop(dummy, eos_step, max_tokens, reason, count):
    model, tokenizer = dummy
    eos = min(tokenizer.eos_token_ids)
    processor = force_token_at(eos, eos_step, len(PROMPT))
    responses = list(
        stream_generate(
            model, tokenizer, PROMPT, max_tokens=max_tokens, logits_processors=[processor]
        )
    )
    assert len(responses) == count and responses[-1].finish_reason == reason
    assert (responses[-1].token == eos) is (reason == "stop")


# -- stop rules: batches, stop sequences spanning tokens ------------------------------------


def request(generated, max_tokens=10, stops=()) -> Request:
    return Request(
        0, [1], max_tokens, None, (), [tuple(s) for s in stops], [], [], generated=list(generated)
    )


def test_a_stop_sequence_spanning_tokens_stops_when_its_last_token_arrives():
    stops = [(7, 8, 9)]
    assert request([1, 7, 8], stops=stops).finish_reason() is None
    assert request([1, 7, 8, 9], stops=stops).finish_reason() == "stop"
    assert request([7, 8, 9, 1], stops=stops).finish_reason() is None  # only a suffix counts
    assert request([8, 9], stops=stops).finish_reason() is None  # a partial sequence is not one


def test_length_is_reached_at_exactly_max_tokens_and_stop_wins_there():
    assert request([1, 2], max_tokens=3).finish_reason() is None
    assert request([1, 2, 3], max_tokens=3).finish_reason() == "length"
    assert request([1, 2, 3], max_tokens=3, stops=[(2, 3)]).finish_reason() == "stop"


def test_batched_generation_stops_on_a_stop_sequence_spanning_tokens(dummy):
    model, _ = dummy
    free = BatchGenerator(model, max_tokens=8)
    free.insert([PROMPT])
    greedy = []
    while responses := free.next_generated():
        greedy += [r.token for r in responses]
    assert len(greedy) == 8
    # Stop on tokens 3 and 4 of the free run: the row ends right after the 4th token.
    stopped = BatchGenerator(model, max_tokens=8)
    stopped.insert([PROMPT], stop_sequences=[[greedy[2:4]]])
    out = []
    while responses := stopped.next_generated():
        out += [(r.token, r.finish_reason) for r in responses]
    first = next(i for i in range(1, 8) if greedy[i - 1 : i + 1] == greedy[2:4])
    assert [t for t, _ in out] == greedy[: first + 1]
    assert out[-1][1] == "stop"


def test_the_default_sampler_is_greedy():
    assert set(draws(make_sampler(), logprobs_of(PROBS), n=16)) == {1}


def test_min_tokens_to_keep_reaches_the_sampler():
    # min_p 0.9 alone keeps token 1 only; min_tokens_to_keep=2 adds token 3.
    sampler = make_sampler(temp=1.0, min_p=0.9, min_tokens_to_keep=2)
    assert set(draws(sampler, logprobs_of(PROBS), n=100)) == {1, 3}


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_filters_keep_the_dtype_of_their_input(dtype):
    logprobs = logprobs_of(PROBS).astype(dtype)
    for filtered in (
        apply_top_k(logprobs, 2),
        apply_top_p(logprobs, 0.6),
        apply_min_p(logprobs, 0.4),
    ):
        assert filtered.dtype == dtype and kept(filtered.astype(mx.float32)) == {1, 3}


def default_window_history() -> mx.array:
    """21 tokens: token 0 is 21 back (outside mlx-lm's default window of 20), token 1 is
    20 back (inside), then 19 copies of token 3."""
    return mx.array([0, 1] + [3] * 19)


# Processors are made inside the tests (through lambdas), not at collection time, so that
# mutation testing sees each test reach the factory it checks.
@pytest.mark.parametrize(
    "make, inside",
    [
        (lambda: make_repetition_penalty(2.0), 2.0),  # 4 / 2
        (lambda: make_presence_penalty(1.0), 3.0),  # 4 - 1
        (lambda: make_frequency_penalty(1.0), 3.0),  # 4 - 1, once
        (lambda: make_logits_processors(repetition_penalty=2.0)[0], 2.0),
        (lambda: make_logits_processors(presence_penalty=1.0)[0], 3.0),
        (lambda: make_logits_processors(frequency_penalty=1.0)[0], 3.0),
    ],
)
def test_the_default_window_is_the_last_20_tokens(make, inside):
    out = as_list(make()(default_window_history(), logits([4.0, 4.0, 4.0, 4.0])))
    assert out[:3] == [4.0, inside, 4.0]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: make_repetition_penalty(2.0), [2.0, 4.0]),
        (lambda: make_presence_penalty(1.0), [3.0, 4.0]),
        (lambda: make_frequency_penalty(1.0), [3.0, 4.0]),
    ],
)
def test_a_single_token_of_history_is_penalised(make, expected):
    assert as_list(make()(mx.array([0]), logits([4.0, 4.0]))) == expected


def test_repetition_penalty_divides_logits_between_0_and_1_and_may_be_below_1():
    # 0.5 is positive: divided (a "< 1" test would multiply it instead).
    assert as_list(make_repetition_penalty(2.0)(mx.array([0]), logits([0.5]))) == [0.25]
    # A penalty under 1 is allowed (it favours repeats): 4 / 0.5.
    assert as_list(make_repetition_penalty(0.5)(mx.array([0]), logits([4.0]))) == [8.0]
