"""Drawing N seeded samples from an engine: the callables a sampler case is run with.

A sampler case needs many samples at one context, so the suite asks for them through
one small callable, and anything able to sample can provide it:

- ``NextTokenDraw``: ``draw(context_tokens, settings, seed, n) -> list[int]``, n draws
  of the token that follows ``context_tokens``;
- ``SequenceDraw``: ``draw(context_tokens, settings, seed, n, length) -> list[list[int]]``,
  n generations of up to ``length`` tokens each (every emitted position must follow the
  model's distribution at the prefix it followed: plain or speculative sampling);
- ``GenerationDraw``: the same, each generation a ``Generation``: its tokens and the
  logprob the engine reported for each (judged by ``paths.py``).

The same ``seed`` must give the same draws; different seeds, independent ones.

Implementations here:

- ``reference_draw``: the reference's sampler, batched (see below), fast;
- ``reference_speculative_draw``: one ``speculative_generate_step`` run per draw;
- ``reference_generation_draw``: n generations of the reference as the rows of one
  batch, one forward pass per step for all of them (fast);
- ``request_draw``: any engine that answers ``GenerateRequest``s (the adapters), one
  seeded request per draw: the path a user's engine takes (about 5 ms a draw for the
  reference on dummy); ``request_generation_draw`` the same, keeping the logprobs.

Each reference draw takes a ``sampler_factory`` with ``make_sampler``'s signature, so
the tests can hand in deliberately broken samplers and check the statistics catch them.

MLX and the reference are imported only by the reference draws, when called:
``request_draw`` (what the catalogue's checks use) works without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from engines.protocol import GenerateRequest, SamplerSettings

NextTokenDraw = Callable[[list[int], SamplerSettings, int, int], list[int]]
SequenceDraw = Callable[[list[int], SamplerSettings, int, int, int], list[list[int]]]


@dataclass(frozen=True)
class Generation:
    """One sampled generation: its tokens and the logprob reported with each (None: none)."""

    tokens: list[int]
    logprobs: list[float | None]


GenerationDraw = Callable[[list[int], SamplerSettings, int, int, int], list[Generation]]
Sampler = Callable[[Any], Any]  # an mx.array of logprobs -> an mx.array of token ids
# make_sampler(temp, top_p, min_p, min_tokens_to_keep, top_k); None: the reference's own.
SamplerFactory = Callable[..., Sampler]

# Rows x vocabulary entries per batched sampler call: bounds memory for big vocabularies
# (smollm2's 49,152 tokens x 80 rows is about 16 MB of float32).
MAX_BATCH_ELEMENTS = 1 << 22


def sampler_for(settings: SamplerSettings, factory: SamplerFactory | None = None):
    if factory is None:
        import reference

        factory = reference.make_sampler
    return factory(
        settings.temp, settings.top_p, settings.min_p, settings.min_tokens_to_keep, settings.top_k
    )


def next_token_logprobs(model, context: list[int]):
    """The reference's full log-softmax vector (an mx.array, 1 x vocab) after ``context``.

    Taken from ``generate_step`` with the greedy sampler (which draws no random
    numbers), so it is exactly the vector the engine's sampler sees.
    """
    import mlx.core as mx

    import reference

    _, logprobs = next(reference.generate_step(mx.array(context), model, max_tokens=1))
    return logprobs.reshape(1, -1)


def reference_draw(
    model,
    sampler_factory: SamplerFactory | None = None,
    max_batch_elements: int = MAX_BATCH_ELEMENTS,
) -> NextTokenDraw:
    """n draws from the reference's sampler at one context, many per sampler call.

    The next-token logprobs are computed once; the engine's own sampler is then
    applied to that vector repeated as the rows of a batch. This is legitimate for
    mlx-lm-style samplers: every filter (top-p, min-p, top-k) works along the last
    axis, row by row, and ``mx.random.categorical`` draws each row with its own
    noise, so the rows are independent draws from the same distribution, exactly
    as n separate calls would be (``test_sampler_stats.py`` checks that one
    seeded ``generate_step`` run per draw passes the same test).
    """

    import mlx.core as mx

    def draw(context: list[int], settings: SamplerSettings, seed: int, n: int) -> list[int]:
        logprobs = next_token_logprobs(model, context)
        sampler = sampler_for(settings, sampler_factory)
        rows_per_call = max(1, max_batch_elements // logprobs.shape[-1])
        mx.random.seed(seed)
        tokens: list[int] = []
        for start in range(0, n, rows_per_call):
            rows = min(rows_per_call, n - start)
            tokens += sampler(mx.broadcast_to(logprobs, (rows, logprobs.shape[-1]))).tolist()
        return tokens

    return draw


def reference_speculative_draw(
    model,
    draft_model,
    num_draft_tokens: int,
    sampler_factory: SamplerFactory | None = None,
) -> SequenceDraw:
    """n speculative generations of ``length`` tokens, the draft and the target sharing the sampler."""
    import mlx.core as mx

    import reference

    def draw(
        context: list[int], settings: SamplerSettings, seed: int, n: int, length: int
    ) -> list[list[int]]:
        sampler = sampler_for(settings, sampler_factory)
        prompt = mx.array(context)
        mx.random.seed(seed)
        return [
            [
                token
                for token, _, _ in reference.speculative_generate_step(
                    prompt,
                    model,
                    draft_model,
                    num_draft_tokens=num_draft_tokens,
                    max_tokens=length,
                    sampler=sampler,
                )
            ]
            for _ in range(n)
        ]

    return draw


def reference_generation_draw(
    model,
    sampler_factory: SamplerFactory | None = None,
    reported: Callable[[Any, SamplerSettings], Any] | None = None,
) -> GenerationDraw:
    """n generations of ``length`` tokens, as the n rows of one batch.

    Every row has the same prompt and, at every step, the same length, so the
    model's batched forward pass with an ordinary KV cache serves them all; the
    sampler is called once per step on the n rows' logprobs (one sampler per call
    of ``draw``: a sampler with state keeps it across the steps of a generation, as
    in ``generate_step``). Generations do not stop at end tokens: every prefix is
    still judged against the reference's distribution there.

    ``reported(logprobs, settings)`` is the vector each step's reported logprob is
    read from (default: the log-softmax the sampler sees, as PROTOCOL.md S2 says),
    so that tests can hand in an engine that reports something else.
    """
    import mlx.core as mx

    from reference.kv_cache import make_prompt_cache

    def draw(
        context: list[int], settings: SamplerSettings, seed: int, n: int, length: int
    ) -> list[Generation]:
        sampler = sampler_for(settings, sampler_factory)
        cache = make_prompt_cache(model)
        inputs = mx.broadcast_to(mx.array(context), (n, len(context)))
        mx.random.seed(seed)
        tokens, logprobs = [], []
        for _ in range(length):
            logits = model(inputs, cache=cache)[:, -1, :].astype(mx.float32)
            step_logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            chosen = sampler(step_logprobs)
            shown = step_logprobs if reported is None else reported(step_logprobs, settings)
            tokens.append(chosen)
            logprobs.append(mx.take_along_axis(shown, chosen[:, None], axis=-1)[:, 0])
            inputs = chosen[:, None]
        tokens, logprobs = mx.stack(tokens, axis=1).tolist(), mx.stack(logprobs, axis=1).tolist()
        return [Generation(t, lp) for t, lp in zip(tokens, logprobs, strict=True)]

    return draw


def generation_tokens(draw: GenerationDraw) -> SequenceDraw:
    """A sequence draw from a generation draw: the tokens only."""

    def sequence_draw(context, settings, seed, n, length):
        return [g.tokens for g in draw(context, settings, seed, n, length)]

    return sequence_draw


def request_seeds(seed: int, n: int) -> list[int]:
    """n distinct, independent-looking 32-bit seeds derived from one (for n separate requests)."""
    return np.random.SeedSequence(seed).generate_state(n).tolist()


def request_draw(
    run: Callable[[GenerateRequest], list[int]], template: GenerateRequest | None = None
) -> SequenceDraw:
    """Draws from any engine that answers requests: one seeded request per draw.

    ``run(request)`` returns the generated token ids (an adapter's events' tokens).
    Each request is ``template`` (default: a plain ``GenerateRequest``; it may carry a
    draft model, logit bias, ...) with the context as its prompt, ``length`` as its
    ``max_tokens`` and the settings with the draw's own seed. A generation may end
    early at an end token; the statistics only use the positions that were generated.
    """

    def run_generation(request: GenerateRequest) -> Generation:
        tokens = list(run(request))
        return Generation(tokens, [None] * len(tokens))

    return generation_tokens(request_generation_draw(run_generation, template))


def request_generation_draw(
    run: Callable[[GenerateRequest], Generation], template: GenerateRequest | None = None
) -> GenerationDraw:
    """``request_draw`` for an engine whose answers carry logprobs: ``run(request)``
    returns the generation, its tokens and their reported logprobs."""
    template = template if template is not None else GenerateRequest()

    def draw(
        context: list[int], settings: SamplerSettings, seed: int, n: int, length: int
    ) -> list[Generation]:
        generations = []
        for request_seed in request_seeds(seed, n):
            request = replace(
                template,
                prompt=list(context),
                prompt_embeddings=None,
                max_tokens=length,
                sampler=replace(settings, seed=request_seed),
            )
            generation = run(request)
            generations.append(
                Generation(list(generation.tokens)[:length], list(generation.logprobs)[:length])
            )
        return generations

    return draw


def first_tokens(draw: SequenceDraw) -> NextTokenDraw:
    """A next-token draw from a sequence draw: generations of one token."""

    def next_token_draw(context: list[int], settings: SamplerSettings, seed: int, n: int):
        return [sequence[0] for sequence in draw(context, settings, seed, n, 1)]

    return next_token_draw
