"""Logits processors: ``processor(tokens, logits) -> logits``.

``tokens`` is every token seen so far (prompt plus generated), ``logits`` has
shape (1, vocab). Penalties look at the last ``context_size`` tokens only.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def occurs(tokens: mx.array, vocab_size: int) -> mx.array:
    """Boolean (vocab,) mask of the ids present in ``tokens`` (duplicates count once).

    Processors build new arrays rather than writing into ``logits``: mlx-lm's
    write in place, which silently changes the caller's array.
    """
    mask = mx.zeros((vocab_size,), dtype=mx.bool_)
    mask[tokens] = True
    return mask


def make_logit_bias(logit_bias: dict[int, float]) -> LogitsProcessor:
    indices = mx.array([int(k) for k in logit_bias])
    values = mx.array([float(v) for v in logit_bias.values()])

    def logit_bias_processor(_tokens, logits):
        return logits.at[:, indices].add(values)

    return logit_bias_processor


def make_repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Divide positive logits / multiply negative ones of recent tokens by ``penalty``."""
    if not isinstance(penalty, (int, float)) or penalty < 0:
        raise ValueError(f"repetition_penalty must be a non-negative number, got {penalty}")

    def repetition_penalty_processor(tokens, logits):
        if len(tokens) == 0:
            return logits
        seen = occurs(tokens[-context_size:], logits.shape[-1])
        penalised = mx.where(logits < 0, logits * penalty, logits / penalty)
        return mx.where(seen, penalised, logits)

    return repetition_penalty_processor


def make_presence_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Subtract ``penalty`` once from each token present in the recent context."""

    def presence_penalty_processor(tokens, logits):
        if len(tokens) == 0:
            return logits
        return mx.where(occurs(tokens[-context_size:], logits.shape[-1]), logits - penalty, logits)

    return presence_penalty_processor


def make_frequency_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Subtract ``penalty`` once per occurrence in the recent context."""

    def frequency_penalty_processor(tokens, logits):
        if len(tokens) > 0:
            logits = logits.at[:, tokens[-context_size:]].subtract(penalty)
        return logits

    return frequency_penalty_processor


def make_logits_processors(
    logit_bias: dict[int, float] | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = 20,
    presence_penalty: float | None = None,
    presence_context_size: int | None = 20,
    frequency_penalty: float | None = None,
    frequency_context_size: int | None = 20,
) -> list[LogitsProcessor]:
    """Processors in mlx-lm's order: bias, then repetition, presence, frequency."""
    processors = []
    if logit_bias:
        processors.append(make_logit_bias(logit_bias))
    penalties = [
        (make_repetition_penalty, repetition_penalty, repetition_context_size),
        (make_presence_penalty, presence_penalty, presence_context_size),
        (make_frequency_penalty, frequency_penalty, frequency_context_size),
    ]
    for make, penalty, context_size in penalties:
        if penalty:
            processors.append(make(penalty, context_size))
    return processors
