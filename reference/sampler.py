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


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
) -> Sampler:
    """A sampler with mlx-lm's parameters and filter order (top-p, min-p, top-k)."""
    if temp < 0:
        raise ValueError(f"temp must be >= 0, got {temp}")
    if temp == 0:
        return greedy_sampler
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")

    filters = []
    if 0 < top_p < 1:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0:
        filters.append(lambda x: apply_min_p(x, min_p, min_tokens_to_keep))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))

    def sampler(logprobs: mx.array) -> mx.array:
        for keep_likely in filters:
            logprobs = keep_likely(logprobs)
        return categorical_sampling(logprobs, temp)

    return sampler
