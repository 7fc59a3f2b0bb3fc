"""Deliberately broken samplers and a broken speculative decoder, for the suite to catch.

Each sampler factory has ``reference.make_sampler``'s signature and differs from it
in exactly one way, a bug seen in real engines. ``test_sampler_stats.py`` checks that
the catalogue's sampling cases (``conformance/cases.toml``), judged on batched draws of
each, fail it by a wide margin.

``SEQUENCE_MUTANTS`` sample the first token exactly as the reference does (so every
one-token check passes them) and go wrong from the second step on; ``REPORT_MUTANTS``
sample correctly and report the wrong logprobs. ``test_sampling_sequences.py`` shows
the multi-token cases and the ``sampled logprobs`` finding catch them.
"""

from __future__ import annotations

import math

import mlx.core as mx

import reference
from conformance.sampling.draws import SequenceDraw, sampler_for
from reference.sampler import NEG_INF, apply_min_p, apply_top_k, apply_top_p


def chained_sampler(filters, temp: float):
    """Filters in order, then a draw from softmax(logprobs / temp): make_sampler's shape."""

    def sampler(logprobs: mx.array) -> mx.array:
        for keep_likely in filters:
            logprobs = keep_likely(logprobs)
        return mx.random.categorical(logprobs * (1.0 / temp))

    return sampler


def filters_for(top_p, min_p, min_tokens_to_keep, top_k, top_p_filter=None, min_p_filter=None):
    """The reference's filter chain, with the top-p or min-p filter swapped for a broken one."""
    filters = []
    if 0 < top_p < 1:
        filters.append(lambda x: (top_p_filter or apply_top_p)(x, top_p))
    if min_p != 0:
        filters.append(lambda x: (min_p_filter or apply_min_p)(x, min_p, min_tokens_to_keep))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    return filters


def temperature_twice(temp=0.0, top_p=0.0, min_p=0.0, min_tokens_to_keep=1, top_k=0):
    """Divides the logprobs by the temperature twice (e.g. once in the engine, once in the
    sampler): the same as sampling at temp², since the filters see untempered logprobs."""
    return reference.make_sampler(temp * temp, top_p, min_p, min_tokens_to_keep, top_k)


def top_k_one_too_many(temp=0.0, top_p=0.0, min_p=0.0, min_tokens_to_keep=1, top_k=0):
    """Keeps k + 1 tokens (argpartition at kth=k instead of k - 1)."""
    return reference.make_sampler(temp, top_p, min_p, min_tokens_to_keep, top_k + 1 if top_k else 0)


def top_p_off_by(extra: int):
    """A top-p filter keeping ``extra`` more (or, negative, fewer) tokens than it should."""

    def apply(logprobs: mx.array, top_p: float) -> mx.array:
        ordered = mx.sort(logprobs, axis=-1)[..., ::-1]
        mass_above = mx.cumsum(mx.exp(ordered), axis=-1) - mx.exp(ordered)
        n_kept = (mass_above < top_p).sum(axis=-1, keepdims=True) + extra
        n_kept = mx.clip(n_kept, 1, logprobs.shape[-1])
        threshold = mx.take_along_axis(ordered, n_kept - 1, axis=-1)
        return mx.where(logprobs < threshold, NEG_INF, logprobs)

    return apply


def top_p_one_too_many(temp=0.0, top_p=0.0, min_p=0.0, min_tokens_to_keep=1, top_k=0):
    filters = filters_for(top_p, min_p, min_tokens_to_keep, top_k, top_p_filter=top_p_off_by(+1))
    return chained_sampler(filters, temp)


def top_p_one_too_few(temp=0.0, top_p=0.0, min_p=0.0, min_tokens_to_keep=1, top_k=0):
    filters = filters_for(top_p, min_p, min_tokens_to_keep, top_k, top_p_filter=top_p_off_by(-1))
    return chained_sampler(filters, temp)


def min_p_relative_to_one(temp=0.0, top_p=0.0, min_p=0.0, min_tokens_to_keep=1, top_k=0):
    """Keeps tokens with probability >= min_p, forgetting to scale by the top token's
    probability (the same as scaling by the sum of all probabilities, which is 1)."""

    def apply(logprobs, min_p, min_tokens_to_keep):
        kept = mx.where(logprobs < math.log(min_p), NEG_INF, logprobs)
        # Like the reference, never drop the most likely token(s).
        return mx.maximum(kept, apply_top_k_or_all(logprobs, min_tokens_to_keep))

    filters = filters_for(top_p, min_p, min_tokens_to_keep, top_k, min_p_filter=apply)
    return chained_sampler(filters, temp)


def apply_top_k_or_all(logprobs: mx.array, k: int) -> mx.array:
    return logprobs if k >= logprobs.shape[-1] else apply_top_k(logprobs, k)


