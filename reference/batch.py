"""The batch scheduler: continuous batching with ``BatchGenerator`` and ``batch_generate``.

Requests wait in a queue, are prefilled together in small batches, then join
the running decode batch; each leaves it as soon as it finishes. One call of
``BatchGenerator.next()`` does at most two pieces of work:

1. one decode step for every sequence in the running batch (as in
   ``generate_step``, the step runs one ahead: the tokens reported now were
   computed by the previous call while the next ones are being computed);
2. if the running batch has room: one prefill chunk (``prefill_step_size``
   columns) for up to ``prefill_batch_size`` new requests. When their prompts
   are in the cache, their last prompt tokens are fed and they join the
   running batch.

Exactness comes from the caches (``batch_cache.py``): every row sees exactly
the keys it would see alone, so a sequence's tokens do not depend on its
neighbours. API and semantics follow mlx-lm 0.32.2's ``BatchGenerator``.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx

from .batch_cache import BatchKVCache
from .generate import as_wrapper, encode_prompt
from .inputs import as_prompt_array, check_prefill_step_size, check_prompt
from .kv_cache import make_prompt_cache
from .prefill import log_softmax
from .sampler import greedy_sampler


@dataclass
class Request:
    """One prompt's generation: its settings and how far it has got."""

    uid: int
    prompt: list[int]
    max_tokens: int
    sampler: Callable
    processors: tuple
    stop_sequences: list[tuple[int, ...]]
    cache: list  # single-sequence caches to start from (not modified)
    tokens: list[int]  # every token in the cache, for logits processors
    generated: list[int] = field(default_factory=list)
    padding: int = 0  # PAD columns before the prompt in its prefill batch

    def prefill_columns(self) -> list[int]:
        """The prompt but its last token, left-padded (0 is a placeholder, never attended)."""
        return [0] * self.padding + self.prompt[:-1]

    def finish_reason(self) -> str | None:
        """Why to stop now: "stop" (a stop sequence just ended), "length", or None."""
        if any(self.generated[-len(s) :] == list(s) for s in self.stop_sequences):
            return "stop"
        return "length" if len(self.generated) >= self.max_tokens else None


@dataclass
class Rows:
    """Requests that advance together: row i of every layer's batch cache is ``requests[i]``."""

    requests: list[Request]
    caches: list[BatchKVCache]
    next_tokens: mx.array | None = None  # computed one step ahead, not yet reported
    next_logprobs: mx.array | None = None

    def __len__(self) -> int:
        return len(self.requests)

    def filter(self, keep: list[int]) -> None:
        self.requests = [self.requests[i] for i in keep]
        for cache in self.caches:
            cache.filter(keep)
        if self.next_tokens is not None:
            index = mx.array(keep, dtype=mx.int32)
            self.next_tokens = self.next_tokens[index]
            self.next_logprobs = self.next_logprobs[index]

    def extend(self, other: Rows) -> None:
        self.requests += other.requests
        for cache, more in zip(self.caches, other.caches):
            cache.extend(more)
        self.next_tokens = mx.concatenate([self.next_tokens, other.next_tokens])
        self.next_logprobs = mx.concatenate([self.next_logprobs, other.next_logprobs])

    def extract_cache(self, row: int) -> list:
        return [cache.extract(row) for cache in self.caches]


@dataclass
class TokenResponse:
    """One generated token of one sequence; ``prompt_cache`` is set when it finishes."""

    uid: int
    token: int
    logprobs: mx.array
    finish_reason: str | None
    prompt_cache: list | None
    all_tokens: list[int] | None


@dataclass
class PromptResponse:
    """Prompt-processing progress of one sequence: ``progress = (processed, total)``."""

    uid: int
    progress: tuple[int, int]
    end_of_segment: bool
    end_of_prompt: bool


