"""Speculative decoding: a small draft model proposes, the target model verifies.

Each round:

1. The draft model proposes ``k`` tokens, one at a time (cheap).
2. The target model scores the last accepted token plus all ``k`` proposals
   in one forward pass, giving ``k + 1`` next-token distributions, and samples
   its own token at each of them.
3. Proposals are accepted while they equal the target's own samples; the
   first disagreement is replaced by the target's token (and a full
   acceptance earns the target's bonus token at position ``k + 1``).
4. Both caches are trimmed back to the accepted positions. Sliding-window
   layers keep ``num_draft_tokens`` positions beyond their window
   (``RotatingKVCache``'s ``slack``), so that trimming stays exact however
   long the text grows.

Every emitted token is a token the target itself sampled from its own
distribution at the right context, so the output distribution is exactly the
target's (and greedy output equals plain greedy output); the draft only
changes how many target passes are needed.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import mlx.core as mx

from .inputs import (
    as_prompt_array,
    check_draft_model,
    check_max_tokens,
    check_prefill_step_size,
    check_prompt,
)
from .kv_cache import (
    RotatingKVCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from .prefill import log_softmax, prefill
from .sampler import greedy_sampler


def speculative_generate_step(
    prompt: mx.array,
    model,
    draft_model,
    stream=None,
    *,
    num_draft_tokens: int = 2,
    max_tokens: int = 256,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: list | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """Yield ``(token, logprobs, from_draft)``.

    ``prompt_cache``, if given, holds the target's layers followed by the
    draft's (as ``make_prompt_cache(model) + make_prompt_cache(draft_model)``).
    """
    prompt = as_prompt_array(prompt)
    check_max_tokens(max_tokens)
    check_prefill_step_size(prefill_step_size)
    check_prompt(model, prompt)
    check_draft_model(model, draft_model)
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be a positive integer, got {num_draft_tokens!r}")
    if prompt_cache is None:
        model_cache = with_slack(make_prompt_cache(model), num_draft_tokens)
        draft_cache = with_slack(make_prompt_cache(draft_model), num_draft_tokens)
    else:
        n_layers = len(model.layers)
        model_cache, draft_cache = prompt_cache[:n_layers], prompt_cache[n_layers:]
    if not can_trim_prompt_cache(model_cache) or not can_trim_prompt_cache(draft_cache):
        raise ValueError("speculative decoding needs trimmable caches (no evicted positions)")
    sampler = sampler or greedy_sampler
    history = prompt.tolist()  # context for logits processors

    def sample(logits: mx.array, context: list[int]) -> tuple[mx.array, mx.array]:
        if logits_processors:
            tokens = mx.array(context, dtype=mx.int32)
            for processor in logits_processors:
                logits = processor(tokens, logits)
        logprobs = log_softmax(logits)
        return sampler(logprobs), logprobs

    def propose(inputs: list[int], k: int) -> list[int]:
        proposals = []
        for _ in range(k):
            logits = draft_model(mx.array([inputs]), cache=draft_cache)[:, -1, :]
            token, _ = sample(logits, history + proposals)
            proposals.append(token.item())
            inputs = proposals[-1:]
        return proposals

    with mx.stream(stream or mx.default_stream(mx.default_device())):
        prefill(draft_model, draft_cache, prompt, None, prefill_step_size)
        last, _ = prefill(model, model_cache, prompt, None, prefill_step_size)
        last = last.tolist()
        draft_inputs = last
        n_emitted = 0
        while max_tokens == -1 or n_emitted < max_tokens:
            remaining = num_draft_tokens if max_tokens == -1 else max_tokens - n_emitted
            k = min(num_draft_tokens, remaining)
            proposals = propose(draft_inputs, k)

            logits = model(mx.array([last + proposals]), cache=model_cache)[0]
            verdicts = [sample(logits[i : i + 1], history + proposals[:i]) for i in range(k + 1)]
            targets = [token.item() for token, _ in verdicts]

            accepted = 0
            while accepted < k and targets[accepted] == proposals[accepted]:
                accepted += 1
            emitted = [(t, True) for t in proposals[:accepted]] + [(targets[accepted], False)]
            for i, (token, from_draft) in enumerate(emitted):
                if max_tokens != -1 and n_emitted == max_tokens:
                    break
                history.append(token)
                n_emitted += 1
                yield token, verdicts[i][1].squeeze(0), from_draft

            # The target saw last + k proposals; keep last + the accepted ones.
            trim_prompt_cache(model_cache, k - accepted)
            # The draft saw last + proposals[:-1]; keep last + the accepted ones.
            trim_prompt_cache(draft_cache, max(k - 1 - accepted, 0))
            last = [targets[accepted]]
            # After a full acceptance the draft has not yet seen its own last proposal.
            draft_inputs = proposals[-1:] + last if accepted == k else last


def with_slack(cache: list, slack: int) -> list:
    """``cache`` with room to take back ``slack`` positions from its sliding windows."""
    return [
        RotatingKVCache(c.max_size, c.keep, slack) if isinstance(c, RotatingKVCache) else c
        for c in cache
    ]
