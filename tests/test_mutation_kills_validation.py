"""conformance/validation.py pinned down: each rule at its boundary (the last token inside
the vocabulary, a logprob exactly at the slack, a top list cut to the vocabulary, ...) and
each complaint word for word, since the complaint is what an engine author reads."""

from __future__ import annotations

import pytest
from conformance_helpers import make_trace

from conformance.validation import (
    LOGPROB_SLACK,
    validate_generation,
    validate_score,
    validate_text,
)
from engines.protocol import (
    DraftSettings,
    GenerateRequest,
    ProtocolError,
    SamplerSettings,
    ScoreRequest,
)

ENDS = {200}
SAMPLED = SamplerSettings(temp=1.0)


def check(trace, request=None, top=0, vocab=256):
    request = request or GenerateRequest(prompt=[1], max_tokens=4)
    validate_generation(trace, request, vocab_size=vocab, end_tokens=ENDS, top_logprobs=top)


def complaint(call, *args, **kwargs) -> str:
    with pytest.raises(ProtocolError) as raised:
        call(*args, **kwargs)
    return str(raised.value)


def test_token_ids_inside_the_vocabulary_and_nothing_else():
    check(make_trace([0, 255, 1, 1]))
    assert complaint(check, make_trace([1, 256, 1, 1])) == (
        "token 256 at step 1 is outside the vocabulary [0, 256)"
    )
    assert complaint(check, make_trace([True, 1, 1, 1])) == (
        "token True at step 0 is outside the vocabulary [0, 256)"
    )
    assert complaint(check, make_trace([1, 1.0, 1, 1])) == (
        "token 1.0 at step 1 is outside the vocabulary [0, 256)"
    )


def test_exactly_max_tokens_and_one_more():
    check(make_trace([1, 2, 3, 4]))
    assert complaint(check, make_trace([1, 2, 3, 4, 5])) == (
        "5 tokens produced, but max_tokens is 4"
    )
    assert complaint(check, make_trace([1, 2, 3])) == (
        "finish_reason 'length' after 3 tokens; max_tokens is 4"
    )
    assert complaint(check, make_trace([])) == "the engine produced no tokens"


def test_finish_reasons_and_end_tokens():
    trace = make_trace([1, 2, 3, 4])
    trace.events[2].finish_reason = "length"
    assert complaint(check, trace) == "finish_reason 'length' at step 2, before the last event"
    assert complaint(check, make_trace([1, 2], finish="done")) == (
        "the last event's finish_reason is 'done'; expected one of ('stop', 'length')"
    )
    assert complaint(check, make_trace([1, 200, 3, 4])) == (
        "end token 200 at step 1 did not end the generation"
    )
    assert complaint(check, make_trace([1, 2], finish="stop")) == (
        "finish_reason 'stop' but the last token 2 is no end token and completes no stop sequence"
    )
    # An end token may be the last token whatever the reason (max_tokens reached with it).
    check(make_trace([1, 2, 3, 200]))
    stop_at_7 = GenerateRequest(prompt=[1], max_tokens=4, stop_tokens=[7])
    check(make_trace([1, 7], finish="stop"), stop_at_7)
    assert complaint(check, make_trace([7, 1, 1, 1]), stop_at_7) == (
        "end token 7 at step 0 did not end the generation"
    )


def test_stop_sequences_end_exactly_where_they_complete():
    request = GenerateRequest(prompt=[1], max_tokens=4, stop_sequences=[[], [5, 6, 7]])
    check(make_trace([5, 6, 7], finish="stop"), request)
    check(make_trace([9, 5, 6, 7], finish="stop"), request)
    check(make_trace([6, 7, 1, 2]), request)  # only the end of a sequence: no stop
    assert complaint(check, make_trace([5, 6, 7, 1]), request) == (
        "a stop sequence completed at step 2 did not end the generation"
    )
    # A sequence longer than the text so far is not complete.
    check(make_trace([7], finish="length"), GenerateRequest(prompt=[1], max_tokens=1))


def test_from_draft_needs_a_draft_model():
    trace = make_trace([1, 2, 3, 4])
    trace.events[3].from_draft = True
    assert complaint(check, trace) == "step 3 claims from_draft without a draft model"
    check(trace, GenerateRequest(prompt=[1], max_tokens=4, draft=DraftSettings(model="dummy")))


