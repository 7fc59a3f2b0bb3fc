"""conformance/comparator.py pinned down by what a report shows: for each kind of outcome
(pass, token divergence, logprob error, length, finish reason, a near-tie where judging
stops, and every outcome of resuming on the engine's path) the whole rendered account and
every field of the comparison, on small traces whose numbers are worked out by hand in the
comments. A conformance suite's diagnostics are its product: a changed word is a change."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conformance_helpers import decode_bytes, make_trace

from conformance.comparator import (
    FAIL,
    NEAR_TIE,
    PASS,
    ResumptionUnavailable,
    compare_traces,
    margin_at,
)
from conformance.profiles import PROFILES
from engines.protocol import TokenEvent, Trace

FP32 = PROFILES["fp32"]  # tie_epsilon 0.01; tolerance 2e-3 + 1e-4 * |logprob|


def compare(expected, actual, profile=FP32, **kwargs):
    return compare_traces(
        expected, actual, profile, decode_bytes, expected_label="ref", actual_label="eng", **kwargs
    )


def fields(c):
    return (c.verdict, c.matched_steps, c.max_logprob_error, c.near_tie_steps, c.judged_steps,
            c.unjudged_steps, c.near_tie_limited)  # fmt: skip


# -- on the shared prefix -------------------------------------------------------------------


def test_a_pass_says_how_many_tokens_the_finish_reason_and_the_largest_logprob_error():
    # 'H', 'i': logprobs differ by 0.001 at step 1 (tolerance there 0.00202).
    expected = make_trace([72, 105], [-0.1, -0.2])
    actual = make_trace([72, 105], [-0.1, -0.201])
    c = compare(expected, actual)
    assert (
        c.render() == "pass: 2 identical tokens, finish_reason 'length', max logprob |diff| 0.001"
    )
    assert fields(c)[:2] == (PASS, 2) and c.max_logprob_error == pytest.approx(0.001)
    assert fields(c)[3:] == ([], None, 0, False) and c.diagnostic is None
    # Without logprobs there is no error to state.
    plain = compare(make_trace([72, 105]), make_trace([72, 105]))
    assert plain.render() == "pass: 2 identical tokens, finish_reason 'length'"
    assert plain.max_logprob_error is None
    # Equal infinite logprobs are an error of zero.
    inf = float("-inf")
    c = compare(make_trace([72], [inf]), make_trace([72], [inf]))
    assert c.verdict == PASS and c.max_logprob_error == 0.0


def test_a_token_divergence_beyond_epsilon_renders_both_sides():
    # Step 1: ref chose 'i' at -0.2, ranks 'o' at -0.7: margin 0.5 >= 0.01.
    expected = make_trace(
        [72, 105], [-0.1, -0.2], [[(72, -0.1)], [(105, -0.2), (111, -0.7), (97, -3.0)]]
    )
    actual = make_trace([72, 111], [-0.1, -0.3], [[(72, -0.1)], [(111, -0.3), (105, -0.9)]])
    c = compare(expected, actual)
    assert c.render("ref", "eng").splitlines() == (
        [
            (
                "FAIL: tokens diverge: at step 1 ref chose 'i' (id 105), eng chose 'o' (id 111); "
                "ref margin 0.5 >= epsilon 0.01 (profile fp32)"
            ),
            "  step 1, after 'H'",
            "  ref: logprob('i') = -0.2, logprob('o') = -0.7",
            "  eng: logprob('o') = -0.3, logprob('i') = -0.9",
            "  ref top-3: 'i'(105) -0.2000, 'o'(111) -0.7000, 'a'(97) -3.0000",
            "  eng top-2: 'o'(111) -0.3000, 'i'(105) -0.9000",
        ]
    )
    assert fields(c) == (FAIL, 1, 0.0, [], None, 0, False)
    d = c.diagnostic
    assert (d.kind, d.step, d.context, d.margin_is_lower_bound, d.tolerance) == (
        "token", 1, "H", False, None
    )  # fmt: skip
    # The default labels are the reference and the engine.
    default = compare_traces(expected, actual, FP32, decode_bytes)
    assert (
        default.render()
        .splitlines()[0]
        .startswith(
            "FAIL: tokens diverge: at step 1 reference chose 'i' (id 105), engine chose 'o'"
        )
    )
    assert default.render().splitlines()[2].startswith("  reference: logprob('i')")
    assert default.render().splitlines()[3].startswith("  engine: logprob('o')")


def test_an_unlisted_token_gives_a_lower_bound_and_no_logprobs_give_no_margin():
    # 'x' is not in ref's list: its logprob is at most -0.7, the margin at least 0.5.
    expected = make_trace([72, 105], [-0.1, -0.2], [[(72, -0.1)], [(105, -0.2), (111, -0.7)]])
    actual = make_trace([72, 120], [-0.1, -0.3], [[(72, -0.1)], [(120, -0.3)]])
    c = compare(expected, actual)
    lines = c.render("ref", "eng").splitlines()
    assert lines[0] == (
        "FAIL: tokens diverge: at step 1 ref chose 'i' (id 105), eng chose 'x' (id 120); "
        "ref margin >= 0.5 >= epsilon 0.01 (profile fp32)"
    )
    assert lines[2:4] == [
        "  ref: logprob('i') = -0.2, logprob('x') = not in its top list",
        "  eng: logprob('x') = -0.3, logprob('i') = unknown",
    ]
    assert c.diagnostic.margin_is_lower_bound and c.diagnostic.margin == pytest.approx(0.5)
    # A tiny lower bound is still no near-tie: the true margin may be larger.
    close = make_trace([72, 105], [-0.1, -0.2], [[(72, -0.1)], [(105, -0.2), (111, -0.201)]])
    assert compare(close, actual).verdict == FAIL
    bare = compare(make_trace([72, 105]), make_trace([72, 120]))
    assert bare.render("ref", "eng").splitlines() == [
        (
            "FAIL: tokens diverge: at step 1 ref chose 'i' (id 105), eng chose 'x' (id 120); "
            "ref reported no logprobs, so no near-tie can be recognised (profile fp32)"
        ),
        "  step 1, after 'H'",
        "  ref: logprob('i') = unknown, logprob('x') = unknown",
        "  eng: logprob('x') = unknown, logprob('i') = unknown",
    ]


def test_a_logprob_error_on_the_shared_prefix_names_step_values_and_tolerance():
    # Step 1: |-0.2 - -0.25| = 0.05 > 2e-3 + 1e-4 * 0.2 = 0.00202.
    expected = make_trace([72, 105], [-0.1, -0.2], [[(72, -0.1)], [(105, -0.2)]])
    actual = make_trace([72, 105], [-0.1, -0.25], [[(72, -0.1)], [(105, -0.25), (33, -4.0)]])
    c = compare(expected, actual)
    assert c.render("ref", "eng").splitlines() == (
        [
            (
                "FAIL: logprob of 'i' at step 1 differs: ref -0.2, eng -0.25 "
                "(|diff| 0.05 > tolerance 0.00202, profile fp32)"
            ),
            "  step 1, after 'H'",
            "  tolerance 0.00202",
            "  ref top-1: 'i'(105) -0.2000",
            "  eng top-2: 'i'(105) -0.2500, '!'(33) -4.0000",
        ]
    )
    assert c.verdict == FAIL and c.matched_steps == 2
    assert c.max_logprob_error == pytest.approx(0.05)
    d = c.diagnostic
    assert (d.kind, d.step, d.expected_token, d.actual_token) == ("logprob", 1, 105, 105)
    assert (d.expected_text, d.actual_text) == ("i", "i")
    assert (d.expected_logprob, d.actual_logprob) == (-0.2, -0.25)
    assert d.tolerance == pytest.approx(0.00202)
    # A step where one side gave no logprob is skipped, not the end of the check.
    gap = make_trace([72, 105], [None, -0.2]), make_trace([72, 105], [-0.5, -0.25])
    assert compare(*gap).diagnostic.step == 1


def test_lengths_differ_either_way():
    short, long = make_trace([72, 105], finish="stop"), make_trace([72, 105, 33])
    c = compare(short, long)
    assert c.render("ref", "eng").splitlines() == [
        "FAIL: lengths differ: ref 2 tokens, eng 3 tokens, identical over the first 2",
        "  step 2, after 'Hi'",
        (
            "  ref ended after 2 tokens (finish_reason 'stop'); eng went on with '!' (id 33) to "
            "3 tokens (finish_reason 'length')"
        ),
    ]
    assert (c.diagnostic.expected_token, c.diagnostic.actual_token) == (None, 33)
    assert fields(c) == (FAIL, 2, None, [], None, 0, False)
    c = compare(long, short)
    assert c.render("ref", "eng").splitlines()[0] == (
        "FAIL: lengths differ: ref 3 tokens, eng 2 tokens, identical over the first 2"
    )
    assert c.render("ref", "eng").splitlines()[2] == (
        "  eng ended after 2 tokens (finish_reason 'stop'); ref went on with '!' (id 33) to "
        "3 tokens (finish_reason 'length')"
    )
    assert (c.diagnostic.expected_token, c.diagnostic.actual_token) == (33, None)


def test_finish_reasons_differ_after_the_same_tokens():
    c = compare(make_trace([72], finish="stop"), make_trace([72], finish="length"))
    assert c.render("ref", "eng").splitlines() == [
        "FAIL: finish reasons differ after identical 1 tokens: ref 'stop', eng 'length'",
        "  step 0, after 'H'",
        "  ref finish_reason 'stop', eng 'length'",
    ]
    assert c.diagnostic.kind == "finish_reason" and c.matched_steps == 1
    two = compare(make_trace([72, 105], finish="stop"), make_trace([72, 105], finish="length"))
    assert two.diagnostic.step == 1 and two.diagnostic.context == "Hi"
    empty = compare(Trace([]), Trace([]))
    assert empty.render() == "pass: 0 identical tokens, finish_reason None"


def test_context_is_the_last_sixty_characters_and_top_lists_the_first_five():
    tops = [(65 + i, -0.1 - i) for i in range(7)]
    for n, context in ((60, "a" * 60), (61, "..." + "a" * 60)):
        expected = make_trace([97] * n + [65], [-0.1] * (n + 1), [[(97, -0.1)]] * n + [tops])
        actual = make_trace([97] * n + [66], [-0.1] * (n + 1))
        d = compare(expected, actual).diagnostic
        assert d.context == context and [r.token for r in d.expected_top] == [65, 66, 67, 68, 69]
        assert [r.text for r in d.expected_top] == list("ABCDE")


def test_a_token_text_function_shows_single_tokens():
    expected = make_trace([72, 105], [-0.1, -0.2], [[(72, -0.1)], [(105, -0.2), (111, -0.7)]])
    actual = make_trace([72, 111], [-0.1, -0.3])
    c = compare(expected, actual, token_text=lambda t: f"<{t}>")
    assert "ref chose '<105>' (id 105), eng chose '<111>' (id 111)" in c.summary
    assert c.diagnostic.context == "H"  # context is still decoded text
    assert [r.text for r in c.diagnostic.expected_top] == ["<105>", "<111>"]


def test_margin_at_reads_the_top_list():
    event = TokenEvent(5, -0.1, [(5, -0.1), (6, -0.4)])
    assert margin_at(event, 6) == (pytest.approx(0.3), False, -0.1, -0.4)
    assert margin_at(event, 7) == (pytest.approx(0.3), True, -0.1, None)
    assert margin_at(TokenEvent(5, None, [(5, -0.2), (6, -0.4)]), 6)[2] == -0.2
    assert margin_at(TokenEvent(5, -0.1, None), 6) == (None, False, -0.1, None)
    assert margin_at(TokenEvent(5, None, [(6, -0.4)]), 6) == (None, False, None, None)


# -- near-ties ------------------------------------------------------------------------------

# 'H', 'i', then ref chose '!' at -0.1 with 'x' at -0.104: a margin of 0.004 < 0.01.
TIE = [(33, -0.1), (120, -0.104)]
EXPECTED = make_trace([72, 105, 33, 33], [-0.1] * 4, [[(72, -0.1)], [(105, -0.1)], TIE, TIE])
FIRST = (
    "at step 2 ref chose '!' (id 33), eng chose 'x' (id 120); ref margin 0.004 < epsilon 0.01 "
    "(profile fp32); compared 2 tokens before it"
)


def engine(tokens, logprobs, tops=None, finish="length"):
    return make_trace(tokens, logprobs, tops, finish=finish)


def test_without_a_reference_for_the_engines_path_judging_stops_at_the_near_tie():
    actual = engine([72, 105, 120, 1, 2, 3], [-0.1] * 6)
    c = compare(EXPECTED, actual)
    assert c.summary == (
        f"near-tie: {FIRST}; 3 later steps unjudged (no reference for the engine's path)"
    )
    assert fields(c) == (NEAR_TIE, 2, 0.0, [2], 3, 3, False)
    assert c.render("ref", "eng").splitlines()[1:3] == [
        "  step 2, after 'Hi'",
        "  ref: logprob('!') = -0.1, logprob('x') = -0.104",
    ]

    def unavailable(tokens):
        raise ResumptionUnavailable("snapshots cannot score new text")

    c = compare(EXPECTED, actual, resume=unavailable)
    assert c.summary.endswith("; 3 later steps unjudged (snapshots cannot score new text)")
    # Ending at the near-tie leaves nothing unjudged, and nothing to say about it.
    last = compare(EXPECTED, engine([72, 105, 120], [-0.1] * 3))
    assert last.summary == f"near-tie: {FIRST}" and last.unjudged_steps == 0
    assert last.judged_steps == 3 and last.near_tie_steps == [2]


def path(tokens, logprobs, tops):
    """The reference's events along the engine's tokens."""
    return lambda given: (
        make_trace(tokens, logprobs, tops) if given == tokens else pytest.fail(given)
    )


# The engine's path: 'H', 'i', 'x' (the near-tie), then 'A' and 'B'.
PATH_TOKENS = [72, 105, 120, 65, 66]
PREFIX_TOPS = [[(72, -0.1)], [(105, -0.1)], TIE]


def test_resuming_judges_every_later_step_and_counts_the_near_ties():
    # Step 4: ref's top is 'C' at -0.5, 'B' at -0.505: a second near-tie (margin 0.005).
    tops = [*PREFIX_TOPS, [(65, -0.2)], [(67, -0.5), (66, -0.505)]]
    resume = path(PATH_TOKENS, [-0.1, -0.1, -0.104, -0.2, -0.505], tops)
    # The engine's logprobs differ by 0.0005 at step 2, nowhere else.
    actual = engine(PATH_TOKENS, [-0.1, -0.1, -0.1045, -0.2, -0.505])
    c = compare(EXPECTED, actual, resume=resume)
    assert c.summary == (
        "near-tie: 2 near-ties crossed (steps 2, 4); all 5 steps judged, 3 of them on eng's "
        f"own path, max logprob |diff| 0.0005. First: {FIRST}"
    )
    assert fields(c)[:2] == (NEAR_TIE, 2) and c.max_logprob_error == pytest.approx(0.0005)
    assert fields(c)[3:] == ([2, 4], 5, 0, False)
    assert c.diagnostic.step == 2  # the first near-tie's diagnostic
    # One near-tie only: singular, and without logprobs no error is stated.
    one = path(
        PATH_TOKENS, [-0.1, -0.1, -0.104, -0.2, -0.5], [*PREFIX_TOPS, [(65, -0.2)], [(66, -0.5)]]
    )
    c = compare(EXPECTED, engine(PATH_TOKENS, [None] * 5), resume=one)
    assert c.summary.startswith(
        "near-tie: 1 near-tie crossed (steps 2); all 5 steps judged, 3 of them on eng's own "
        "path. First: "
    )
    assert c.max_logprob_error is None


def test_a_token_far_from_the_references_top_on_the_engines_path_fails():
    # Step 3: the engine chose 'A', which ref puts at -0.5 under its top 'F' at -0.1.
    tops = [*PREFIX_TOPS, [(70, -0.1), (65, -0.5)], [(66, -0.1)]]
    resume = path(PATH_TOKENS, [-0.1, -0.1, -0.104, -0.5, -0.1], tops)
    actual = engine(PATH_TOKENS, [-0.1, -0.1, -0.104, -0.3, -0.1], [[]] * 3 + [[(65, -0.3)]] * 2)
    c = compare(EXPECTED, actual, resume=resume)
    assert c.render("ref", "eng").splitlines() == [
        (
            "FAIL: on eng's own path, at step 3 eng chose 'A' (id 65) where ref's top token is "
            "'F' (id 70); margin 0.4 >= epsilon 0.01 (profile fp32); after 1 near-tie crossed "
            "(steps 2)"
        ),
        "  step 3, after 'Hix'",
        "  after 1 near-tie crossed (steps 2)",
        "  ref: logprob('F') = -0.1, logprob('A') = -0.5",
        "  eng: logprob('A') = -0.3, logprob('F') = unknown",
        "  ref top-2: 'F'(70) -0.1000, 'A'(65) -0.5000",
        "  eng top-1: 'A'(65) -0.3000",
    ]
    assert fields(c) == (FAIL, 2, 0.0, [2], 4, 0, False)
    d = c.diagnostic
    assert (d.kind, d.expected_token, d.actual_token) == ("token", 70, 65)
    assert d.margin == pytest.approx(0.4) and d.tolerance is None


def test_a_logprob_error_on_the_engines_path_fails():
    # Step 3: ref gives 'A' -0.2, the engine -0.3: |diff| 0.1 > 0.00202.
    tops = [*PREFIX_TOPS, [(65, -0.2)], [(66, -0.1)]]
    resume = path(PATH_TOKENS, [-0.1, -0.1, -0.104, -0.2, -0.1], tops)
    actual = engine(PATH_TOKENS, [-0.1, -0.1, -0.104, -0.3, -0.1])
    c = compare(EXPECTED, actual, resume=resume)
    assert c.render("ref", "eng").splitlines() == [
        (
            "FAIL: on eng's own path, logprob of 'A' at step 3 differs: ref on eng's path -0.2, "
            "eng -0.3 (|diff| 0.1 > tolerance 0.00202, profile fp32); after 1 near-tie crossed "
            "(steps 2)"
        ),
        "  step 3, after 'Hix'",
        "  after 1 near-tie crossed (steps 2)",
        "  tolerance 0.00202",
        "  ref top-1: 'A'(65) -0.2000",
    ]
    assert fields(c)[:2] == (FAIL, 2) and c.max_logprob_error == pytest.approx(0.1)
    assert fields(c)[3:] == ([2], 4, 0, False)
    d = c.diagnostic
    assert (d.kind, d.expected_token, d.actual_token, d.margin) == ("logprob", 65, 65, None)
    assert (d.expected_logprob, d.expected_logprob_of_actual) == (-0.2, -0.2)


def test_more_near_ties_than_the_cap_limit_the_comparison():
    capped = replace(FP32, max_near_ties=1)
    tokens = [*PATH_TOKENS, 67]
    tops = [*PREFIX_TOPS, [(65, -0.2)], [(67, -0.5), (66, -0.505)], [(67, -0.1)]]
    resume = path(tokens, [-0.1, -0.1, -0.104, -0.2, -0.505, -0.1], tops)
    actual = engine(tokens, [-0.1, -0.1, -0.104, -0.2, -0.505, -0.1])
    c = compare(EXPECTED, actual, profile=capped, resume=resume)
    assert c.summary == (
        "near-tie-limited: 2 near-ties by step 4, more than the cap of 1 (profile fp32); "
        "1 later steps unjudged"
    )
    assert fields(c) == (NEAR_TIE, 2, 0.0, [2, 4], 5, 1, True)
    assert c.diagnostic.step == 2
    # At the cap exactly, the comparison goes on to the end.
    at_cap = compare(EXPECTED, actual, profile=replace(FP32, max_near_ties=2), resume=resume)
    assert not at_cap.near_tie_limited and at_cap.judged_steps == 6


def test_the_reference_must_answer_along_the_engines_tokens():
    actual = engine(PATH_TOKENS, [-0.1] * 5)

    def elsewhere(tokens):
        return make_trace([72, 105, 120, 65, 67], [-0.1] * 5)

    with pytest.raises(ValueError) as raised:
        compare(EXPECTED, actual, resume=elsewhere)
    assert str(raised.value) == "resume() must answer along the engine's tokens"


def test_a_path_step_without_a_top_list_or_logprob_is_taken_as_it_is():
    # Steps 3 and 4: ref gives neither a top list nor a logprob: nothing to judge there.
    resume = path(PATH_TOKENS, [-0.1, -0.1, -0.104, None, None], [*PREFIX_TOPS, None, None])
    actual = engine(PATH_TOKENS, [-0.1, -0.1, -0.104, -9.0, -9.0])
    c = compare(EXPECTED, actual, resume=resume)
    assert c.verdict == NEAR_TIE and c.near_tie_steps == [2] and c.judged_steps == 5


def test_after_two_near_ties_a_failure_says_so_and_the_prefix_error_is_kept():
    """Ties at steps 2 and 4, then a token far from ref's top at step 5. The prefix's
    logprob error (0.001 at step 1) is the largest; ref's path is not consulted before
    the first near-tie (its step 0 would fail)."""
    tokens = [*PATH_TOKENS, 70]
    tops = [
        [(99, -0.01), (72, -0.5)],  # never judged: the shared prefix is judged on `expected`
        [(105, -0.1)],
        TIE,
        [(65, -0.2)],
        [(67, -0.5), (66, -0.505)],
        [(71, -0.1), (70, -0.9)],
    ]
    resume = path(tokens, [-0.5, -0.1, -0.104, -0.2, -0.505, -0.9], tops)
    engine_tops = [[]] * 5 + [[(70, -0.2), (71, -0.95)]]
    actual = engine(tokens, [-0.1, -0.101, -0.104, -0.2, -0.505, -0.2], engine_tops)
    c = compare(EXPECTED, actual, resume=resume)
    assert c.render("ref", "eng").splitlines()[:5] == [
        (
            "FAIL: on eng's own path, at step 5 eng chose 'F' (id 70) where ref's top token is "
            "'G' (id 71); margin 0.8 >= epsilon 0.01 (profile fp32); after 2 near-ties crossed "
            "(steps 2, 4)"
        ),
        "  step 5, after 'HixAB'",
        "  after 2 near-ties crossed (steps 2, 4)",
        "  ref: logprob('G') = -0.1, logprob('F') = -0.9",
        "  eng: logprob('F') = -0.2, logprob('G') = -0.95",
    ]
    assert c.max_logprob_error == pytest.approx(0.001)
    assert c.near_tie_steps == [2, 4] and c.judged_steps == 6


def test_a_path_logprob_error_without_a_top_list_compares_with_refs_own_logprob():
    tops = [*PREFIX_TOPS, None, [(66, -0.1)]]
    resume = path(PATH_TOKENS, [-0.1, -0.1, -0.104, -0.2, -0.1], tops)
    actual = engine(PATH_TOKENS, [-0.1, -0.1, -0.104, -0.3, -0.1])
    d = compare(EXPECTED, actual, resume=resume).diagnostic
    assert (d.kind, d.step, d.expected_token, d.expected_logprob) == ("logprob", 3, 65, -0.2)


# -- the largest error, kept on every outcome (survivors of the full mutmut run) -------------


def test_the_largest_logprob_error_is_the_maximum_not_the_last():
    # Errors 0.0015 at step 0, 0.0005 at step 1, both inside the tolerance (~0.002).
    c = compare(make_trace([72, 105], [-0.1, -0.2]), make_trace([72, 105], [-0.1015, -0.2005]))
    assert c.verdict == PASS and c.max_logprob_error == pytest.approx(0.0015)


def test_a_length_or_finish_reason_fail_keeps_the_largest_logprob_error():
    short = make_trace([72, 105], [-0.1, -0.2], finish="stop")
    long = make_trace([72, 105, 33], [-0.1, -0.201, -0.3])
    assert compare(short, long).max_logprob_error == pytest.approx(0.001)
    stop = make_trace([72], [-0.1], finish="stop")
    assert compare(stop, make_trace([72], [-0.1012])).max_logprob_error == pytest.approx(0.0012)


def test_a_divergence_without_the_engines_top_list_shows_its_own_logprob():
    expected = make_trace([72, 105], [-0.1, -0.2], [[(72, -0.1)], [(105, -0.2), (111, -0.7)]])
    actual = make_trace([72, 111], [-0.1, -0.65])  # logprobs, but no top lists
    c = compare(expected, actual)
    assert c.verdict == FAIL and c.diagnostic.actual_logprob == -0.65
    assert "  eng: logprob('o') = -0.65, logprob('i') = unknown" in c.render("ref", "eng")


def test_resuming_from_a_near_tie_at_step_0_measures_the_errors_on_the_engines_path():
    # Step 0: ref's top 'H' at -0.1, 'x' at -0.104 (margin 0.004 < 0.01); the engine takes 'x'.
    tie = [(72, -0.1), (120, -0.104)]
    expected = make_trace([72, 105], [-0.1, -0.2], [tie, [(105, -0.2)]])
    resume = path([120, 65], [-0.104, -0.3], [tie, [(65, -0.3)]])
    c = compare(expected, engine([120, 65], [-0.1045, -0.301]), resume=resume)
    assert c.verdict == NEAR_TIE and c.near_tie_steps == [0]
    assert c.max_logprob_error == pytest.approx(0.001)


def test_equal_infinite_logprobs_on_the_engines_path_are_an_error_of_zero():
    inf = float("-inf")
    tie = [(72, -0.1), (120, -0.104)]
    expected = make_trace([72, 105], [-0.1, -0.2], [tie, [(105, -0.2)]])
    resume = path([120, 65], [-0.104, inf], [tie, [(65, inf)]])
    # No logprob at step 0, so step 1's is the first error measured (abs(inf - inf) is nan).
    c = compare(expected, engine([120, 65], [None, inf]), resume=resume)
    assert c.verdict == NEAR_TIE and c.max_logprob_error == 0.0
