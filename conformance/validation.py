"""Rules every engine's answer must obey, whatever the reference says.

These checks need no second engine: token ids inside the vocabulary, one
finish reason on the last event only, exactly ``max_tokens`` events when the
reason is "length", no end token left unhonoured before the end, logprobs
that are log-probabilities, top-k lists of the requested length in order, a
greedy choice that is the argmax of the engine's own logprobs, and text
pieces that join up to the decoded tokens. A declared capability is a promise:
an engine that declared ``logprobs`` must give every event its logprob. A
violation is a failure of the case, reported with what exactly was wrong.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

from engines.protocol import FINISH_REASONS, GenerateRequest, ProtocolError, ScoreRequest, Trace

# Float slack for "logprob <= 0" and "top-1 is the chosen token" (engines round).
LOGPROB_SLACK = 1e-4


def validate_generation(
    trace: Trace,
    request: GenerateRequest,
    *,
    vocab_size: int,
    end_tokens: set[int],
    top_logprobs: int,
) -> None:
    """Raise ``ProtocolError`` if ``trace`` cannot be a correct answer to ``request``.

    ``end_tokens`` are the model's own end-of-sequence ids; ``top_logprobs`` is how
    many top entries the engine was asked for (0 if it does not report logprobs).
    """
    events = trace.events
    if not events:
        raise ProtocolError("the engine produced no tokens")
    if len(events) > request.max_tokens:
        raise ProtocolError(
            f"{len(events)} tokens produced, but max_tokens is {request.max_tokens}"
        )
    stops = end_tokens | set(request.stop_tokens)
    for step, event in enumerate(events):
        _check_event(event, step, vocab_size, top_logprobs, greedy=request.sampler.greedy)
        last = step == len(events) - 1
        if event.finish_reason is not None and not last:
            raise ProtocolError(
                f"finish_reason {event.finish_reason!r} at step {step}, before the last event"
            )
        if not last and event.token in stops:
            raise ProtocolError(
                f"end token {event.token} at step {step} did not end the generation"
            )
        if not last and _ends_with_stop_sequence(trace.tokens[: step + 1], request.stop_sequences):
            raise ProtocolError(
                f"a stop sequence completed at step {step} did not end the generation"
            )
        if event.from_draft and request.draft is None:
            raise ProtocolError(f"step {step} claims from_draft without a draft model")
    reason = events[-1].finish_reason
    if reason not in FINISH_REASONS:
        raise ProtocolError(
            f"the last event's finish_reason is {reason!r}; expected one of {FINISH_REASONS}"
        )
    if reason == "length" and len(events) != request.max_tokens:
        raise ProtocolError(
            f"finish_reason 'length' after {len(events)} tokens; max_tokens is {request.max_tokens}"
        )
    stopped = events[-1].token in stops or _ends_with_stop_sequence(
        trace.tokens, request.stop_sequences
    )
    if reason == "stop" and not stopped:
        raise ProtocolError(
            f"finish_reason 'stop' but the last token {events[-1].token} is no end token "
            "and completes no stop sequence"
        )


def validate_score(
    trace: Trace, request: ScoreRequest, *, vocab_size: int, top_logprobs: int
) -> None:
    if trace.tokens != list(request.continuation):
        raise ProtocolError(
            f"score answered tokens {trace.tokens[:8]}... "
            f"for continuation {request.continuation[:8]}..."
        )
    for step, event in enumerate(trace.events):
        _check_event(event, step, vocab_size, top_logprobs, greedy=False)
        if event.logprob is None:
            raise ProtocolError(f"score event {step} has no logprob")


def validate_text(trace: Trace, decode: Callable[[list[int]], str], end_tokens: set[int]) -> None:
    """Text pieces must join up to the decoded tokens (a final end token adds no text).

    This also rules out pieces that split a UTF-8 character: a split character
    shows up as replacement characters that the decoded text does not contain.
    """
    tokens = trace.tokens
    if tokens and trace.finish_reason == "stop" and tokens[-1] in end_tokens:
        tokens = tokens[:-1]
    expected = decode(tokens)
    if trace.text != expected:
        raise ProtocolError(
            f"text pieces join to {_clip(trace.text)!r}, "
            f"but the tokens decode to {_clip(expected)!r}"
        )


def _check_event(event, step: int, vocab_size: int, top_logprobs: int, greedy: bool) -> None:
    token = event.token
    if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
        raise ProtocolError(
            f"token {token!r} at step {step} is outside the vocabulary [0, {vocab_size})"
        )
    if event.logprob is not None and (
        not isinstance(event.logprob, (int, float))
        or math.isnan(event.logprob)
        or event.logprob > LOGPROB_SLACK
    ):
        raise ProtocolError(f"logprob {event.logprob!r} at step {step} is not a log-probability")
    if not top_logprobs:
        return
    # Logprobs were asked for because the engine declared the capability: it must give them.
    if event.logprob is None:
        raise ProtocolError(
            f"step {step} has no logprob (null), though the engine declared 'logprobs'"
        )
    top = event.top_logprobs or []
    wanted = min(top_logprobs, vocab_size)
    if len(top) != wanted:
        raise ProtocolError(f"{len(top)} top logprobs at step {step}; {wanted} were requested")
    ids = [t for t, _ in top]
    if len(set(ids)) != len(ids) or not all(0 <= t < vocab_size for t in ids):
        raise ProtocolError(
            f"top logprobs at step {step} repeat ids or leave the vocabulary: {ids}"
        )
    values = [lp for _, lp in top]
    if any(math.isnan(v) or v > LOGPROB_SLACK for v in values):
        raise ProtocolError(f"top logprobs at step {step} are not log-probabilities: {values}")
    if any(a < b for a, b in itertools.pairwise(values)):
        raise ProtocolError(
            f"top logprobs at step {step} are not sorted, most likely first: {values}"
        )
    listed = dict(top)
    if event.logprob is not None and token in listed and not _close(listed[token], event.logprob):
        raise ProtocolError(
            f"step {step}: chosen token's logprob {event.logprob} differs from its "
            f"top-list entry {listed[token]}"
        )
    if (
        greedy
        and values
        and event.logprob is not None
        and event.logprob < values[0] - LOGPROB_SLACK
    ):
        raise ProtocolError(
            f"greedy step {step} chose token {token} (logprob {event.logprob:.6g}) but the "
            f"engine's own top token is {ids[0]} (logprob {values[0]:.6g})"
        )


def _ends_with_stop_sequence(tokens: list[int], sequences: list[list[int]]) -> bool:
    return any(seq and tokens[-len(seq) :] == list(seq) for seq in sequences)


def _close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= LOGPROB_SLACK * max(1.0, abs(a))


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
