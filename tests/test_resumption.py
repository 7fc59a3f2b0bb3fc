"""Resumption after near-ties: the comparison goes on along the engine's own path.

Synthetic traces pin the rules (comparator.py, rule 5); the dummy model shows them on
real engines: ``NoisyLogits`` (tests/mutants.py) is a correct engine whose rounding
flips the reference's 0.00045-nat near-tie at step 5 of ``resumption/near_tie``, and
``NoisyThenPositionSlip`` is the same engine with a real bug from step 8 on.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from conformance_helpers import decode_bytes, dummy_case, dummy_oracle, make_trace
from mutants import NoisyLogits, NoisyThenPositionSlip

from conformance.catalogue import build_request
from conformance.comparator import (
    FAIL,
    NEAR_TIE,
    ResumptionUnavailable,
    compare_traces,
)
from conformance.profiles import PROFILES
from conformance.runner import run_case
from engines.models import ModelSource
from engines.protocol import ProcessorSettings, Trace

FP32 = PROFILES["fp32"]  # tie_epsilon 0.01, logprob_atol 2e-3, max_near_ties 8
SOURCE = ModelSource("dummy", "builtin")

# The reference's path: tokens 1 2 3 4 5, each the clear favourite except step 2,
# where token 3 leads token 9 by only 0.004 nats (under epsilon 0.01).
EXPECTED = make_trace(
    [1, 2, 3, 4, 5],
    [-0.1, -0.1, -0.7, -0.1, -0.1],
    [[(1, -0.1), (0, -3.0)], [(2, -0.1), (0, -3.0)], [(3, -0.7), (9, -0.704)]]
    + [[(t, -0.1), (0, -3.0)] for t in (4, 5)],
)


def engine_trace(tokens, logprobs=None):
    return make_trace(tokens, logprobs or [-0.1] * len(tokens))


def reference_path(tokens, tops, logprobs):
    """What the reference makes of the engine's tokens: one top list per step."""
    return make_trace(tokens, logprobs, tops)


def compare(actual, resume=None, profile=FP32):
    return compare_traces(EXPECTED, actual, profile, decode_bytes, resume=resume)


def agreeing_path(tokens):
    """The reference along ``tokens`` where each engine token is its clear top choice."""
    return reference_path(tokens, [[(t, -0.1), (0, -3.0)] for t in tokens], [-0.1] * len(tokens))


def test_without_resumption_the_comparison_stops_at_the_near_tie_and_counts_what_it_left():
    actual = engine_trace([1, 2, 9, 200, 201, 202])
    result = compare(actual)
    assert result.verdict == NEAR_TIE and result.diagnostic.step == 2
    # Steps 3, 4 and 5 were never looked at, whatever they hold.
    assert result.unjudged_steps == 3 and result.judged_steps == 3
    assert "3 later steps unjudged" in result.summary


def test_after_a_near_tie_every_later_step_is_judged_on_the_engines_path():
    actual = engine_trace([1, 2, 9, 7, 8, 6])
    calls = []

    def resume(tokens):
        calls.append(tokens)
        path = agreeing_path(tokens)
        # At the near-tie itself the reference's view is its own top list (3 ahead of 9).
        path.events[2].top_logprobs = [(3, -0.7), (9, -0.704)]
        path.events[2].logprob = -0.704
        path.events[2].token = 9
        return path

    result = compare(
        engine_trace([1, 2, 9, 7, 8, 6], [-0.1, -0.1, -0.704, -0.1, -0.1, -0.1]), resume
    )
    assert calls == [actual.tokens]
    assert result.verdict == NEAR_TIE
    assert result.near_tie_steps == [2] and result.judged_steps == 6 and result.unjudged_steps == 0
    assert (
        "1 near-tie crossed (steps 2)" in result.summary and "all 6 steps judged" in result.summary
    )


def test_a_wrong_token_after_the_near_tie_fails_at_its_step_with_a_diagnostic():
    actual = engine_trace([1, 2, 9, 7, 8], [-0.1, -0.1, -0.704, -0.1, -2.0])

    def resume(tokens):
        path = agreeing_path(tokens)
        path.events[2] = replace(
            path.events[2], logprob=-0.704, top_logprobs=[(3, -0.7), (9, -0.704)]
        )
        # At step 4 the reference prefers 44 by 1.9 nats: a real failure, not a tie.
        path.events[4] = replace(path.events[4], logprob=-2.0, top_logprobs=[(44, -0.1), (8, -2.0)])
        return path

    result = compare(actual, resume)
    d = result.diagnostic
    assert result.verdict == FAIL and d.kind == "token" and d.step == 4
    assert (d.expected_token, d.actual_token) == (44, 8)
    assert d.margin == pytest.approx(1.9)
    assert result.near_tie_steps == [2] and result.judged_steps == 5
    assert "engine's own path" in result.summary and "steps 2" in result.summary
    assert d.context == decode_bytes([1, 2, 9, 7])


def test_a_wrong_logprob_after_the_near_tie_fails_at_its_step():
    actual = engine_trace([1, 2, 9, 7, 8], [-0.1, -0.1, -0.704, -0.1, -0.3])

    def resume(tokens):
        path = agreeing_path(tokens)
        path.events[2] = replace(
            path.events[2], logprob=-0.704, top_logprobs=[(3, -0.7), (9, -0.704)]
        )
        return path

    result = compare(actual, resume)
    # |-0.3 - -0.1| = 0.2 > 2e-3 + 1e-4 * 0.1 at step 4 (step 3 agrees exactly).
    assert result.verdict == FAIL and result.diagnostic.kind == "logprob"
    assert result.diagnostic.step == 4
    assert result.diagnostic.tolerance == pytest.approx(FP32.logprob_tolerance(-0.1))