def min_p_after_temperature(temp=0.0, top_p=0.0, min_p=0.0, min_tokens_to_keep=1, top_k=0):
    """Measures min-p against the top token's *tempered* probability (llama.cpp-style order)
    where mlx-lm, and so the reference, uses the untempered one."""

    def apply(logprobs, min_p, min_tokens_to_keep):
        return apply_min_p(logprobs * (1.0 / temp), min_p, min_tokens_to_keep) * temp

    filters = filters_for(top_p, min_p, min_tokens_to_keep, top_k, min_p_filter=apply)
    return chained_sampler(filters, temp)


SAMPLER_MUTANTS = {
    "temperature twice": temperature_twice,
    "top-k one token too many": top_k_one_too_many,
    "top-p one token too many": top_p_one_too_many,
    "top-p one token too few": top_p_one_too_few,
    "min-p relative to 1": min_p_relative_to_one,
    "min-p after temperature": min_p_after_temperature,
}


def temperature_only_at_first_step(temp=0.0, top_p=0.0, min_p=0.0, min_tokens_to_keep=1, top_k=0):
    """Applies the temperature to the first token only and draws the later ones at
    temperature 1 (the setting reaches the prefill path's sampler but not the decode
    loop's)."""
    first = reference.make_sampler(temp, top_p, min_p, min_tokens_to_keep, top_k)
    later = reference.make_sampler(1.0, top_p, min_p, min_tokens_to_keep, top_k)
    steps = 0

    def sampler(logprobs: mx.array) -> mx.array:
        nonlocal steps
        steps += 1
        return (first if steps == 1 else later)(logprobs)

    return sampler


def top_p_mask_from_first_step(temp=0.0, top_p=0.0, min_p=0.0, min_tokens_to_keep=1, top_k=0):
    """Computes the top-p mask at the first step and reuses it at every later one (filter
    state kept across steps: a mask buffer allocated once and never recomputed)."""
    mask = None

    def stale_top_p(logprobs: mx.array, top_p: float) -> mx.array:
        nonlocal mask
        if mask is None:
            mask = apply_top_p(logprobs, top_p) > NEG_INF
        return mx.where(mask, logprobs, NEG_INF)

    filters = filters_for(top_p, min_p, min_tokens_to_keep, top_k, top_p_filter=stale_top_p)
    return chained_sampler(filters, temp)


SEQUENCE_MUTANTS = {
    "temperature only at the first step": temperature_only_at_first_step,
    "top-p mask kept from the first step": top_p_mask_from_first_step,
}


def logprobs_after_filters(logprobs: mx.array, settings) -> mx.array:
    """Reports the log-probabilities of the distribution the token was drawn from
    (filtered, tempered, renormalised) instead of the model's (PROTOCOL.md S2)."""
    filters = filters_for(
        settings.top_p, settings.min_p, settings.min_tokens_to_keep, settings.top_k
    )
    for keep_likely in filters:
        logprobs = keep_likely(logprobs)
    scaled = logprobs * (1.0 / settings.temp)
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


# For ``reference_generation_draw(model, reported=...)``.
REPORT_MUTANTS = {"logprobs after temperature and filters": logprobs_after_filters}


def draft_token_on_rejection_draw(model, draft_model, num_draft_tokens: int) -> SequenceDraw:
    """Speculative decoding that, at the first rejected proposal, emits the *draft's* token
    instead of the target's. Emitted tokens then follow the draft's distribution.

    Written without a KV cache (the whole sequence is recomputed at every step): slower,
    but short, and on dummy still a few milliseconds per round.
    """

    def logprobs_after(m, tokens: list[int]) -> mx.array:
        logits = m(mx.array([tokens]))[0]
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def generate(prompt: list[int], sampler, length: int) -> list[int]:
        emitted: list[int] = []
        while len(emitted) < length:
            proposals: list[int] = []
            for _ in range(num_draft_tokens):
                proposals.append(
                    sampler(logprobs_after(draft_model, prompt + emitted + proposals)[-1:]).item()
                )
            # One target pass scores every proposal position, as in real speculative decoding.
            scored = logprobs_after(model, prompt + emitted + proposals)[-(num_draft_tokens + 1) :]
            targets = sampler(scored).tolist()
            accepted = 0
            while accepted < num_draft_tokens and targets[accepted] == proposals[accepted]:
                accepted += 1
            # THE BUG: the draft's proposal replaces the target's token on a rejection.
            last = proposals[accepted] if accepted < num_draft_tokens else targets[accepted]
            emitted += proposals[:accepted] + [last]
        return emitted[:length]

    def draw(context, settings, seed, n, length):
        sampler = sampler_for(settings)
        mx.random.seed(seed)
        return [generate(list(context), sampler, length) for _ in range(n)]

    return draw
