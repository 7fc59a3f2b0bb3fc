"""Deliberately broken engines: the reference adapter with one realistic bug each.

Every mutant names the catalogue case that must catch it (``caught_by``).
``tests/test_mutants.py`` runs those cases and asserts that each mutant fails
them, and that the unbroken ``Control`` (the same wrapper without a bug)
passes the whole catalogue. Usable from the CLI too, e.g.
``PYTHONPATH=tests lmconform check --engine mutants:TemperatureTwice --model dummy``.

The bugs sit where real engines have had them: in the decode loop, the
sampler, the logits processors, the batch scheduler, the KV cache, the
speculative acceptance rule, the embeddings path and the detokenizer. The
mutants after ``StreamDropsFinalText`` each model a kind of bug reported on
the issue trackers of llama.cpp, vLLM, SGLang, mlx-lm, transformers and the
engines built on them (cited in a comment above each); most sit where two
features meet, and are caught by the generated ``combo/`` cases or by a case at
the edge of a rule (the last allowed step, a stop token inside a draft block).
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from functools import cache
from pathlib import Path
from unittest import mock

import mlx.core as mx
import numpy as np
from sampler_mutants import SAMPLER_MUTANTS

import reference
from engines.adapters import mlx_style
from engines.adapters.base import event_from_logprobs
from engines.adapters.cmd import CmdEngine
from engines.adapters.reference import ReferenceEngine
from engines.protocol import (
    BatchRequest,
    ProcessorSettings,
    SamplerSettings,
    ScoreRequest,
    TokenEvent,
)


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


# -- modelled on reported bugs ---------------------------------------------------------------


class CachedPrefixNotPenalized(Control):
    # llama.cpp #8971 "uncached prompt is not used for penalty"; lmstudio mlx-engine #147
    # (penalties over a reused prompt cache saw only the newly processed tokens).
    name = "mutant-cache-penalty-history"
    bug = "with a reused prompt cache, penalties count only the part of the prompt fed anew"
    caught_by = ("combo/prompt_cache+penalties",)

    def generate(self, request):
        with mock.patch.object(mlx_style, "with_history", lambda processor, held: processor):
            yield from super().generate(request)


class BatchWindowWithoutSinks(Control):
    # mlx-lm #439 (padded tokens kept in the batched RotatingKVCache), #487 and #738 (the
    # batched sliding-window cache, "Fix sliding window batching"): a window that is right
    # for one sequence and wrong in a batch.
    name = "mutant-batch-window"
    bug = "in a batch, the bounded KV cache keeps no sink positions (a plain sliding window)"
    caught_by = ("combo/batch+sliding_window",)

    def generate_batch(self, request):
        if all(row.request.max_kv_size is None for row in request.rows):
            return super().generate_batch(request)
        plain_window = SlidingWindowWithoutSinks(self.source)
        return [list(plain_window.generate(row.request)) for row in request.rows]


class BatchStopSequencesIgnored(Control):
    # SGLang #31599 and vLLM's stop-checker fixes: stop conditions evaluated for the batch's
    # schedule rather than per request; here a row's own stop sequences are dropped.
    name = "mutant-batch-stop-sequences"
    bug = "batch rows ignore their own stop sequences and run to max_tokens"
    caught_by = ("combo/batch+stop_sequence",)

    def generate_batch(self, request):
        rows = [replace(r, request=replace(r.request, stop_sequences=[])) for r in request.rows]
        return super().generate_batch(BatchRequest(rows))


class StopSequenceWithinOneToken(Control):
    # mlx-knife #68 "a stop sequence split across two tokens is not seen in a stream";
    # SwiftLM #126 (the stop check only looked at the chunk that completes it).
    name = "mutant-stop-sequence-one-token"
    bug = "a stop sequence is only recognised when one token completes all of it"
    caught_by = ("stopping/stop_sequence", "combo/streaming+stop_sequence")

    def generate(self, request):
        single = [s for s in request.stop_sequences if len(s) == 1]
        yield from super().generate(replace(request, stop_sequences=single))


class SpeculativeEmitsPastStop(Control):
    # koboldcpp #1276 "continues outputting beyond EOS when speculative decoding is used";
    # transformers #47912 "assisted decoding generates past an EOS accepted mid-block".
    name = "mutant-speculative-past-stop"
    bug = "a stop token accepted inside a draft block does not stop: the whole block is emitted"
    caught_by = ("speculative/stop_mid_block",)

    def generate(self, request):
        if request.draft is None or not request.stop_tokens:
            yield from super().generate(request)
            return
        stops = set(request.stop_tokens) | set(self.tokenizer.eos_token_ids)
        events = list(super().generate(replace(request, stop_tokens=[])))
        for i, event in enumerate(events):
            if event.token in stops:
                # A block ends with the target's own token (the first not from the draft).
                end = next((j for j in range(i, len(events)) if not events[j].from_draft), i)
                cut = [replace(e, finish_reason=None) for e in events[: end + 1]]
                cut[-1] = replace(cut[-1], finish_reason="stop")
                yield from cut
                return
        yield from events


class SpeculativeOvershootsMaxTokens(Control):
    # SGLang #31599 "speculative decode: max_new_tokens cap ... leaks post-stop tokens" (a
    # whole accepted block is appended before the length cap is checked).
    name = "mutant-speculative-max-tokens"
    bug = "speculative decoding finishes its last block of drafts past max_tokens"
    caught_by = ("speculative/last_allowed_step",)

    def generate(self, request):
        if request.draft is None:
            yield from super().generate(request)
            return
        block = request.draft.num_draft_tokens + 1
        rounded = math.ceil(request.max_tokens / block) * block
        yield from super().generate(replace(request, max_tokens=rounded))


class LogprobsBeforeBias(Control):
    # OpenAI's API stopped applying logit_bias to reported logprobs (2024), and engines
    # differ on it; llama-cpp-python #349 "Logprobs incorrectly computed from logits".
    name = "mutant-logprobs-before-bias"
    bug = "reported logprobs are the model's raw ones, before logit bias and penalties"
    caught_by = ("logit_bias/redirect",)

    def generate(self, request):
        events = list(super().generate(request))
        if not request.processors.active or not events:
            yield from events
            return
        tokens = [e.token for e in events]
        raw = self.score(ScoreRequest(list(request.prompt), tokens, request.top_logprobs))
        for event, plain in zip(events, raw):
            yield replace(event, logprob=plain.logprob, top_logprobs=plain.top_logprobs)


class PenaltyIgnoresPrompt(Control):
    # FastDeploy #2954 "support prompt repetition_penalty" (the penalty saw generated tokens
    # only); vllm-gaudi #769 (prompt_token_ids missing from penalty metadata in decode).
    name = "mutant-penalty-prompt"
    bug = "repetition penalties count generated tokens only, not the prompt's"
    caught_by = ("penalties/repetition",)

    def generation_kwargs(self, request):
        kwargs = super().generation_kwargs(request)
        skip = len(request.prompt)
        if kwargs.get("logits_processors"):
            kwargs["logits_processors"] = [
                lambda tokens, logits, p=p: p(tokens[skip:], logits)
                for p in kwargs["logits_processors"]
            ]
        return kwargs


class BatchRowsShareFirstRowsProcessors(Control):
    # SGLang #3187 review ("a single request's logit_bias would not affect other
    # requests?") and vLLM #13079 (per-request logit bias in the batched v1 sampler).
    name = "mutant-batch-shared-processors"
    bug = "every batch row gets the first row's logit bias and penalties"
    caught_by = ("batch/per_row_settings",)

    def generate_batch(self, request):
        first = request.rows[0].request.processors
        rows = [replace(r, request=replace(r.request, processors=first)) for r in request.rows]
        return super().generate_batch(BatchRequest(rows))


class BatchPenaltySeesOtherRows(_RowByRowBatch):
    # vllm-gaudi #769 (penalty token ids cached across a changing batch composition) and
    # mlx-lm's batched processors: a row's penalty counts tokens of the other rows' prompts.
    name = "mutant-batch-penalty-rows"
    bug = "in a batch, a row's repetition penalty also counts the other rows' prompt tokens"
    caught_by = ("combo/batch+penalties",)

    def generate_batch(self, request):
        everyone = [t for row in request.rows for t in row.request.prompt]
        answers = []
        for row in request.rows:
            kwargs = self.generation_kwargs(row.request)
            held = mx.array(everyone, dtype=mx.int32)
            kwargs["logits_processors"] = [
                mlx_style.with_history(p, held) for p in kwargs.get("logits_processors") or []
            ]
            answers.append(self.events(row.request, list(row.request.prompt), kwargs))
        return answers


class CacheLosesLastCachedPosition(Control):
    # Whallm #5 "prompt cache reuse corrupts generation when only 1 token remains to
    # prefill"; mlx-vlm #1715 (prefix reuse slices the cache by the wrong length).
    name = "mutant-cache-last-position"
    bug = "a reused prompt cache is trimmed one position too far before the rest is fed"
    caught_by = ("prompt_cache/continuation",)

    def reuse_cache(self, request):
        rest, cache = super().reuse_cache(request)
        if rest.size < len(request.prompt):  # a cached prefix is being reused
            self.trim_cache(cache, 1)
        return rest, cache


class WindowOneTooWide(Control):
    # mlx-lm #390 "fix window attention mask" (the mask had one too many values: each
    # query saw window + 1 positions).
    name = "mutant-window-width"
    bug = "the bounded KV cache holds max_kv_size + 1 positions"
    caught_by = ("sliding_window/decode_rotation",)

    def rotating_cache(self, max_kv_size):
        return super().rotating_cache(max_kv_size + 1)


class StopSequenceTextWithheld(Control):
    # vLLM #3574 and SwiftLM #132: streamed text held back or trimmed around a stop string
    # (OpenAI trims it; this protocol reports the sequence's tokens and their text).
    name = "mutant-stop-sequence-text"
    bug = "the streamed text leaves out what the token completing a stop sequence adds"
    caught_by = ("combo/streaming+stop_sequence",)

    def generate(self, request):
        for event in super().generate(request):
            done = event.finish_reason == "stop" and event.token not in request.stop_tokens
            yield replace(event, text="") if done and request.stop_sequences else event


class StopTokenEmitsText(Control):
    # koboldcpp #1031 (text next to an end-of-turn token lost or leaked when streaming):
    # here a request's stop token is decoded into the text like any other token.
    name = "mutant-stop-token-text"
    bug = "a request's stop token contributes its text (only the model's own EOS is silent)"
    caught_by = ("text/stop_token_silent",)

    def generate(self, request):
        for event in super().generate(request):
            if event.finish_reason == "stop" and event.token in request.stop_tokens:
                event = replace(event, text=event.text + self.tokenizer.decode([event.token]))
            yield event


class LengthWinsOverEndToken(Control):
    # SGLang #31599: the max_new_tokens cap checked before the stop conditions reports
    # FINISH_LENGTH where a stop token landed within the budget.
    name = "mutant-finish-length-first"
    bug = "when the last allowed token is an end token, finish_reason says 'length'"
    caught_by = ("stopping/end_token_at_last_step",)

    def generate(self, request):
        events = list(super().generate(request))
        if len(events) == request.max_tokens and events[-1].finish_reason == "stop":
            events[-1] = replace(events[-1], finish_reason="length")
        yield from events


class FromDraftNeverSet(Control):
    # SGLang #39826 (speculative decoding's accounting of accepted tokens is wrong): the
    # engine drafts, but reports every token as the target's own.
    name = "mutant-from-draft"
    bug = "from_draft is reported false for every token, drafted or not"
    caught_by = ("speculative/self_draft",)

    def generate(self, request):
        for event in super().generate(request):
            yield replace(event, from_draft=False)


class LogprobsUnnormalized(Control):
    # llama-cpp-python #349 "Logprobs incorrectly computed from logits": here logits minus
    # the largest logit, a log-softmax without its log-sum-exp.
    name = "mutant-logprobs-unnormalized"
    bug = "logprobs are logits minus the top logit (not normalised)"
    caught_by = ("greedy/hello",)

    def generate(self, request):
        for event in super().generate(request):
            if not event.top_logprobs:
                yield event
                continue
            top = event.top_logprobs[0][1]
            yield replace(
                event,
                logprob=event.logprob - top,
                top_logprobs=[(t, lp - top) for t, lp in event.top_logprobs],
            )


class ScoreSamePosition(Control):
    # maxtext #2103 "prompt logprobs misaligned: left shift needed": token t scored with
    # the logits of position t instead of t - 1.
    name = "mutant-score-shift"
    bug = "teacher-forced scores use each token's own position's logits (not the previous one's)"
    caught_by = ("score/teacher_forced",)

    def score(self, request):
        tokens = list(request.prompt) + list(request.continuation)
        logits = self.model(mx.array(tokens)[None])[0].astype(mx.float32)
        logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        start = len(request.prompt)  # the bug: should be len(prompt) - 1
        return [
            event_from_logprobs(t, logprobs[start + i], self.vocab_size, request.top_logprobs)
            for i, t in enumerate(request.continuation)
        ]


class OneTokenSequenceAsStopToken(Control):
    # mistral.rs #109 (review: a stop given as token ids was taken for stop tokens, not a
    # sequence): a one-token stop sequence is handed to the stop-token check, so its token
    # stops generation but is treated as silent.
    name = "mutant-one-token-sequence"
    bug = "a stop sequence of one token is handled as a stop token: its text is withheld"
    caught_by = ("stopping/one_token_sequence",)

    def generate(self, request):
        single = [s[0] for s in request.stop_sequences if len(s) == 1]
        longer = [s for s in request.stop_sequences if len(s) > 1]
        yield from super().generate(
            replace(request, stop_tokens=[*request.stop_tokens, *single], stop_sequences=longer)
        )


def naive_stop(tokens: list[int], sequences: list[list[int]]) -> int | None:
    """Where a matcher that tracks one matched length per sequence, and restarts from the
    current token on a mismatch, first sees a sequence complete (None: never)."""
    matched = [0] * len(sequences)
    for i, token in enumerate(tokens):
        for j, seq in enumerate(sequences):
            if token == seq[matched[j]]:
                matched[j] += 1
            else:
                matched[j] = 1 if token == seq[0] else 0
            if matched[j] == len(seq):
                return i
    return None


class StopSequenceMatcherResets(Control):
    # litgpt #2302 / #2303 "Fix overlapping stop sequence matching": the matcher "tracked
    # only one prefix length and reset it ... on every mismatch", so a token ending one
    # partial match while starting the next was lost and the sequence never seen.
    name = "mutant-stop-sequence-reset"
    bug = "the stop-sequence matcher restarts on a mismatch and misses self-overlapping matches"
    caught_by = ("stopping/overlapping_sequence",)

    def generate(self, request):
        if not request.stop_sequences:
            yield from super().generate(request)
            return
        # Streamed, so that every event carries its own text when the answer is cut.
        events = list(super().generate(replace(request, stop_sequences=[], stream=True)))
        end = naive_stop([e.token for e in events], request.stop_sequences)
        if end is None or end == len(events) - 1:
            yield from events
            return
        yield from events[:end]
        yield replace(events[end], finish_reason="stop")


class EndTokenEmitsText(Control):
    # mlx-lm's and llama.cpp's detokenizers decode special tokens on request
    # (skip_special_tokens / `special`): an engine that keeps them on streams the model's
    # own end token as "<|endoftext|>".
    name = "mutant-end-token-text"
    bug = "the model's own end token is decoded into the text ('<|endoftext|>')"
    caught_by = ("stream/end_token_silent",)

    def generate(self, request):
        ends = self.tokenizer.eos_token_ids
        for event in super().generate(request):
            if event.finish_reason == "stop" and event.token in ends:
                event = replace(event, text=event.text + self.tokenizer.decode([event.token]))
            yield event


class BatchStopTokensShared(Control):
    # mlx-lm's BatchGenerator takes one `stop_tokens` for the whole batch; an engine that
    # passes the first row's there stops every row at that row's stop tokens.
    name = "mutant-batch-stop-tokens"
    bug = "every batch row stops at the first row's stop tokens, not its own"
    caught_by = ("combo/batch+stop_token",)

    def generate_batch(self, request):
        first = request.rows[0].request.stop_tokens
        rows = [replace(r, request=replace(r.request, stop_tokens=first)) for r in request.rows]
        return super().generate_batch(BatchRequest(rows))


class BatchPrefillTokenUncounted(Control):
    # A batch scheduler that checks the length limit after each decode step only: the first
    # token, which comes from the prefill, is never checked, so a row asking for one token
    # gets a second one (with max_tokens >= 2 the check after a decode step is exact).
    name = "mutant-batch-max-tokens-one"
    bug = "a batch row with max_tokens 1 gets 2 tokens (the prefill's token is not checked)"
    caught_by = ("combo/batch+max_tokens_one",)

    def generate_batch(self, request):
        rows = [
            replace(r, request=replace(r.request, max_tokens=2)) if r.request.max_tokens == 1 else r
            for r in request.rows
        ]
        return super().generate_batch(BatchRequest(rows))


class TopLogprobsCapped(Control):
    # lmdeploy #1548 "top_logprobs = 5 ... The number of top logprobs is 4"; Ollama #18590
    # and vLLM #5299 (a server-side cap on how many are returned).
    name = "mutant-top-logprobs-cap"
    bug = "top_logprobs lists are silently cut to 10 entries, however many were asked for"
    caught_by = ("combo/streaming+top_logprobs",)
    cap = 10

    def generate(self, request):
        yield from super().generate(
            replace(request, top_logprobs=min(request.top_logprobs, self.cap))
        )

    def generate_batch(self, request):
        rows = [
            replace(
                r, request=replace(r.request, top_logprobs=min(r.request.top_logprobs, self.cap))
            )
            for r in request.rows
        ]
        return super().generate_batch(BatchRequest(rows))


class BatchSeedsIgnored(Control):
    # vLLM #51226 "seed is ignored on CPU when another request in the batch has no seed":
    # a batch whose generator is not seeded from its rows' seeds is not repeatable.
    name = "mutant-batch-seed"
    bug = "a batch samples from an unseeded generator: its rows' seeds are ignored"
    caught_by = ("combo/batch+sampling",)

    def generate_batch(self, request):
        rows = [
            replace(r, request=replace(r.request, sampler=replace(r.request.sampler, seed=None)))
            for r in request.rows
        ]
        return super().generate_batch(BatchRequest(rows))


class NonStreamingSeedOffset(Control):
    # Two code paths that seed differently: here the non-streaming one derives its
    # generator from seed + 1, so the same seeded request gives other tokens unstreamed.
    name = "mutant-nonstream-seed"
    bug = "a non-streamed request seeds its generator with seed + 1"
    caught_by = ("combo/streaming+sampling",)

    def generate(self, request):
        seed = request.sampler.seed
        if not request.stream and seed is not None:
            request = replace(request, sampler=replace(request.sampler, seed=seed + 1))
        yield from super().generate(request)


class CachedRequestNotReseeded(Control):
    # llama.cpp #1550 "--seed is ignored when loading session" (and #1439); cascadia #20:
    # a reused pipeline "keeps advancing the per-request RNG" instead of reseeding.
    name = "mutant-cache-seed"
    bug = "a request that reuses a cached prompt is not reseeded: its seed is ignored"
    caught_by = ("combo/prompt_cache+sampling",)

    def generate(self, request):
        if request.cache_key in self._caches:
            request = replace(request, sampler=replace(request.sampler, seed=None))
        yield from super().generate(request)


class TopKSkippedWithProcessors(Control):
    # Samplers with a separate path for requests with logits processors: here that path
    # draws from the whole tempered distribution, without the top-k filter.
    name = "mutant-top-k-processors"
    bug = "with a logit bias or penalties active, the top-k filter is skipped"
    caught_by = ("combo/penalties+sampling",)

    def generation_kwargs(self, request):
        kwargs = super().generation_kwargs(request)
        if request.processors.active and not request.sampler.greedy:
            kwargs["sampler"] = self.sampler(replace(request.sampler, top_k=0))
        return kwargs


class MinTokensToKeepIgnored(Control):
    # oobabooga textgen #4449 (min-p: "the min_tokens_to_keep is not being properly followed
    # here"); llama.cpp #3841's review of min_keep in the min-p sampler.
    name = "mutant-min-tokens-to-keep"
    bug = "min-p ignores min_tokens_to_keep: it may keep a single token"
    caught_by = ("sampling/min_tokens_to_keep",)

    def sampler(self, s: SamplerSettings):
        return super().sampler(replace(s, min_tokens_to_keep=1))


class InvalidRequestsServed(Control):
    # transformers #24453 ("min_tokens_to_keep has to be >= 1": invalid values ran into
    # numerical exceptions instead of being refused). The adapter checks nothing; what the
    # reference's own generate refuses (max_tokens 0, a prompt outside the vocabulary, top_p
    # 1.5) is still refused, the rest is served.
    name = "mutant-no-validation"
    bug = "a stop token outside the vocabulary, an empty stop sequence, top_logprobs -1 are served"
    caught_by = ("validation/invalid_requests",)

    def refuse_invalid(self, request) -> None:
        pass


class UnknownFieldsIgnored(
    CmdEngine.bind(f"{sys.executable} {Path(__file__).with_name('lenient_jsonl_engine.py')}")
):
    # OpenAI-compatible servers that drop unknown parameters (a misspelt "temperature"
    # then silently means greedy decoding): llama.cpp's server, Ollama's options.
    name = "mutant-unknown-field"
    bug = "an engine over JSON lines drops a field the protocol does not define"
    caught_by = ("validation/invalid_requests",)


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
    # modelled on reported bugs
    CachedPrefixNotPenalized,
    BatchWindowWithoutSinks,
    BatchStopSequencesIgnored,
    StopSequenceWithinOneToken,
    SpeculativeEmitsPastStop,
    SpeculativeOvershootsMaxTokens,
    LogprobsBeforeBias,
    PenaltyIgnoresPrompt,
    BatchRowsShareFirstRowsProcessors,
    BatchPenaltySeesOtherRows,
    CacheLosesLastCachedPosition,
    WindowOneTooWide,
    StopSequenceTextWithheld,
    StopTokenEmitsText,
    LengthWinsOverEndToken,
    FromDraftNeverSet,
    LogprobsUnnormalized,
    ScoreSamePosition,
    NoisyThenPositionSlip,
    # rule edges and the combination variants
    OneTokenSequenceAsStopToken,
    StopSequenceMatcherResets,
    EndTokenEmitsText,
    BatchStopTokensShared,
    BatchPrefillTokenUncounted,
    TopLogprobsCapped,
    BatchSeedsIgnored,
    NonStreamingSeedOffset,
    CachedRequestNotReseeded,
    TopKSkippedWithProcessors,
    MinTokensToKeepIgnored,
    InvalidRequestsServed,
    UnknownFieldsIgnored,
]