def test_a_logprob_may_exceed_zero_by_the_slack_and_no_more():
    check(make_trace([1, 1, 1, 1], [0, LOGPROB_SLACK, -1.0, -2.0]))
    for bad in (2 * LOGPROB_SLACK, float("nan"), "0.1"):
        assert complaint(check, make_trace([1, 1, 1, 1], [-1.0, bad, -1.0, -1.0])) == (
            f"logprob {bad!r} at step 1 is not a log-probability"
        )


def tops(pairs):
    return [pairs] * 4


def test_a_declared_logprob_capability_is_a_promise():
    assert complaint(check, make_trace([1, 1, 1, 1]), top=2) == (
        "step 0 has no logprob (null), though the engine declared 'logprobs'"
    )
    check(make_trace([1, 1, 1, 1]), top=0)  # not asked: nothing to check


def test_top_lists_are_complete_distinct_inside_and_sorted():
    good = tops([(1, -0.1), (2, -2.0)])
    check(make_trace([1, 1, 1, 1], [-0.1] * 4, good), top=2)
    assert complaint(check, make_trace([1, 1, 1, 1], [-0.1] * 4, tops([(1, -0.1)])), top=2) == (
        "1 top logprobs at step 0; 2 were requested"
    )
    assert complaint(check, make_trace([1, 1, 1, 1], [-0.1] * 4, good), top=3) == (
        "2 top logprobs at step 0; 3 were requested"
    )
    # Asked for more than the vocabulary holds: the whole vocabulary, no more.
    whole = tops([(1, -0.1), (0, -3.0)])
    check(make_trace([1, 1, 1, 1], [-0.1] * 4, whole), top=5, vocab=2)
    for pairs in ([(1, -0.1), (2, -2.0)], [(1, -0.1), (-1, -2.0)], [(1, -0.1), (1, -0.1)]):
        ids = [t for t, _ in pairs]
        assert complaint(check, make_trace([1] * 4, [-0.1] * 4, tops(pairs)), top=2, vocab=2) == (
            f"top logprobs at step 0 repeat ids or leave the vocabulary: {ids}"
        )
    values = [-0.1, 2 * LOGPROB_SLACK]
    assert complaint(
        check, make_trace([1] * 4, [-0.1] * 4, tops([(1, -0.1), (2, values[1])])), top=2
    ) == (f"top logprobs at step 0 are not log-probabilities: {values}")
    nan = tops([(1, -0.1), (2, float("nan"))])
    assert "are not log-probabilities: [-0.1, nan]" in complaint(
        check, make_trace([1] * 4, [-0.1] * 4, nan), top=2
    )
    check(make_trace([1] * 4, [LOGPROB_SLACK] * 4, tops([(1, LOGPROB_SLACK), (2, -1.0)])), top=2)
    assert complaint(
        check, make_trace([1] * 4, [-0.1] * 4, tops([(2, -2.0), (1, -0.1)])), top=2
    ) == ("top logprobs at step 0 are not sorted, most likely first: [-2.0, -0.1]")
    # Equal values are sorted.
    check(make_trace([1] * 4, [-0.5] * 4, tops([(1, -0.5), (2, -0.5)])), top=2)


def test_the_chosen_tokens_logprob_agrees_with_its_top_entry_within_the_slack():
    # The slack is relative beyond 1 nat: 1e-4 * 10 at -10.
    close, far = -10.0 + 0.9e-3, -10.0 + 1.1e-3
    pairs = [(3, -1.0), (1, -10.0)]
    check(
        make_trace([1] * 4, [close] * 4, tops(pairs)),
        GenerateRequest(prompt=[1], max_tokens=4, sampler=SAMPLED),
        top=2,
    )
    sampled = GenerateRequest(prompt=[1], max_tokens=4, sampler=SAMPLED)
    assert complaint(check, make_trace([1] * 4, [far] * 4, tops(pairs)), sampled, top=2) == (
        f"step 0: chosen token's logprob {far} differs from its top-list entry -10.0"
    )
    # Below 1 nat the slack is absolute.
    near = [(1, -0.5), (2, -1.0)]
    check(make_trace([1] * 4, [-0.5 + 0.9e-4] * 4, tops(near)), top=2)
    assert "differs from its top-list entry -0.5" in complaint(
        check, make_trace([1] * 4, [-0.5 + 1.1e-4] * 4, tops(near)), top=2
    )
    # A chosen token outside its top list is not compared with it.
    check(make_trace([4] * 4, [-5.0] * 4, tops(pairs)), sampled, top=2)


