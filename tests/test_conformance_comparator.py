"""The tie-aware comparator, on synthetic traces with known answers."""

from __future__ import annotations

import pytest
from conformance_helpers import decode_bytes, make_trace

from conformance.comparator import FAIL, NEAR_TIE, PASS, compare_traces, margin_at
from conformance.profiles import PROFILES, get_profile, profile_for_model

FP32 = PROFILES["fp32"]  # tie_epsilon 0.01, logprob_atol 2e-3


def tops_for(tokens, second, gap, extra=()):
    """Top lists where each chosen token leads ``second`` by ``gap`` nats."""
    return [[(t, -0.1), (second, -0.1 - gap), *extra] for t in tokens]


def compare(expected, actual, profile=FP32):
    return compare_traces(
        expected, actual, profile, decode_bytes, expected_label="ref", actual_label="eng"
    )


def test_identical_traces_pass():
    a = make_trace([72, 105, 33], [-0.1] * 3, tops_for([72, 105, 33], 0, 2.0))
    result = compare(a, make_trace([72, 105, 33], [-0.1] * 3, tops_for([72, 105, 33], 0, 2.0)))
    assert result.verdict == PASS and result.matched_steps == 3 and result.diagnostic is None


def test_divergence_at_a_near_tie_passes_with_a_note_and_stops_there():
    expected = make_trace([72, 105, 33, 33], [-0.1] * 4, tops_for([72, 105, 33, 33], 120, 0.004))
    # The engine takes the runner-up at step 2; afterwards nothing is comparable, and
    # its later tokens (and even its length) must not turn the near-tie into a failure.
    actual = make_trace([72, 105, 120, 1, 2, 3], [-0.1, -0.1, -0.1, -9, -9, -9], finish="stop")
    result = compare(expected, actual)
    assert result.verdict == NEAR_TIE
    assert result.matched_steps == 2
    assert result.diagnostic.step == 2
    assert result.diagnostic.margin == pytest.approx(0.004)
    assert "near-tie" in result.summary and "'!'" in result.summary and "'x'" in result.summary


def test_divergence_beyond_epsilon_fails_with_a_full_diagnostic():
    expected_tops = [[(72, -0.1), (65, -2.4)], [(105, -0.2), (111, -0.7), (97, -3.0)]]
    actual_tops = [[(72, -0.1), (65, -2.4)], [(111, -0.3), (105, -0.9)]]
    expected = make_trace([72, 105], [-0.1, -0.2], expected_tops)
    actual = make_trace([72, 111], [-0.1, -0.3], actual_tops)
    result = compare(expected, actual)
    d = result.diagnostic
    assert result.verdict == FAIL and d.kind == "token" and d.step == 1
    assert (d.expected_token, d.expected_text, d.actual_token, d.actual_text) == (
        105,
        "i",
        111,
        "o",
    )
    assert d.expected_logprob == -0.2 and d.expected_logprob_of_actual == -0.7
    assert d.actual_logprob == -0.3 and d.actual_logprob_of_expected == -0.9
    assert d.margin == pytest.approx(0.5) and not d.margin_is_lower_bound
    assert [r.token for r in d.expected_top] == [105, 111, 97]
    assert [r.token for r in d.actual_top] == [111, 105]
    assert d.context == "H"
    text = result.render("ref", "eng")
    assert "step 1" in text and "ref top-3" in text and "eng top-2" in text


def test_a_token_missing_from_the_top_list_gives_a_lower_bound_margin():
    expected = make_trace([72], [-0.1], [[(72, -0.1), (65, -0.105)]])
    actual = make_trace([90], [-0.1], [[(90, -0.1)]])
    margin, bound, _, other = margin_at(expected.events[0], 90)
    assert bound and other is None and margin == pytest.approx(0.005)
    # Only a bound: not enough to call it a near-tie, even though the bound is below epsilon.
    assert compare(expected, actual).verdict == FAIL


def test_without_reference_logprobs_any_divergence_fails():
    result = compare(make_trace([1, 2]), make_trace([1, 3]))
    assert result.verdict == FAIL and "no logprobs" in result.summary


def test_logprobs_over_the_matched_prefix_must_agree_within_tolerance():
    tops = tops_for([1, 2, 3], 0, 1.0)
    expected = make_trace([1, 2, 3], [-0.1, -0.5, -1.0], tops)
    close = make_trace([1, 2, 3], [-0.1005, -0.5015, -1.0018], tops)
    assert compare(expected, close).verdict == PASS
    far = make_trace([1, 2, 3], [-0.1, -0.5, -1.01], tops)
    result = compare(expected, far)
    assert (
        result.verdict == FAIL
        and result.diagnostic.kind == "logprob"
        and result.diagnostic.step == 2
    )
    # The same difference is fine under a looser profile.
    assert compare(expected, far, PROFILES["q4"]).verdict == PASS


def test_logprobs_before_a_near_tie_are_still_checked():
    expected = make_trace([1, 2], [-0.1, -0.1], tops_for([1, 2], 9, 0.001))
    actual = make_trace([1, 9], [-0.5, -0.1])
    result = compare(expected, actual)
    assert (
        result.verdict == FAIL
        and result.diagnostic.kind == "logprob"
        and result.diagnostic.step == 0
    )


def test_lengths_must_agree_without_a_divergence():
    expected = make_trace([1, 2, 3], finish="stop")
    actual = make_trace([1, 2, 3, 4, 5], finish="length")
    result = compare(expected, actual)
    assert (
        result.verdict == FAIL
        and result.diagnostic.kind == "length"
        and result.diagnostic.step == 3
    )
    assert "eng went on" in result.diagnostic.detail
    shorter = compare(make_trace([1, 2, 3]), make_trace([1, 2]))
    assert shorter.verdict == FAIL and "ref went on" in shorter.diagnostic.detail


def test_finish_reasons_must_agree():
    result = compare(make_trace([1, 2], finish="length"), make_trace([1, 2], finish="stop"))
    assert result.verdict == FAIL and result.diagnostic.kind == "finish_reason"


def test_equal_infinite_logprobs_agree():
    expected = make_trace([1], [float("-inf")])
    assert compare(expected, make_trace([1], [float("-inf")])).verdict == PASS
    assert compare(expected, make_trace([1], [-3.0])).verdict == FAIL


def test_profiles():
    assert profile_for_model("dummy").name == "fp32"
    assert profile_for_model("smollm2-135m").name == "q4"
    assert profile_for_model("dummy", "bf16").name == "bf16"
    with pytest.raises(ValueError, match="unknown precision profile 'fp8'"):
        get_profile("fp8")
    # Looser precision never has tighter tolerances.
    order = ["fp32", "fp16", "q4", "bf16", "q4q8"]
    epsilons = [PROFILES[n].tie_epsilon for n in order]
    assert epsilons == sorted(epsilons)