@dataclass
class BatchStats:
    """Work done while ``BatchGenerator.stats()`` was open (times in s, memory in GB)."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_steps: int = 0
    decode_time: float = 0.0
    wall_time: float = 0.0
    peak_memory: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        """Generated tokens per second of wall time outside prompt processing."""
        time_spent = self.wall_time - self.prompt_time
        return self.generation_tokens / time_spent if time_spent > 0 else 0.0


class BatchGenerator:
    """Continuous batching over one model (mlx-lm 0.32.2 API).

    ``stop_tokens`` is a list of stop sequences (token ids, or lists of token
    ids for multi-token stops). ``completion_batch_size`` bounds the running
    batch, ``prefill_batch_size`` the requests prefilled together.
    """

    def __init__(
        self,
        model,
        *,
        max_tokens: int = 128,
        stop_tokens=None,
        sampler: Callable | None = None,
        logits_processors: list | None = None,
        completion_batch_size: int = 32,
        prefill_batch_size: int = 8,
        prefill_step_size: int = 2048,
        max_kv_size: int | None = None,
        stream=None,
    ):
        check_positive("max_tokens", max_tokens)
        check_positive("completion_batch_size", completion_batch_size)
        check_positive("prefill_batch_size", prefill_batch_size)
        check_prefill_step_size(prefill_step_size)
        self.model = model
        self.max_tokens = max_tokens
        self.stop_tokens = as_stop_sequences(stop_tokens)
        self.sampler = sampler or greedy_sampler
        self.logits_processors = list(logits_processors or [])
        self.completion_batch_size = max(completion_batch_size, prefill_batch_size)
        self.prefill_batch_size = prefill_batch_size
        self.prefill_step_size = prefill_step_size
        self.max_kv_size = max_kv_size
        self._cache_kind = cache_kind(make_prompt_cache(model, max_kv_size))
        self._stream = stream or mx.default_stream(mx.default_device())
        self._queue: deque[Request] = deque()
        self._prefill: Rows | None = None  # requests being prefilled together
        self._prefilled = 0  # columns of their padded prompts already in the cache
        self._running: Rows | None = None  # requests being decoded
        self._next_uid = 0
        self._totals = BatchStats()

    # -- requests in ----------------------------------------------------------------------
    def insert(
        self,
        prompts,
        max_tokens=None,
        caches=None,
        all_tokens=None,
        samplers=None,
        logits_processors=None,
        stop_sequences=None,
    ) -> list[int]:
        """Queue prompts (lists of token ids); returns their uids.

        Per-prompt lists override the generator's defaults (a None entry keeps the
        default sampler / stop tokens). ``caches`` continue earlier generations;
        ``all_tokens`` are the tokens already in those caches (for processors).
        Everything is validated before anything is queued.
        """
        n = len(prompts)
        if isinstance(max_tokens, int):
            max_tokens = [max_tokens] * n
        options = {
            "max_tokens": max_tokens,
            "caches": caches,
            "all_tokens": all_tokens,
            "samplers": samplers,
            "logits_processors": logits_processors,
            "stop_sequences": stop_sequences,
        }
        for name, values in options.items():
            if values is not None and len(values) != n:
                raise ValueError(f"{name} must have one entry per prompt: {n}, got {len(values)}")
        max_tokens = max_tokens or [self.max_tokens] * n
        processors = logits_processors or [self.logits_processors] * n
        requests = []
        for i in range(n):
            prompt = as_prompt_array(prompts[i])
            check_prompt(self.model, prompt)
            check_positive(f"max_tokens[{i}]", max_tokens[i])
            cache = caches[i] if caches else None
            if cache is not None and cache_kind(cache) != self._cache_kind:
                raise ValueError(
                    f"caches[{i}] is {cache_kind(cache)}; this generator's model and "
                    f"max_kv_size={self.max_kv_size} need {self._cache_kind}"
                )
            stops = stop_sequences[i] if stop_sequences else None
            requests.append(
                Request(
                    uid=self._next_uid + i,
                    prompt=prompt.tolist(),
                    max_tokens=max_tokens[i],
                    sampler=(samplers[i] if samplers else None) or self.sampler,
                    processors=tuple(processors[i] or ()),
                    stop_sequences=self.stop_tokens if stops is None else as_stop_sequences(stops),
                    cache=cache or make_prompt_cache(self.model, self.max_kv_size),
                    tokens=list(all_tokens[i]) if all_tokens else [],
                )
            )
        self._queue.extend(requests)
        self._next_uid += n
        return [r.uid for r in requests]

    # -- the schedule -------------------------------------------------------------------
    def next(self) -> tuple[list[PromptResponse], list[TokenResponse]]:
        """One decode step for the running batch, then one prefill chunk if there is room."""
        with mx.stream(self._stream):
            generated = self._decode() if self._running else []
            room = self.completion_batch_size - (len(self._running) if self._running else 0)
            if self._prefill is None and self._queue and room > 0:
                self._start_prefill(min(self.prefill_batch_size, room, len(self._queue)))
            prompts = self._prefill_chunk() if self._prefill else []
            return prompts, generated

    def next_generated(self) -> list[TokenResponse]:
        """Call ``next()`` until it yields tokens; [] when there is nothing left to do."""
        while True:
            prompts, generated = self.next()
            if generated or not prompts:
                return generated

    def _start_prefill(self, n: int) -> None:
        """Take ``n`` queued requests; left-pad their prompts to a common width."""
        requests = [self._queue.popleft() for _ in range(n)]
        width = max(len(r.prompt) - 1 for r in requests)
        for request in requests:
            request.padding = width - (len(request.prompt) - 1)
        caches = [BatchKVCache.merge(layer) for layer in zip(*(r.cache for r in requests))]
        for cache in caches:
            cache.prepare([r.padding for r in requests])
        self._prefill, self._prefilled = Rows(requests, caches), 0

    def _prefill_chunk(self) -> list[PromptResponse]:
        """Feed the next ``prefill_step_size`` columns; after the last, start decoding."""
        rows, tic = self._prefill, time.perf_counter()
        width = len(rows.requests[0].prefill_columns())
        start = self._prefilled
        end = self._prefilled = min(start + self.prefill_step_size, width)
        if end > start:
            chunk = [r.prefill_columns()[start:end] for r in rows.requests]
            self.model(mx.array(chunk), cache=rows.caches)
            mx.eval([c.state for c in rows.caches])
            for request, columns in zip(rows.requests, chunk):
                real = columns[max(request.padding - start, 0) :]
                request.tokens += real
                self._totals.prompt_tokens += len(real)
        if end < width:
            responses = [
                PromptResponse(r.uid, (max(0, end - r.padding), len(r.prompt)), False, False)
                for r in rows.requests
            ]
        else:
            responses = self._start_decoding(rows)
            self._prefill = None
        self._totals.prompt_time += time.perf_counter() - tic
        return responses

    def _start_decoding(self, rows: Rows) -> list[PromptResponse]:
        """Feed each row's last prompt token and move the rows into the running batch."""
        last = mx.array([r.prompt[-1] for r in rows.requests])
        rows.next_tokens, rows.next_logprobs = self._step(rows, last)
        mx.async_eval(rows.next_tokens, rows.next_logprobs)
        for request in rows.requests:
            request.tokens.append(request.prompt[-1])
        self._totals.prompt_tokens += len(rows)
        if self._running is None:
            self._running = rows
        else:
            self._running.extend(rows)
        return [PromptResponse(r.uid, (len(r.prompt),) * 2, True, True) for r in rows.requests]

    def _decode(self) -> list[TokenResponse]:
        """Report the tokens computed last time, after queueing the next step."""
        rows, tic = self._running, time.perf_counter()
        tokens, logprobs = rows.next_tokens, rows.next_logprobs
        rows.next_tokens, rows.next_logprobs = self._step(rows, tokens)
        mx.async_eval(rows.next_tokens, rows.next_logprobs)
        responses, keep = [], []
        for i, (request, token) in enumerate(zip(rows.requests, tokens.tolist())):
            request.tokens.append(token)
            request.generated.append(token)
            reason = request.finish_reason()
            cache, history = (rows.extract_cache(i), request.tokens) if reason else (None, None)
            responses.append(TokenResponse(request.uid, token, logprobs[i], reason, cache, history))
            if reason is None:
                keep.append(i)
        self._running = keep_rows(rows, keep)
        self._totals.generation_tokens += len(responses)
        self._totals.generation_steps += 1
        self._totals.decode_time += time.perf_counter() - tic
        return responses

    def _step(self, rows: Rows, inputs: mx.array) -> tuple[mx.array, mx.array]:
        """Feed one token per row; return the next tokens and their log-probabilities.

        As in ``generate_step``: processors see every token so far (including
        ``inputs``), logprobs are the log-softmax after processors.
        """
        logits = self.model(inputs[:, None], cache=rows.caches)[:, -1, :]
        if any(r.processors for r in rows.requests):
            logits = mx.concatenate(
                [
                    apply_processors(r.processors, r.tokens, inputs[i : i + 1], logits[i : i + 1])
                    for i, r in enumerate(rows.requests)
                ]
            )
        logprobs = log_softmax(logits)
        samplers = [r.sampler for r in rows.requests]
        if all(s is samplers[0] for s in samplers):
            return samplers[0](logprobs), logprobs
        tokens = [s(logprobs[i : i + 1]) for i, s in enumerate(samplers)]
        return mx.concatenate(tokens), logprobs

    # -- requests out -------------------------------------------------------------------
    def remove(self, uids, return_prompt_caches: bool = False) -> dict[int, Any]:
        """Drop sequences wherever they are; optionally return ``{uid: (cache, tokens)}``."""
        uids, removed = set(uids), {}
        for request in self._queue:
            if request.uid in uids:
                removed[request.uid] = (request.cache, request.tokens)
        self._queue = deque(r for r in self._queue if r.uid not in uids)
        for name in ("_prefill", "_running"):
            rows = getattr(self, name)
            for i, request in enumerate(rows.requests if rows else []):
                if request.uid in uids:
                    removed[request.uid] = (rows.extract_cache(i), request.tokens)
            if rows:
                keep = [i for i, r in enumerate(rows.requests) if r.uid not in uids]
                setattr(self, name, keep_rows(rows, keep))
        return removed if return_prompt_caches else {}

    @contextlib.contextmanager
    def stats(self):
        """Yields a ``BatchStats`` that is filled in with the work done inside the block."""
        stats, start, tic = BatchStats(), BatchStats(**vars(self._totals)), time.perf_counter()
        try:
            yield stats
        finally:
            for f in fields(BatchStats):
                setattr(stats, f.name, getattr(self._totals, f.name) - getattr(start, f.name))
            stats.wall_time = time.perf_counter() - tic
            stats.peak_memory = mx.get_peak_memory() / 1e9

    def close(self) -> None:
        """Nothing to release (mlx-lm restores a Metal memory limit here)."""


