"""Samplers: turn a vector of log-probabilities into the next token.

``make_sampler`` follows mlx-lm: filters (top-p, min-p, top-k) act on the
log-probabilities and set excluded tokens to -inf; the survivor is drawn from
``softmax(logprobs / temp)`` with MLX's global random state, so ``mx.random.seed``
makes draws repeatable. ``temp == 0`` means greedy (argmax).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]

NEG_INF = -float("inf")


def greedy_sampler(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    """Keep the ``top_k`` most likely tokens."""
    vocab_size = logprobs.shape[-1]
    if not isinstance(top_k, int) or not 0 < top_k < vocab_size:
        raise ValueError(f"top_k must be an integer in (0, {vocab_size}), got {top_k}")
    dropped = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logprobs, dropped, mx.array(NEG_INF, logprobs.dtype), axis=-1)


def apply_min_p(logprobs: mx.array, min_p: float, min_tokens_to_keep: int = 1) -> mx.array:
    """Keep tokens whose probability is at least ``min_p`` times the top token's."""
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep}")
    threshold = logprobs.max(axis=-1, keepdims=True) + math.log(min_p) if min_p > 0 else NEG_INF
    drop = logprobs < threshold
    if min_tokens_to_keep > 1:
        best = mx.argpartition(logprobs, kth=-min_tokens_to_keep, axis=-1)[
            ..., -min_tokens_to_keep:
        ]
        drop = mx.put_along_axis(drop, best, mx.array(False), axis=-1)
    return mx.where(drop, NEG_INF, logprobs)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``.

    A token survives iff the mass of the tokens strictly more likely than it is
    below ``top_p``; ties at the threshold all survive.
    """
    ordered = mx.sort(logprobs, axis=-1)
    probs = mx.exp(ordered.astype(mx.float32))
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    total = mass_above[..., :1] + probs[..., :1]
    n_dropped = (mass_above >= top_p * total).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(ordered, n_dropped, axis=-1)
    return mx.where(logprobs < threshold, NEG_INF, logprobs)


def categorical_sampling(logprobs: mx.array, temp: float) -> mx.array:
    return mx.random.categorical(logprobs * (1.0 / temp))


def check_settings(
    temp: float, top_p: float, min_p: float, min_tokens_to_keep: int, top_k: int
) -> None:
    """Reject settings no sampler can honour (NaN, infinities, out of range, wrong type).

    All of them, even those a greedy sampler ignores: ``temp=nan`` is a mistake to
    report, not a request for greedy decoding (nor for NaN logits and a stray EOS).
    """
    for name, value, low, high in (
        ("temp", temp, 0.0, math.inf),
        ("top_p", top_p, 0.0, 1.0),
        ("min_p", min_p, 0.0, 1.0),
    ):
        if not _real(value) or not math.isfinite(value) or not low <= value <= high:
            allowed = f"a finite number >= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if not _integer(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no top-k filter), got {top_k!r}")
    if not _integer(min_tokens_to_keep) or min_tokens_to_keep < 1:
        raise ValueError(
            f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep!r}"
        )


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class FilteredSampler:
    """Filters, then a tempered draw. ``check_vocabulary`` lets a generation reject
    settings that do not fit the model (``top_k`` >= vocabulary) before it starts."""

    def __init__(self, temp: float, filters: list, top_k: int):
        self.temp = temp
        self.filters = filters
        self.top_k = top_k

    def check_vocabulary(self, vocab_size: int) -> None:
        if self.top_k and not self.top_k < vocab_size:
            raise ValueError(
                f"top_k must be below the vocabulary size {vocab_size}, got {self.top_k}"
            )

    def __call__(self, logprobs: mx.array) -> mx.array:
        for keep_likely in self.filters:
            logprobs = keep_likely(logprobs)
        return categorical_sampling(logprobs, self.temp)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
) -> Sampler:
    """A sampler with mlx-lm's parameters and filter order (top-p, min-p, top-k).

    Every setting is checked here (``check_settings``), the fit of ``top_k`` to
    the vocabulary when generation starts, before the prompt cache is touched.
    """
    check_settings(temp, top_p, min_p, min_tokens_to_keep, top_k)
    if temp == 0:
        return greedy_sampler

    filters = []
    if 0 < top_p < 1:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0:
        filters.append(lambda x: apply_min_p(x, min_p, min_tokens_to_keep))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    return FilteredSampler(temp, filters, top_k)
