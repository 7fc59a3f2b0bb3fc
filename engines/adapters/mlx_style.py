"""A driver for any engine with mlx-lm's generation API (mlx-lm itself, the reference).

The reference follows mlx-lm's API so closely that one adapter serves both:
subclasses only say where the functions live (``api``) and how to load a
model. Everything here is written the way an mlx-lm user would write it:

- streaming requests go through ``stream_generate``; non-streaming ones
  through the lower-level ``generate_step`` / ``speculative_generate_step``
  loop, so "stream equals non-stream" compares two real code paths;
- extra stop tokens are added to the tokenizer's EOS ids for the request;
  stop *sequences* (which ``stream_generate`` lacks) are matched here;
- a prompt cache under a ``cache_key`` is reused by trimming it back to the
  longest prefix it shares with the new prompt, as servers do.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

# First, before mlx.core binds its BLAS symbols: the reference's OpenBLAS (reference/blas.py),
# so that every MLX engine in a process, whichever is imported first, computes on it.
# isort: off
import reference  # noqa: F401
import mlx.core as mx
# isort: on
import numpy as np

from engines.adapters.base import Engine, ends_with_any, event_from_logprobs
from engines.protocol import (
    BatchRequest,
    GenerateRequest,
    ProtocolError,
    ScoreRequest,
    TokenEvent,
    Unsupported,
)

ALL_BUT_BATCH = frozenset(
    {
        "greedy",
        "stream",
        "logprobs",
        "sampling",
        "logit_bias",
        "speculative",
        "input_embeddings",
        "prompt_cache",
        "rotating_kv",
        "prefill_chunking",
        "score",
    }
)


def with_history(processor, held: mx.array):
    """A logits processor that sees ``held`` (tokens already in a reused cache) first."""
    return lambda tokens, logits: processor(mx.concatenate([held, tokens]), logits)


class MlxStyleEngine(Engine):
    """Subclasses set ``api`` (a namespace with mlx-lm's generation functions) and ``load``."""

    api: SimpleNamespace

    def __init__(self, source):
        super().__init__(source)
        self.model, self.tokenizer = self.load(source)
        # The width of the model's output, which may exceed the tokenizer's vocabulary.
        self._vocab_size = int(self.model(mx.array([[0]])).shape[-1])
        self._embedding_dtype = self.model.model.embed_tokens(mx.array([0])).dtype
        self._drafts: dict[str, Any] = {}
        # cache_key -> (per-layer caches, the tokens they hold)
        self._caches: dict[str, tuple[list, list[int]]] = {}

    # -- what subclasses provide -------------------------------------------------

    def load(self, source) -> tuple[Any, Any]:
        raise NotImplementedError

    def load_draft(self, name: str):
        raise NotImplementedError

    def rotating_cache(self, max_kv_size: int) -> list:
        """A bounded cache keeping 4 sink positions (what ``max_kv_size`` means)."""
        return self.api.make_prompt_cache(self.model, max_kv_size=max_kv_size)

    # -- the Engine interface ----------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        kwargs = self.generation_kwargs(request)
        prompt = self.prompt_array(request)
        if request.cache_key is not None:
            if request.prompt_embeddings is not None:
                raise Unsupported("a cache key together with prompt embeddings")
            prompt, kwargs["prompt_cache"] = self.reuse_cache(request)
            if kwargs.get("logits_processors"):
                # Penalties count the whole prompt, not only the part still to feed.
                held = mx.array(request.prompt[: len(request.prompt) - prompt.size], dtype=prompt.dtype)
                kwargs["logits_processors"] = [
                    with_history(p, held) for p in kwargs["logits_processors"]
                ]
        if request.sampler.seed is not None:
            mx.random.seed(request.sampler.seed)
        with self.end_tokens(request.stop_tokens):
            if request.stream:
                events = self.stream_events(request, prompt, kwargs)
            else:
                events = iter(self.collected_events(request, prompt, kwargs))
            generated = []
            for event in events:
                generated.append(event.token)
                yield event
        if request.cache_key is not None:
            self.remember_cache(request, kwargs["prompt_cache"], generated)

    def generate_batch(self, request: BatchRequest) -> list[list[TokenEvent]]:
        outputs: list[list[TokenEvent]] = [[] for _ in request.rows]
        for row, event in self.stream_batch(request):
            outputs[row].append(event)
        return outputs

    def stream_batch(self, request: BatchRequest) -> Iterator[tuple[int, TokenEvent]]:
        """(row index, event) pairs, each as soon as the batch step producing it is done.

        Text is not streamed: a row's last event carries the row's whole text.
        """
        rows = [row.request for row in request.rows]
        for r in rows:
            if r.draft or r.prompt_embeddings is not None:
                raise Unsupported("batch rows with drafts or embeddings")
            if r.max_kv_size != rows[0].max_kv_size:
                raise Unsupported("batch rows with different max_kv_size")
        if rows[0].sampler.seed is not None:
            mx.random.seed(rows[0].sampler.seed)
        ends = sorted(self.tokenizer.eos_token_ids)
        options = {}
        if rows[0].prefill_step_size is not None:
            options["prefill_step_size"] = rows[0].prefill_step_size
        if rows[0].max_kv_size is not None:
            options["max_kv_size"] = rows[0].max_kv_size
        prompts, caches, held = zip(*(self.batch_row_prompt(r) for r in rows))
        stops = self.batch_stops(rows, ends)
        generator = self.api.BatchGenerator(self.model, stop_tokens=[[t] for t in ends], **options)
        tokens: list[list[int]] = [[] for _ in rows]
        waiting = sorted(range(len(rows)), key=lambda i: request.rows[i].insert_at)
        row_of_uid: dict[int, int] = {}
        finished = 0
        step = 0
        try:
            while finished < len(rows):
                if waiting and len(row_of_uid) == finished:
                    # Nothing is running: skip ahead to the next insertion instead of idling.
                    step = max(step, request.rows[waiting[0]].insert_at)
                due = [i for i in waiting if request.rows[i].insert_at <= step]
                if due:
                    waiting = [i for i in waiting if i not in due]
                    uids = generator.insert(
                        [prompts[i] for i in due],
                        max_tokens=[rows[i].max_tokens for i in due],
                        caches=[caches[i] for i in due],
                        all_tokens=[held[i] for i in due],
                        stop_sequences=[stops[i] for i in due] if stops else None,
                        samplers=[self.sampler(rows[i].sampler) for i in due],
                        logits_processors=[self.processors(rows[i].processors) or [] for i in due],
                    )
                    row_of_uid.update(zip(uids, due))
                responses = generator.next_generated()
                if not responses and not due:
                    raise ProtocolError(
                        f"{self.name}'s BatchGenerator stopped with rows unfinished"
                    )
                for response in responses:
                    i = row_of_uid[response.uid]
                    event = event_from_logprobs(
                        response.token,
                        np.array(response.logprobs.astype(mx.float32)),
                        self.vocab_size,
                        rows[i].top_logprobs,
                        finish_reason=response.finish_reason,
                    )
                    tokens[i].append(event.token)
                    if event.finish_reason is not None:
                        finished += 1
                        ends_of_row = set(ends) | set(rows[i].stop_tokens)
                        event.text = self.final_text(tokens[i], event.finish_reason, ends_of_row)
                    yield i, event
                step += 1
        finally:
            generator.close()

    def score(self, request: ScoreRequest) -> list[TokenEvent]:
        tokens = list(request.prompt) + list(request.continuation)
        logits = self.model(mx.array(tokens)[None])[0].astype(mx.float32)
        start = len(request.prompt) - 1
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        logprobs = np.array(logprobs[start : start + len(request.continuation)])
        return [
            event_from_logprobs(t, logprobs[i], self.vocab_size, request.top_logprobs)
            for i, t in enumerate(request.continuation)
        ]

    # -- pieces of a generation --------------------------------------------------

    def sampler(self, s):
        return self.api.make_sampler(
            temp=s.temp,
            top_p=s.top_p,
            min_p=s.min_p,
            min_tokens_to_keep=s.min_tokens_to_keep,
            top_k=s.top_k,
        )

    def processors(self, p) -> list | None:
        if not p.active:
            return None
        return self.api.make_logits_processors(
            logit_bias=p.logit_bias or None,
            repetition_penalty=p.repetition_penalty,
            repetition_context_size=p.repetition_context_size,
            presence_penalty=p.presence_penalty,
            presence_context_size=p.presence_context_size,
            frequency_penalty=p.frequency_penalty,
            frequency_context_size=p.frequency_context_size,
        )

    def generation_kwargs(self, request: GenerateRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"sampler": self.sampler(request.sampler)}
        processors = self.processors(request.processors)
        if processors:
            kwargs["logits_processors"] = processors
        if request.prefill_step_size is not None:
            kwargs["prefill_step_size"] = request.prefill_step_size
        if request.max_kv_size is not None:
            if request.draft is not None or request.cache_key is not None:
                raise Unsupported("max_kv_size together with a draft model or a cache key")
            kwargs["prompt_cache"] = self.rotating_cache(request.max_kv_size)
        if request.prompt_embeddings is not None:
            if request.draft is not None:
                raise Unsupported("speculative decoding from prompt embeddings")
            kwargs["input_embeddings"] = mx.array(
                np.asarray(request.prompt_embeddings, dtype=np.float32)
            ).astype(self._embedding_dtype)
        if request.draft is not None:
            if request.cache_key is not None:
                raise Unsupported("speculative decoding with a cache key")
            kwargs["draft_model"] = self.draft_model(request.draft.model)
            kwargs["num_draft_tokens"] = request.draft.num_draft_tokens
        return kwargs

    def prompt_array(self, request: GenerateRequest) -> mx.array:
        return mx.array(list(request.prompt), dtype=mx.int32)

    def batch_stops(self, rows: list[GenerateRequest], ends: list[int]) -> list | None:
        """Per-row stop sequences (end tokens and the row's stop tokens too, as sequences of
        one: the batch's own stop tokens are shared by every row), or None where no row has
        its own. mlx-lm takes them as its ``StopSequences`` automata, the reference as plain
        lists."""
        if not any(r.stop_sequences or r.stop_tokens for r in rows):
            return None
        module = importlib.import_module(self.api.BatchGenerator.__module__)
        automaton = getattr(module, "StopSequences", list)
        return [
            automaton([[t] for t in [*ends, *r.stop_tokens]] + [list(s) for s in r.stop_sequences])
            for r in rows
        ]

    def batch_row_prompt(self, request: GenerateRequest) -> tuple[list[int], list | None, list]:
        """A batch row's prompt still to feed, the cache holding the rest (None: a fresh
        one), and the tokens in that cache. A reused cache is taken out of the store: the
        batch extends it in place, past what the store would say it holds."""
        if request.cache_key is None:
            return list(request.prompt), None, []
        rest, cache = self.reuse_cache(request)
        self._caches.pop(request.cache_key, None)
        rest = rest.tolist()
        return rest, cache, list(request.prompt[: len(request.prompt) - len(rest)])

    def draft_model(self, name: str):
        if name == "self":
            return self.model
        if name not in self._drafts:
            self._drafts[name] = self.load_draft(name)
        return self._drafts[name]

    @contextmanager
    def end_tokens(self, extra: list[int]):
        """The model's EOS ids plus the request's stop tokens, for the request's duration."""
        saved = set(self.tokenizer.eos_token_ids)
        self.tokenizer.eos_token_ids = saved | {int(t) for t in extra}
        try:
            yield
        finally:
            self.tokenizer.eos_token_ids = saved

    def stream_events(self, request, prompt, kwargs) -> Iterator[TokenEvent]:
        kwargs = dict(kwargs)
        draft = kwargs.pop("draft_model", None)
        tokens: list[int] = []
        emitted = ""
        responses = self.api.stream_generate(
            self.model, self.tokenizer, prompt, request.max_tokens, draft_model=draft, **kwargs
        )
        for response in responses:
            tokens.append(int(response.token))
            finish, text = response.finish_reason, response.text
            if ends_with_any(tokens, request.stop_sequences):
                # stream_generate does not know our stop sequence: flush the text it holds back.
                finish = "stop"
                text = self.tokenizer.decode(tokens)[len(emitted) :]
            emitted += text
            yield self.event(
                response.token, response.logprobs, request, text, response.from_draft, finish
            )
            if finish is not None:
                break

    def collected_events(self, request, prompt, kwargs) -> list[TokenEvent]:
        """The non-streaming path: drive the token generator, decode the text once at the end."""
        kwargs = dict(kwargs)
        draft = kwargs.pop("draft_model", None)
        if draft is not None:
            steps = self.api.speculative_generate_step(
                prompt, self.model, draft, max_tokens=request.max_tokens, **kwargs
            )
        else:
            kwargs.pop("num_draft_tokens", None)
            steps = (
                (token, logprobs, False)
                for token, logprobs in self.api.generate_step(
                    prompt, self.model, max_tokens=request.max_tokens, **kwargs
                )
            )
        ends = set(self.tokenizer.eos_token_ids)
        events, tokens = [], []
        for token, logprobs, from_draft in steps:
            tokens.append(int(token))
            finish = None
            if tokens[-1] in ends or ends_with_any(tokens, request.stop_sequences):
                finish = "stop"
            elif len(tokens) == request.max_tokens:
                finish = "length"
            events.append(self.event(token, logprobs, request, "", from_draft, finish))
            if finish is not None:
                break
        self.attach_final_text(events, ends)
        return events

    def event(self, token, logprobs, request, text, from_draft, finish) -> TokenEvent:
        vector = np.array(logprobs.astype(mx.float32))
        return event_from_logprobs(
            token,
            vector,
            self.vocab_size,
            request.top_logprobs,
            text=text,
            from_draft=bool(from_draft),
            finish_reason=finish,
        )

    def attach_final_text(self, events: list[TokenEvent], ends: set[int]) -> None:
        """Non-streaming answers carry all their text on the last event."""
        if events:
            tokens = [e.token for e in events]
            events[-1].text = self.final_text(tokens, events[-1].finish_reason, ends)

    def final_text(self, tokens: list[int], finish: str | None, ends: set[int]) -> str:
        """The text of a whole answer: its tokens decoded, less a final end token."""
        if finish == "stop" and tokens[-1] in ends:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens)

    # -- prompt cache reuse -------------------------------------------------------

    def reuse_cache(self, request: GenerateRequest) -> tuple[mx.array, list]:
        """The part of the prompt still to feed, and the cache holding the rest."""
        prompt = list(request.prompt)
        entry = self._caches.get(request.cache_key)
        if entry is None:
            return mx.array(prompt, dtype=mx.int32), self.api.make_prompt_cache(self.model)
        cache, held = entry
        shared = 0
        while shared < min(len(held), len(prompt)) and held[shared] == prompt[shared]:
            shared += 1
        # At least the last prompt token must be fed: its logits give the first new token.
        shared = min(shared, len(prompt) - 1)
        if not self.api.can_trim_prompt_cache(cache):
            return mx.array(prompt, dtype=mx.int32), self.api.make_prompt_cache(self.model)
        self.trim_cache(cache, len(held) - shared)
        return mx.array(prompt[shared:], dtype=mx.int32), cache

    def trim_cache(self, cache: list, n: int) -> None:
        self.api.trim_prompt_cache(cache, n)

    def remember_cache(self, request: GenerateRequest, cache: list, generated: list[int]) -> None:
        # The cache holds every position fed so far: the prompt and the generated
        # tokens that were fed back (mlx-lm feeds each one as it is yielded).
        held = (list(request.prompt) + generated)[: cache[0].offset]
        self._caches[request.cache_key] = (cache, held)
