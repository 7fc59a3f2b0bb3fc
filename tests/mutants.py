"""Deliberately broken engines: the reference adapter with one realistic bug each.

Every mutant names the catalogue case that must catch it (``caught_by``).
``tests/test_mutants.py`` runs those cases and asserts that each mutant fails
them, and that the unbroken ``Control`` (the same wrapper without a bug)
passes the whole catalogue. Usable from the CLI too, e.g.
``PYTHONPATH=tests lmconform check --engine mutants:TemperatureTwice --model dummy``.

The bugs sit where real engines have had them: in the decode loop, the
sampler, the logits processors, the batch scheduler, the KV cache, the
speculative acceptance rule, the embeddings path and the detokenizer.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import mlx.core as mx
import numpy as np
from sampler_mutants import SAMPLER_MUTANTS

import reference
from engines.adapters.base import event_from_logprobs
from engines.adapters.reference import ReferenceEngine
from engines.protocol import ProcessorSettings, SamplerSettings, TokenEvent


@cache
def _loaded(name: str):
    return reference.load(name)


class Control(ReferenceEngine):
    """The reference adapter, loaded once and shared; no bug. Mutants change one thing."""

    name = "control"
    caught_by: tuple[str, ...] = ()
    bug = "none"

    def load(self, source):
        return _loaded(source.name)

    def load_draft(self, name: str):
        return _loaded(name)[0]


class MaxTokensOffByOne(Control):
    name = "mutant-max-tokens"
    bug = "the decode loop runs while n <= max_tokens: one token too many"
    caught_by = ("stopping/max_tokens_exact",)

    def generate(self, request):
        yield from super().generate(replace(request, max_tokens=request.max_tokens + 1))


class EosIgnored(Control):
    name = "mutant-eos"
    bug = "end-of-sequence tokens do not stop generation"
    caught_by = ("stopping/stop_token", "stopping/second_eos")

    def end_tokens(self, extra):
        saved = set(self.tokenizer.eos_token_ids)
        outer = self

        class NoEnds:
            def __enter__(self):
                outer.tokenizer.eos_token_ids = set()

            def __exit__(self, *exc):
                outer.tokenizer.eos_token_ids = saved

        return NoEnds()


class LogitBiasIgnored(Control):
    name = "mutant-bias-ignored"
    bug = "logit_bias is accepted but never applied"
    caught_by = ("logit_bias/redirect",)

    def processors(self, p: ProcessorSettings):
        return super().processors(replace(p, logit_bias={}))


class LogitBiasWrongSign(Control):
    name = "mutant-bias-sign"
    bug = "logit_bias is subtracted instead of added"
    caught_by = ("logit_bias/redirect",)

    def processors(self, p: ProcessorSettings):
        return super().processors(replace(p, logit_bias={t: -b for t, b in p.logit_bias.items()}))


class PenaltyWindowIgnored(Control):
    name = "mutant-penalty-window"
    bug = "the repetition penalty looks at the whole context, not the last N tokens"
    caught_by = ("penalties/short_window",)

    def processors(self, p: ProcessorSettings):
        return super().processors(replace(p, repetition_context_size=100_000))


class TemperatureTwice(Control):
    name = "mutant-temperature"
    bug = "logits are divided by the temperature twice"
    caught_by = ("sampling/temperature",)

    def sampler(self, s: SamplerSettings):
        return super().sampler(replace(s, temp=s.temp * s.temp) if s.temp else s)


class TopKOffByOne(Control):
    name = "mutant-top-k"
    bug = "top-k keeps k+1 tokens (argpartition at kth=k instead of k-1)"
    caught_by = ("sampling/top_k",)

    def sampler(self, s: SamplerSettings):
        return super().sampler(replace(s, top_k=s.top_k + 1) if s.top_k else s)


class _BrokenSampler(Control):
    """Samples with one of ``sampler_mutants.py``'s broken samplers (greedy stays greedy)."""

    factory = "temperature twice"

    def sampler(self, s: SamplerSettings):
        if s.greedy:
            return super().sampler(s)
        broken = SAMPLER_MUTANTS[self.factory]
        return broken(s.temp, s.top_p, s.min_p, s.min_tokens_to_keep, s.top_k)


class TopPOneTooMany(_BrokenSampler):
    name = "mutant-top-p-many"
    bug = "top-p keeps one token more than the smallest set reaching top_p"
    caught_by = ("sampling/top_p",)
    factory = "top-p one token too many"


class TopPOneTooFew(_BrokenSampler):
    name = "mutant-top-p-few"
    bug = "top-p keeps one token fewer than the smallest set reaching top_p"
    caught_by = ("sampling/top_p",)
    factory = "top-p one token too few"


class MinPRelativeToOne(_BrokenSampler):
    name = "mutant-min-p"
    bug = "min-p compares probabilities with min_p itself, not min_p x the top probability"
    caught_by = ("sampling/min_p",)
    factory = "min-p relative to 1"