def test_greedy_must_choose_the_engines_own_top_token_within_the_slack():
    pairs = [(2, -0.1), (7, -3.0)]  # token 1 is not listed: only the greedy rule applies
    check(make_trace([1] * 4, [-0.1 - 0.9e-4] * 4, tops(pairs)), top=2)
    chosen = -0.1 - 1.1e-4
    assert complaint(check, make_trace([1] * 4, [chosen] * 4, tops(pairs)), top=2) == (
        f"greedy step 0 chose token 1 (logprob {chosen:.6g}) but the engine's own top token "
        "is 2 (logprob -0.1)"
    )
    sampled = GenerateRequest(prompt=[1], max_tokens=4, sampler=SAMPLED)
    check(make_trace([1] * 4, [chosen] * 4, tops(pairs)), sampled, top=2)


def test_score_answers_are_the_continuation_each_with_a_logprob():
    request = ScoreRequest(prompt=[1], continuation=list(range(10)))
    answer = make_trace(list(range(10)), [-1.0] * 10, finish=None)
    validate_score(answer, request, vocab_size=10, top_logprobs=0)
    short = make_trace(list(range(9)), [-1.0] * 9, finish=None)
    assert complaint(validate_score, short, request, vocab_size=10, top_logprobs=0) == (
        "score answered tokens [0, 1, 2, 3, 4, 5, 6, 7]... "
        "for continuation [0, 1, 2, 3, 4, 5, 6, 7]..."
    )
    answer.events[4].logprob = None
    assert complaint(validate_score, answer, request, vocab_size=10, top_logprobs=0) == (
        "score event 4 has no logprob"
    )
    # Scoring is not greedy: a token below the top of its list is what it is.
    scored = make_trace([1], [-3.0], [[(0, -0.1), (1, -3.0)]], finish=None)
    validate_score(scored, ScoreRequest([0], [1]), vocab_size=10, top_logprobs=2)
    assert complaint(
        validate_score, scored, ScoreRequest([0], [1]), vocab_size=1, top_logprobs=0
    ) == ("token 1 at step 0 is outside the vocabulary [0, 1)")
    assert complaint(
        validate_score, scored, ScoreRequest([0], [1]), vocab_size=10, top_logprobs=3
    ) == ("2 top logprobs at step 0; 3 were requested")


def letters(tokens):
    return "".join(chr(t) if t != 200 else "<end>" for t in tokens)


def test_text_pieces_join_to_the_tokens_and_only_a_final_stop_end_token_adds_nothing():
    texts = ["a", "b", ""]
    validate_text(make_trace([97, 98, 200], texts=texts, finish="stop"), letters, ENDS)
    # Ended by length, the end token's own text counts.
    assert complaint(
        validate_text, make_trace([97, 98, 200], texts=texts, finish="length"), letters, ENDS
    ) == ("text pieces join to 'ab', but the tokens decode to 'ab<end>'")
    validate_text(make_trace([], finish=None), letters, ENDS)
    long = make_trace([97] * 130, texts=["b"] * 130)
    assert complaint(validate_text, long, letters, ENDS) == (
        f"text pieces join to {'b' * 120 + '...'!r}, but the tokens decode to {'a' * 120 + '...'!r}"
    )
    exact = make_trace([97] * 120, texts=["b"] * 120)
    assert complaint(validate_text, exact, letters, ENDS) == (
        f"text pieces join to {'b' * 120!r}, but the tokens decode to {'a' * 120!r}"
    )


def test_the_slack_boundaries_are_inclusive():
    # A chosen logprob exactly the slack below the engine's top passes the greedy rule.
    pairs = [(2, -0.5), (7, -3.0)]
    check(make_trace([1] * 4, [-0.5 - LOGPROB_SLACK] * 4, tops(pairs)), top=2)
    # A top entry of 0 and a chosen logprob exactly the slack away agree.
    check(make_trace([1] * 4, [-LOGPROB_SLACK] * 4, tops([(1, 0.0), (2, -1.0)])), top=2)
    # The complaint names the last token, whatever came before it.
    assert complaint(check, make_trace([1, 2, 3], finish="stop")) == (
        "finish_reason 'stop' but the last token 3 is no end token and completes no stop sequence"
    )
