"""Single-sequence generation: ``generate_step``, ``stream_generate``, ``generate``.

The loop, as in mlx-lm:

1. Prefill: feed all prompt positions but the last in ``prefill_step_size``
   chunks, filling the KV cache (no logits needed).
2. Feed the last prompt position; its logits give the first token.
3. Decode: feed each sampled token back, one position at a time.

Decoding runs one step ahead: step n+1 is queued (``mx.async_eval``) before
token n is handed to the caller, so Python overhead overlaps the model's work.
A consequence users can observe, kept for compatibility with mlx-lm: the last
call of a logits processor sees the prompt plus ``max_tokens`` tokens.

No partial state: every argument is checked before the cache is touched, and
a sampled id outside the vocabulary is an error (the model is fed a safe id
meanwhile, never the bad one). If anything raises during generation, the
prompt cache is rolled back to hold exactly what the caller was given (the
prompt and the tokens yielded so far, or nothing new if no token was yielded);
where a sliding window has already evicted positions and cannot be rolled
back, it is marked unusable, and passing it again raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import mlx.core as mx

from .inputs import (
    as_prompt_array,
    check_cache_usable,
    check_draft_model,
    check_logits_processors,
    check_max_tokens,
    check_prefill_step_size,
    check_prompt,
    check_sampler,
    vocab_size,
)
from .kv_cache import make_prompt_cache
from .prefill import log_softmax, prefill
from .sampler import greedy_sampler
from .speculative import speculative_generate_step
from .tokenizer import TokenizerWrapper


@dataclass
class GenerationResponse:
    """One step of ``stream_generate``; field names and meanings as in mlx-lm.

    ``text`` is the new piece of decoded text (may be empty), ``logprobs`` the
    full log-softmax vector after logits processors, ``peak_memory`` in GB,
    ``finish_reason`` "stop" (EOS), "length" (``max_tokens``) or None.
    """

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None


def generate_step(
    prompt: mx.array,
    model,
    stream=None,
    *,
    max_tokens: int = 256,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: list | None = None,
    max_kv_size: int | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    input_embeddings: mx.array | None = None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield ``(token, logprobs)`` pairs; ``max_tokens=-1`` never stops by itself.

    ``prompt_cache`` (list of per-layer caches) is extended in place, so a later
    call can continue from it. ``input_embeddings`` (positions x hidden) replace
    the token embeddings of the prompt, or stand alone with an empty prompt.
    """
    prompt = as_prompt_array(prompt)
    check_max_tokens(max_tokens)
    check_prefill_step_size(prefill_step_size)
    check_prompt(model, prompt, input_embeddings)
    check_sampler(sampler, model)
    check_logits_processors(logits_processors)
    if prompt_cache is None:
        prompt_cache = make_prompt_cache(model, max_kv_size=max_kv_size)
    else:
        check_cache_usable(prompt_cache, model)
    sampler = sampler or greedy_sampler
    n_vocab = vocab_size(model)
    start = prompt_cache[0].offset if prompt_cache else 0
    progress = prompt_progress_callback or (lambda processed, total: None)
    # Every token seen so far, as logits processors need it. With embeddings
    # alone there are no token ids to show them, as in mlx-lm.
    seen = mx.array([], dtype=prompt.dtype)

    def remember(tokens: mx.array) -> None:
        nonlocal seen
        if logits_processors and tokens.size:
            seen = mx.concatenate([seen, tokens])

    def step(tokens: mx.array, embeddings: mx.array | None = None):
        embeddings = embeddings[None] if embeddings is not None else None
        # A sampled id outside the vocabulary is fed as 0 (it is rejected before it is
        # handed out, and the position rolled back): the embedding lookup never sees it.
        tokens = mx.where((tokens >= 0) & (tokens < n_vocab), tokens, 0)
        logits = model(tokens[None], cache=prompt_cache, input_embeddings=embeddings)[:, -1, :]
        remember(tokens)
        if logits_processors and tokens.size:
            for processor in logits_processors:
                logits = processor(seen, logits)
        logprobs = log_softmax(logits)
        return sampler(logprobs), logprobs.squeeze(0)

    total = len(input_embeddings) if input_embeddings is not None else prompt.size
    processed = 0

    def on_chunk(tokens: mx.array, n: int) -> None:
        nonlocal processed
        remember(tokens)
        processed += n
        progress(processed, total)

    n = 0  # tokens handed to the caller
    try:
        with mx.stream(stream or mx.default_stream(mx.default_device())):
            progress(0, total)
            prompt, input_embeddings = prefill(
                model, prompt_cache, prompt, input_embeddings, prefill_step_size, on_chunk
            )
            y, logprobs = step(prompt, input_embeddings)
            mx.async_eval(y, logprobs)
            while True:
                if n != max_tokens:
                    next_y, next_logprobs = step(y)
                    mx.async_eval(next_y, next_logprobs)
                if n == 0:
                    mx.eval(y)
                    progress(total, total)
                if n == max_tokens:
                    return
                yield sampled_id(y, n_vocab), logprobs
                y, logprobs = next_y, next_logprobs
                n += 1
    except GeneratorExit:  # the caller stopped early: the cache holds what it was given
        raise
    except BaseException:
        roll_back(prompt_cache, start + total + n if n else start)
        raise