class SeedIgnored(Control):
    name = "mutant-seed"
    bug = "the request's seed is never passed to the random generator"
    caught_by = ("sampling/same_seed",)

    def generate(self, request):
        yield from super().generate(replace(request, sampler=replace(request.sampler, seed=None)))


class BatchRowsSwapped(Control):
    name = "mutant-batch-order"
    bug = "batch results come back with the first two rows swapped"
    caught_by = ("batch/equals_single",)

    def generate_batch(self, request):
        rows = super().generate_batch(request)
        if len(rows) >= 2:
            rows[0], rows[1] = rows[1], rows[0]
        return rows


class _RowByRowBatch(Control):
    """Batches as the buggy engines below do: each row left-padded to the longest prompt."""

    capabilities = Control.capabilities | {"batch"}

    def generate_batch(self, request):
        width = max(len(row.request.prompt) for row in request.rows)
        return [
            self.generate_padded(row.request, width - len(row.request.prompt))
            for row in request.rows
        ]

    def generate_padded(self, request, padding: int) -> list[TokenEvent]:
        raise NotImplementedError

    def events(self, request, prompt, kwargs) -> list[TokenEvent]:
        with self.end_tokens(request.stop_tokens):
            return list(self.stream_events(request, mx.array(prompt, dtype=mx.int32), kwargs))


class PaddingAttended(_RowByRowBatch):
    name = "mutant-padding"
    bug = "left-padding positions are not masked: short rows attend to pad tokens"
    caught_by = ("batch/equals_single",)

    def generate_padded(self, request, padding):
        pad = self.tokenizer.pad_token_id or 0
        # Unmasked padding is indistinguishable from pad tokens being part of the prompt.
        return self.events(
            request, [pad] * padding + list(request.prompt), self.generation_kwargs(request)
        )


class ShiftedDecodeCache:
    """A KV cache whose RoPE position jumps by ``shift`` once decoding starts."""

    def __init__(self, inner, prompt_length: int, shift: int):
        self._inner, self._prompt_length, self._shift = inner, prompt_length, shift

    @property
    def offset(self):
        offset = self._inner.offset
        return offset + self._shift if offset >= self._prompt_length else offset

    def __getattr__(self, name):
        return getattr(self._inner, name)


class RopeOffsetLeftPadded(_RowByRowBatch):
    name = "mutant-rope-offset"
    bug = (
        "prefill rotates each row from position 0, but decode steps use the batch-wide "
        "offset, which includes the row's left padding"
    )
    caught_by = ("batch/equals_single",)

    def generate_padded(self, request, padding):
        kwargs = self.generation_kwargs(request)
        layers = reference.make_prompt_cache(self.model)
        kwargs["prompt_cache"] = [
            ShiftedDecodeCache(c, len(request.prompt), padding) for c in layers
        ]
        return self.events(request, list(request.prompt), kwargs)


class SpeculativeAcceptsRejected(Control):
    name = "mutant-speculative"
    bug = "at the first mismatch the rejected draft token is emitted instead of the target's"
    caught_by = ("speculative/small_draft",)

    def generate(self, request):
        if request.draft is None:
            yield from super().generate(request)
            return
        draft_model = self.draft_model(request.draft.model)
        ends = set(self.tokenizer.eos_token_ids) | set(request.stop_tokens)
        tokens, events = list(request.prompt), []
        while True:
            proposal = []
            for _ in range(min(request.draft.num_draft_tokens, request.max_tokens - len(events))):
                logits = draft_model(mx.array([tokens + proposal]))[0, -1]
                proposal.append(int(mx.argmax(logits).item()))
            logits = self.model(mx.array([tokens + proposal]))[0, len(tokens) - 1 :].astype(
                mx.float32
            )
            logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            accepted = []
            for i, drafted in enumerate(proposal):
                accepted.append((drafted, logprobs[i], True))
                if int(np.argmax(logprobs[i])) != drafted:
                    break  # the bug: the rejected draft token was already accepted
            else:
                accepted.append(
                    (int(np.argmax(logprobs[len(proposal)])), logprobs[len(proposal)], False)
                )
            for token, vector, from_draft in accepted:
                tokens.append(token)
                done = token in ends or len(events) + 1 == request.max_tokens
                reason = ("stop" if token in ends else "length") if done else None
                events.append(
                    event_from_logprobs(
                        token,
                        vector,
                        self.vocab_size,
                        request.top_logprobs,
                        from_draft=from_draft,
                        finish_reason=reason,
                    )
                )
                if done:
                    self.attach_final_text(events, ends)
                    yield from events
                    return


