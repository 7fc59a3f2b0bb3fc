"""Prompt processing: feed a prompt into the KV cache in chunks.

Chunking bounds the memory of the attention scores (chunk x context) for long
prompts; the result must not depend on the chunk size (the caches make sure of it).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def prefill(
    model,
    cache: list,
    prompt: mx.array,
    input_embeddings: mx.array | None,
    prefill_step_size: int,
    on_chunk: Callable[[mx.array, int], None] = lambda chunk, n: None,
) -> tuple[mx.array, mx.array | None]:
    """Feed all positions but the last into ``cache``; return what is left.

    ``on_chunk(tokens, n_positions)`` is called after each chunk is in the cache.
    """
    n_positions = len(input_embeddings) if input_embeddings is not None else prompt.size
    while n_positions > 1:
        n = min(prefill_step_size, n_positions - 1)
        embeddings = input_embeddings[None, :n] if input_embeddings is not None else None
        model(prompt[None, :n], cache=cache, input_embeddings=embeddings)
        mx.eval([c.state for c in cache])
        on_chunk(prompt[:n], n)
        prompt = prompt[n:]
        input_embeddings = input_embeddings[n:] if input_embeddings is not None else None
        n_positions -= n
    return prompt, input_embeddings
