"""Rules every engine answer must obey, checked without any reference."""

from __future__ import annotations

import pytest
from conformance_helpers import decode_bytes, make_trace

from conformance.conditioning import conditioning_of, step_margins
from conformance.validation import validate_generation, validate_score, validate_text
from engines.protocol import GenerateRequest, ProtocolError, SamplerSettings, ScoreRequest

ENDS = {200}


def check(trace, request=None, top=0, vocab=256):
    request = request or GenerateRequest(prompt=[1], max_tokens=4)
    validate_generation(trace, request, vocab_size=vocab, end_tokens=ENDS, top_logprobs=top)


def test_a_correct_answer_passes():
    check(make_trace([1, 2, 3, 4]))
    check(make_trace([1, 200], finish="stop"))
    check(make_trace([5, 6], finish="stop"), GenerateRequest(prompt=[1], stop_sequences=[[5, 6]]))


@pytest.mark.parametrize(
    "trace, request_, complaint",
    [
        (make_trace([]), None, "no tokens"),
        (make_trace([1, 2, 3, 4, 5]), None, "5 tokens produced, but max_tokens is 4"),
        (make_trace([1, 2]), None, "finish_reason 'length' after 2 tokens"),
        (make_trace([1, 999]), None, "token 999 at step 1 is outside the vocabulary"),
        (make_trace([1, -1]), None, "token -1"),
        (make_trace([1, 2], finish="done"), None, "expected one of ('stop', 'length')"),
        (make_trace([1, 2], finish=None), None, "finish_reason is None"),
        (make_trace([200, 2, 3, 4]), None, "end token 200 at step 0 did not end"),
        (make_trace([1, 2], finish="stop"), None, "is no end token"),
        (make_trace([7, 1, 2, 3]), GenerateRequest(prompt=[1], stop_tokens=[7]), "end token 7"),
        (
            make_trace([5, 6, 1, 2]),
            GenerateRequest(prompt=[1], stop_sequences=[[5, 6]]),
            "stop sequence",
        ),
        (make_trace([1, 2, 3, 4], [-0.1, 0.5, -0.1, -0.1]), None, "not a log-probability"),
        (make_trace([1, 2, 3, 4], [-0.1, float("nan"), -0.1, -0.1]), None, "not a log-probability"),
    ],
)
def test_broken_answers_are_rejected(trace, request_, complaint):
    with pytest.raises(ProtocolError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        check(trace, request_)


def test_early_finish_reason_is_rejected():
    trace = make_trace([1, 2, 3, 4])
    trace.events[1].finish_reason = "stop"
    with pytest.raises(ProtocolError, match="at step 1, before the last event"):
        check(trace)


def test_from_draft_needs_a_draft():
    trace = make_trace([1, 2, 3, 4])
    trace.events[2].from_draft = True
    with pytest.raises(ProtocolError, match="from_draft without a draft"):
        check(trace)


def test_top_logprob_lists_are_checked():
    good = [[(1, -0.1), (2, -2.0)]] * 4
    check(make_trace([1, 1, 1, 1], [-0.1] * 4, good), top=2)
    with pytest.raises(ProtocolError, match="1 top logprobs at step 0; 2 were requested"):
        check(make_trace([1, 1, 1, 1], [-0.1] * 4, [[(1, -0.1)]] * 4), top=2)
    with pytest.raises(ProtocolError, match="not sorted"):
        check(make_trace([1, 1, 1, 1], [-0.1] * 4, [[(2, -2.0), (1, -0.1)]] * 4), top=2)
    with pytest.raises(ProtocolError, match="repeat ids"):
        check(make_trace([1, 1, 1, 1], [-0.1] * 4, [[(1, -0.1), (1, -0.1)]] * 4), top=2)
    with pytest.raises(ProtocolError, match="differs from its top-list entry"):
        check(make_trace([1, 1, 1, 1], [-0.5] * 4, good), top=2)
    # A requested top list longer than the vocabulary is cut to the vocabulary.
    check(
        make_trace([1], [-0.1], [[(1, -0.1), (0, -3.0)]]),
        GenerateRequest(prompt=[1], max_tokens=1),
        5,
        2,
    )


def test_greedy_choice_must_be_the_engines_own_argmax():
    tops = [[(2, -0.1), (1, -2.5)]] + [[(1, -0.1), (2, -2.5)]] * 3
    with pytest.raises(ProtocolError, match="greedy step 0 chose token 1 .* own top token is 2"):
        check(make_trace([1, 1, 1, 1], [-2.5, -0.1, -0.1, -0.1], tops), top=2)
    # When sampling, a less likely token is fine.
    sampled = GenerateRequest(prompt=[1], max_tokens=4, sampler=SamplerSettings(temp=1.0))
    check(make_trace([1, 1, 1, 1], [-2.5, -0.1, -0.1, -0.1], tops), sampled, top=2)


def test_text_pieces_must_join_to_the_decoded_tokens():
    e_acute = list("é".encode())  # two byte tokens
    tokens = [65, *e_acute, 200]
    good = make_trace(tokens, texts=["A", "", "é", ""], finish="stop")
    validate_text(good, decode_bytes, ENDS)
    split = make_trace(tokens, texts=["A", "\ufffd", "\ufffd", ""], finish="stop")
    with pytest.raises(ProtocolError, match="join to"):
        validate_text(split, decode_bytes, ENDS)
    lost = make_trace(tokens, texts=["A", "", "", ""], finish="stop")
    with pytest.raises(ProtocolError, match="join to"):
        validate_text(lost, decode_bytes, ENDS)


def test_score_answers():
    request = ScoreRequest(prompt=[1], continuation=[5, 6])
    validate_score(
        make_trace([5, 6], [-1.0, -2.0], finish=None), request, vocab_size=10, top_logprobs=0
    )
    with pytest.raises(ProtocolError, match="score answered tokens"):
        validate_score(make_trace([5], [-1.0], finish=None), request, vocab_size=10, top_logprobs=0)
    with pytest.raises(ProtocolError, match="has no logprob"):
        validate_score(make_trace([5, 6], finish=None), request, vocab_size=10, top_logprobs=0)


def test_conditioning_finds_the_smallest_margin():
    tops = [[(1, -0.1), (2, -3.0)], [(4, -0.6), (5, -0.65)], [(7, -0.1)], [(8, -0.1), (9, -1.1)]]
    trace = make_trace([1, 4, 7, 8], [-0.1, -0.6, -0.1, -0.1], tops)
    assert step_margins(trace) == pytest.approx([2.9, 0.05, None, 1.0], abs=1e-9)
    c = conditioning_of(trace, epsilon=0.1)
    assert (c.step, c.runner_up, c.ill_conditioned) == (1, 5, True)
    assert c.min_margin == pytest.approx(0.05)
    assert "ILL-CONDITIONED" in c.describe() and "step 1" in c.describe()
    assert not conditioning_of(trace, epsilon=0.01).ill_conditioned
    assert conditioning_of(make_trace([1]), 0.1).min_margin is None