@dataclass
class BatchResponse:
    """What ``batch_generate`` returns; lists are in prompt order."""

    texts: list[str]
    stats: BatchStats
    caches: list[list] | None
    token_ids: list[list[int]] | None = None
    logprobs: list[list[float]] | None = None


def batch_generate(
    model,
    tokenizer,
    prompts,
    prompt_caches: list | None = None,
    max_tokens: int | list[int] = 128,
    verbose: bool = False,
    return_prompt_caches: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    **kwargs,
) -> BatchResponse:
    """Generate for every prompt (token ids or strings), stopping at the tokenizer's EOS.

    ``kwargs`` go to ``BatchGenerator``. The stop token is not part of the text,
    token ids or logprobs, as in mlx-lm.
    """
    tokenizer = as_wrapper(tokenizer)
    prompts = [encode_prompt(tokenizer, p).tolist() for p in prompts]
    generator = BatchGenerator(model, stop_tokens=sorted(tokenizer.eos_token_ids), **kwargs)
    uids = generator.insert(prompts, max_tokens, caches=prompt_caches)
    tokens = {uid: [] for uid in uids}
    logprobs = {uid: [] for uid in uids}
    caches = {}
    with generator.stats() as stats:
        while responses := generator.next_generated():
            for r in responses:
                if r.finish_reason is not None:
                    caches[r.uid] = r.prompt_cache
                    if verbose:
                        print(f"[batch_generate] finished {len(caches)}/{len(uids)}", end="\r")
                if r.finish_reason != "stop":
                    tokens[r.uid].append(r.token)
                    if return_logprobs:
                        logprobs[r.uid].append(r.logprobs[r.token].item())
    if verbose:
        print(f"\n[batch_generate] {stats}")
    return BatchResponse(
        texts=[tokenizer.decode(tokens[uid]) for uid in uids],
        stats=stats,
        caches=[caches[uid] for uid in uids] if return_prompt_caches else None,
        token_ids=[tokens[uid] for uid in uids] if return_token_ids else None,
        logprobs=[logprobs[uid] for uid in uids] if return_logprobs else None,
    )