def sampled_id(y: mx.array, n_vocab: int) -> int:
    """The sampler's choice as an int, checked against the vocabulary."""
    if y.size != 1:
        raise ValueError(f"the sampler returned {y.size} values for one position")
    token = y.item()
    if not isinstance(token, int) or not 0 <= token < n_vocab:
        raise ValueError(f"the sampler chose token {token!r}, outside the vocabulary [0, {n_vocab})")
    return token


def roll_back(prompt_cache: list, offset: int) -> None:
    """Return every layer to ``offset`` positions, or mark the cache unusable if a layer
    cannot go back exactly (a sliding window that already evicted positions)."""
    exact = all(c.size() == c.offset for c in prompt_cache)  # nothing evicted anywhere
    if exact:
        for layer in prompt_cache:
            layer.trim(max(layer.offset - offset, 0))
        return
    for layer in prompt_cache:
        layer.unusable = (
            "a generation failed after its sliding window had evicted positions, so the "
            "cache could not be rolled back"
        )


def as_wrapper(tokenizer) -> TokenizerWrapper:
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def encode_prompt(tokenizer: TokenizerWrapper, prompt) -> mx.array:
    """Strings are tokenized (adding BOS unless the text already starts with it)."""
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        add_special_tokens = bos is None or not prompt.startswith(bos)
        return mx.array(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
    return as_prompt_array(prompt)


def stream_generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int = 256,
    draft_model=None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Yield a ``GenerationResponse`` per generated token, ending at EOS or ``max_tokens``.

    The EOS token itself is reported in the last response (with ``finish_reason
    == "stop"``) but contributes no text. With ``draft_model``, speculative
    decoding is used (kwargs ``num_draft_tokens`` etc.).
    """
    check_max_tokens(max_tokens)
    tokenizer = as_wrapper(tokenizer)
    prompt = encode_prompt(tokenizer, prompt)
    kwargs.pop("stream", None)
    if draft_model is None:
        kwargs.pop("num_draft_tokens", None)
        steps = (
            (token, logprobs, False)
            for token, logprobs in generate_step(prompt, model, max_tokens=max_tokens, **kwargs)
        )
        embeddings = kwargs.get("input_embeddings")
        prompt_positions = len(embeddings) if embeddings is not None else prompt.size
    else:
        if kwargs.get("input_embeddings") is not None:
            raise ValueError("speculative decoding does not support input_embeddings")
        for unsupported in ("input_embeddings", "max_kv_size", "prompt_progress_callback"):
            kwargs.pop(unsupported, None)
        check_draft_model(model, draft_model)
        steps = speculative_generate_step(
            prompt, model, draft_model, max_tokens=max_tokens, **kwargs
        )
        prompt_positions = prompt.size

    detokenizer = tokenizer.detokenizer
    tic = time.perf_counter()
    prompt_tps = 0.0

    def response(token, logprobs, from_draft, n, finish_reason=None):
        return GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=prompt_positions,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
        )

    for n, (token, logprobs, from_draft) in enumerate(steps):
        if n == 0:
            prompt_tps = prompt_positions / max(time.perf_counter() - tic, 1e-9)
            tic = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            break
        detokenizer.add_token(token)
        if n + 1 == max_tokens:
            break
        yield response(token, logprobs, from_draft, n)

    detokenizer.finalize()
    finish_reason = "stop" if token in tokenizer.eos_token_ids else "length"
    yield response(token, logprobs, from_draft, n, finish_reason)


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """The whole reply as one string (``kwargs`` go to ``stream_generate``)."""
    text = ""
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec"
        )
        print(f"Peak memory: {response.peak_memory:.3f} GB")
    return text