def test_further_near_ties_are_counted_and_over_the_cap_the_case_is_near_tie_limited():
    n = 12
    tokens = [1, 2, 9] + [50 + i for i in range(n)]

    def resume(tokens):
        # Each later engine token trails the reference's top choice by 0.005 nats.
        tops = [[(t, -0.1), (0, -3.0)] for t in tokens[:2]] + [[(3, -0.7), (9, -0.704)]]
        tops += [[(0, -0.695), (t, -0.7)] for t in tokens[3:]]
        return reference_path(tokens, tops, [-0.1, -0.1, -0.704] + [-0.7] * n)

    actual = engine_trace(tokens, [-0.1, -0.1, -0.704] + [-0.7] * n)
    capped = compare(actual, resume, replace(FP32, max_near_ties=20))
    assert capped.verdict == NEAR_TIE and not capped.near_tie_limited
    assert capped.near_tie_steps == list(range(2, 3 + n))
    limited = compare(actual, resume)  # cap 8: the 9th near-tie (step 10) ends the judging
    assert limited.verdict == NEAR_TIE and limited.near_tie_limited
    assert limited.near_tie_steps == list(range(2, 11)) and limited.judged_steps == 11
    assert limited.unjudged_steps == len(tokens) - 11
    assert limited.summary.startswith("near-tie-limited: 9 near-ties by step 10")


def test_an_oracle_that_cannot_score_the_continuation_says_so():
    def resume(tokens):
        raise ResumptionUnavailable("snapshots hold the reference's own path only")

    result = compare(engine_trace([1, 2, 9, 7]), resume)
    assert result.verdict == NEAR_TIE and result.unjudged_steps == 1
    assert "1 later steps unjudged (snapshots hold the reference's own path only)" in result.summary


def test_resume_must_answer_along_the_engines_tokens():
    with pytest.raises(ValueError, match="engine's tokens"):
        compare(engine_trace([1, 2, 9, 7]), lambda tokens: agreeing_path([1, 2, 3, 4]))


# -- the oracle's side: scoring an engine's continuation --------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the score path
        # Settings that shape the logits: decoded with a sampler forced onto the tokens.
        {"processors": ProcessorSettings(logit_bias={101: 3.0}, repetition_penalty=1.3)},
        {"max_kv_size": 8, "prefill_step_size": 3},
    ],
    ids=["plain", "bias-and-penalty", "window"],
)
def test_the_continuation_along_the_references_own_path_is_its_own_answer(overrides):
    oracle = dummy_oracle()
    request = replace(
        build_request({"prompt": "Hello, world!", "max_tokens": 12}, oracle), **overrides
    )
    answer = oracle.answer(request)
    path = oracle.continuation(request, answer.tokens)
    assert path.tokens == answer.tokens
    for own, scored in zip(answer.events, path.events):
        assert scored.logprob == pytest.approx(own.logprob, abs=1e-4)
        assert [t for t, _ in scored.top_logprobs[:3]] == [t for t, _ in own.top_logprobs[:3]]


def test_the_continuation_honours_the_settings_that_shape_the_logits():
    oracle = dummy_oracle()
    plain = build_request({"prompt": "Hello, world!", "max_tokens": 8}, oracle)
    tokens = oracle.answer(plain).tokens
    bias = -5.0
    biased = replace(plain, processors=ProcessorSettings(logit_bias={tokens[3]: bias}))
    before = oracle.continuation(plain, tokens).events[3].logprob
    after = oracle.continuation(biased, tokens).events[3].logprob
    # A bias b on a token of probability p: its logprob becomes
    # log(p e^b / (p e^b + 1 - p)) = logprob + b - log(p e^b + 1 - p).
    p = math.exp(before)
    assert after == pytest.approx(before + bias - math.log(p * math.exp(bias) + 1 - p), abs=1e-4)


# -- on real engines ----------------------------------------------------------------------------


def test_a_noisy_but_correct_engine_passes_with_its_near_tie_counted():
    oracle = dummy_oracle()
    result = run_case(dummy_case("resumption/near_tie"), NoisyLogits(SOURCE), oracle, FP32)
    assert result.verdict == NEAR_TIE, [f.summary for f in result.findings]
    (finding,) = result.findings
    assert finding.near_tie_steps == [5] and finding.unjudged_steps == 0
    assert "all 16 steps judged, 11 of them on" in finding.summary


def test_a_bug_after_the_near_tie_fails_at_its_step_and_would_have_passed_before():
    oracle = dummy_oracle()
    case = dummy_case("resumption/near_tie")
    engine = NoisyThenPositionSlip(SOURCE)
    result = run_case(case, engine, oracle, FP32)
    (finding,) = result.failures()
    # The position slips once the cache passes prompt + 7 positions: token 8 is the
    # first computed from a slipped position (token k is computed at position prompt + k - 1).
    assert finding.diagnostic.step == engine.slip_after + 1
    assert finding.near_tie_steps == [5] and "own path" in finding.summary
    # Today's comparison without resumption: the near-tie at step 5 ends it, and the
    # slip at step 8 is never seen.
    request = build_request(case.request, oracle)
    trace = Trace(list(engine.generate(replace(request, top_logprobs=5))))
    stopped = compare_traces(oracle.answer(request), trace, FP32, oracle.decode)
    assert stopped.verdict == NEAR_TIE and stopped.unjudged_steps == 10
    # The noise alone stays far below the bug: at most 0.0006 nats (the slip: 0.058 at step 8).
    quiet = Trace(list(NoisyLogits(SOURCE).generate(replace(request, top_logprobs=5))))
    path = oracle.continuation(request, quiet.tokens)
    noise = max(abs(a.logprob - b.logprob) for a, b in zip(quiet.events, path.events))
    assert noise < FP32.logprob_atol