def keep_rows(rows: Rows, keep: list[int]) -> Rows | None:
    """``rows`` reduced to the rows ``keep``, or None if none is left."""
    if keep and len(keep) < len(rows):
        rows.filter(keep)
    return rows if keep else None


def apply_processors(processors, tokens: list[int], inputs: mx.array, logits: mx.array):
    """One row's logits through its processors; ``tokens + inputs`` is all it has seen."""
    if not processors:
        return logits
    seen = mx.concatenate([mx.array(tokens, dtype=inputs.dtype), inputs])
    for processor in processors:
        logits = processor(seen, logits)
    return logits


def as_stop_sequences(stop_tokens) -> list[tuple[int, ...]]:
    """Stop sequences as tuples: ``[2, [13, 14]]`` -> ``[(2,), (13, 14)]``; empty ones dropped."""
    sequences = [
        (s,) if isinstance(s, int) else tuple(int(t) for t in s) for s in (stop_tokens or [])
    ]
    return [s for s in sequences if s]


def cache_kind(cache: list) -> list[tuple]:
    """What a prompt cache is, layer by layer: class name and window settings."""
    if not isinstance(cache, (list, tuple)):
        return [(type(cache).__name__,)]
    return [
        (type(c).__name__, getattr(c, "max_size", None), getattr(c, "keep", None)) for c in cache
    ]


def check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