class CacheNotTrimmed(Control):
    name = "mutant-cache-trim"
    bug = "a reused prompt cache is not trimmed back to the prefix it shares with the new prompt"
    caught_by = ("prompt_cache/diverge",)

    def trim_cache(self, cache, n):
        pass


class SlidingWindowWithoutSinks(Control):
    name = "mutant-window-sinks"
    bug = "the bounded KV cache forgets the 4 sink positions (a plain sliding window)"
    caught_by = ("sliding_window/decode_rotation",)

    def rotating_cache(self, max_kv_size):
        return [reference.RotatingKVCache(max_size=max_kv_size, keep=0) for _ in self.model.layers]


class EmbeddingsSkipLastPosition(Control):
    name = "mutant-embeddings"
    bug = "the embeddings path feeds all prompt positions but the last (an off-by-one slice)"
    caught_by = ("embeddings/from_tokens",)

    def generation_kwargs(self, request):
        kwargs = super().generation_kwargs(request)
        if "input_embeddings" in kwargs:
            kwargs["input_embeddings"] = kwargs["input_embeddings"][:-1]
        return kwargs


class DetokenizerSplitsUtf8(Control):
    name = "mutant-detokenizer"
    bug = "each token is decoded on its own, so a character spread over tokens is split"
    caught_by = ("text/utf8_pieces",)

    def stream_events(self, request, prompt, kwargs):
        for event in super().stream_events(request, prompt, kwargs):
            stop = event.finish_reason == "stop" and event.token in self.tokenizer.eos_token_ids
            yield replace(event, text="" if stop else self.tokenizer.decode([event.token]))


class StreamDropsFinalText(Control):
    name = "mutant-stream-flush"
    bug = "streaming never flushes the detokenizer: text held back at the end is lost"
    caught_by = ("stream/equals_nonstream",)

    def stream_events(self, request, prompt, kwargs):
        for event in super().stream_events(request, prompt, kwargs):
            yield replace(event, text="") if event.finish_reason is not None else event


class NoisyLogits(Control):
    """Not a mutant: a *correct* engine whose arithmetic differs from the reference's.

    Every logit moves by at most ``amplitude`` (deterministically: a fixed pattern
    per step), and at each step the two best logits move towards each other, as
    the worst rounding would move them: every reference margin under
    2 x ``amplitude`` flips. Chosen-token logprobs then differ from the reference's
    by at most 2 x ``amplitude`` = 1.8e-3, inside fp32's tolerance (2e-3), while
    margins under 1.8e-3 (fp32's near-tie epsilon is 1e-2) take the other branch.
    """

    name = "noisy-logits"
    amplitude = 9e-4

    def generation_kwargs(self, request):
        kwargs = super().generation_kwargs(request)
        kwargs["logits_processors"] = [*(kwargs.get("logits_processors") or []), self.noise]
        return kwargs

    def noise(self, tokens, logits):
        values = np.array(logits.astype(mx.float32))  # (1, vocab)
        step = int(tokens.size)
        pattern = np.sin(np.arange(values.shape[-1]) * 12.9898 + step * 78.233)
        values += self.amplitude * pattern
        best, second = np.argsort(-values[0])[:2]
        if values[0, best] - values[0, second] < 2 * self.amplitude:
            values[0, best] -= self.amplitude
            values[0, second] += self.amplitude
        return mx.array(values).astype(logits.dtype)


class NoisyThenPositionSlip(NoisyLogits):
    name = "mutant-noisy-position-slip"
    bug = (
        "a correct-but-noisy engine (NoisyLogits) whose RoPE position slips by one once "
        "the cache passes prompt + 7 positions (a reallocation that miscounts its offset)"
    )
    caught_by = ("resumption/near_tie",)
    slip_after = 7  # decoded tokens before the slip: after the case's near-tie at step 5

    def generation_kwargs(self, request):
        kwargs = super().generation_kwargs(request)
        if "prompt_cache" not in kwargs and request.prompt_embeddings is None:
            layers = reference.make_prompt_cache(self.model, max_kv_size=request.max_kv_size)
            start = len(request.prompt) + self.slip_after
            kwargs["prompt_cache"] = [ShiftedDecodeCache(c, start, 1) for c in layers]
        return kwargs


MUTANTS = [
    MaxTokensOffByOne,
    EosIgnored,
    LogitBiasIgnored,
    LogitBiasWrongSign,
    PenaltyWindowIgnored,
    TemperatureTwice,
    TopKOffByOne,
    TopPOneTooMany,
    TopPOneTooFew,
    MinPRelativeToOne,
    SeedIgnored,
    BatchRowsSwapped,
    PaddingAttended,
    RopeOffsetLeftPadded,
    SpeculativeAcceptsRejected,
    CacheNotTrimmed,
    SlidingWindowWithoutSinks,
    EmbeddingsSkipLastPosition,
    DetokenizerSplitsUtf8,
    StreamDropsFinalText,
]
