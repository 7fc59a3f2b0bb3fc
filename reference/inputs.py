"""Validation of generation inputs.

Every check runs before any model call or cache update, so a rejected request
leaves no partial state behind. Messages name the argument and the allowed range.
"""

from __future__ import annotations

import mlx.core as mx


def vocab_size(model) -> int:
    args = getattr(model, "args", None)
    if args is not None and getattr(args, "vocab_size", None):
        return int(args.vocab_size)
    return int(model.model.embed_tokens.weight.shape[0])


def hidden_size(model) -> int:
    args = getattr(model, "args", None)
    if args is not None and getattr(args, "hidden_size", None):
        return int(args.hidden_size)
    # Quantized embeddings pack their weight, so ask the layer for one row instead.
    return int(model.model.embed_tokens(mx.array([0])).shape[-1])


def check_max_tokens(max_tokens: int) -> None:
    if not _integer(max_tokens) or max_tokens == 0 or max_tokens < -1:
        raise ValueError(
            f"max_tokens must be a positive integer (or -1 for no limit), got {max_tokens!r}"
        )


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_prompt_array(prompt) -> mx.array:
    """Token ids as a 1-D uint32-compatible array (lists, tuples, arrays accepted)."""
    if isinstance(prompt, mx.array):
        array = prompt
        if array.size and not mx.issubdtype(array.dtype, mx.integer):
            raise ValueError(f"prompt token ids must be integers, got an array of {array.dtype}")
    else:
        ids = list(prompt)
        odd = next((t for t in ids if not _integer(t)), None)
        if odd is not None:  # mx.array would truncate 1.5 to 1, or True to 1, silently
            raise ValueError(f"prompt token ids must be integers, got {odd!r}")
        array = mx.array(ids, dtype=mx.int32)
    if array.ndim != 1:
        raise ValueError(f"prompt must be a 1-D sequence of token ids, got shape {array.shape}")
    return array


def check_prompt(model, prompt: mx.array, input_embeddings: mx.array | None = None) -> None:
    """Reject empty prompts, out-of-vocabulary ids and mis-shaped embeddings."""
    if input_embeddings is None and prompt.size == 0:
        raise ValueError("prompt is empty: give at least one token id (or input_embeddings)")
    if prompt.size:
        n_vocab = vocab_size(model)
        lo, hi = prompt.min().item(), prompt.max().item()
        if lo < 0 or hi >= n_vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {n_vocab})")
    if input_embeddings is not None:
        width = hidden_size(model)
        if input_embeddings.ndim != 2 or input_embeddings.shape[1] != width:
            raise ValueError(
                f"input_embeddings must have shape (positions, {width}), "
                f"got {tuple(input_embeddings.shape)}"
            )
        if input_embeddings.shape[0] == 0:
            raise ValueError("input_embeddings is empty: give at least one position")
        if not mx.isfinite(input_embeddings).all().item():
            raise ValueError("input_embeddings holds NaN or infinite values")
        if prompt.size and prompt.size != input_embeddings.shape[0]:
            raise ValueError(
                f"input_embeddings has {input_embeddings.shape[0]} positions but the prompt has "
                f"{prompt.size} tokens; give as many embeddings as tokens, or an empty prompt"
            )


def check_draft_model(model, draft_model) -> None:
    if vocab_size(model) != vocab_size(draft_model):
        raise ValueError(
            f"draft_model vocabulary size ({vocab_size(draft_model)}) differs from the "
            f"model's ({vocab_size(model)}); the draft must share the tokenizer"
        )


def check_sampler(sampler, model) -> None:
    """A sampler must be callable; one from ``make_sampler`` must fit the vocabulary."""
    if sampler is not None and not callable(sampler):
        raise TypeError(f"sampler must be callable, got {type(sampler).__name__}")
    check = getattr(sampler, "check_vocabulary", None)
    if check is not None:
        check(vocab_size(model))


def check_logits_processors(logits_processors) -> None:
    for i, processor in enumerate(logits_processors or []):
        if not callable(processor):
            raise TypeError(f"logits_processors[{i}] must be callable, got {processor!r}")


def check_cache_usable(prompt_cache, model) -> None:
    """A cache from a failed generation that could not be rolled back must not be reused."""
    if len(prompt_cache) != len(model.layers):
        raise ValueError(
            f"prompt_cache has {len(prompt_cache)} layers, the model has {len(model.layers)}"
        )
    reason = next((r for c in prompt_cache if (r := getattr(c, "unusable", None))), None)
    if reason:
        raise ValueError(f"prompt_cache is unusable: {reason}; make a new one")


def check_prefill_step_size(prefill_step_size: int) -> None:
    if not _integer(prefill_step_size) or prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be a positive integer, got {prefill_step_size!r}")
