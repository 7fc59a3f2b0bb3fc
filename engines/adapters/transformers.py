"""Hugging Face transformers (PyTorch, CPU, float32) as an engine under test.

It loads the exported float folder (dummy models) or the original GGUF file
(``smollm2-135m``, dequantized by transformers), and uses transformers' own
generation features the way its users do: ``model.generate`` with
``sequence_bias``, ``repetition_penalty``, an assistant model for speculative
decoding, ``inputs_embeds``, left-padded batches and a streamer. Requests it
cannot express in its own terms are ``Unsupported`` rather than emulated:

- presence and frequency penalties (transformers has none);
- a repetition penalty window shorter than the context (transformers
  penalises every earlier token);
- prefill chunking, bounded KV caches, prompt-cache reuse.

Streamed greedy requests are generated in a worker thread and their events
yielded as the tokens are chosen (a streamer hands over each token, a last
logits processor the same processed scores ``output_scores`` would hold), so
time-to-token measurements mean something; sampled and drafted requests are
answered after ``generate`` returns (the draft model runs the same processors,
so scores could not be told apart).

Option ``threads`` (``--engine transformers:threads=2``): PyTorch's thread count,
set for each call (default ``$LMCONFORM_TORCH_THREADS`` or 1).

Logprobs are the log-softmax of ``output_scores`` (logits after processors)
in greedy mode. When sampling, transformers' scores already include the
temperature and the filters, so logprobs come from the raw ``output_logits``
instead; that matches the protocol's definition only without processors,
so sampling together with bias or penalties is ``Unsupported``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from engines.adapters.base import Engine, ends_with_any, event_from_logprobs
from engines.inputs import number
from engines.models import resolve
from engines.protocol import BatchRequest, GenerateRequest, ScoreRequest, TokenEvent, Unsupported


class StopOnSequences(StoppingCriteria):
    """Stops a row once its tokens end with one of the stop sequences."""

    def __init__(self, sequences: list[list[int]]):
        self.sequences = [list(s) for s in sequences if s]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        rows = [ends_with_any(row.tolist(), self.sequences) for row in input_ids]
        return torch.tensor(rows, dtype=torch.bool, device=input_ids.device)


class TokenCollector(BaseStreamer):
    """transformers' streaming hook: receives the prompt first, then each new token."""

    def __init__(self):
        self.received: list[list[int]] = []

    def put(self, value) -> None:
        self.received.append(value.reshape(-1).tolist())

    def end(self) -> None:
        pass

    @property
    def new_tokens(self) -> list[int]:
        return [t for chunk in self.received[1:] for t in chunk]


class CaptureScores(LogitsProcessor):
    """Placed last among the processors: keeps each step's processed scores, the very
    tensors ``generate`` would return as ``output_scores``."""

    def __init__(self):
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores)
        return scores


class StopWhenCancelled(StoppingCriteria):
    """Ends a generation whose events nobody reads any more."""

    def __init__(self):
        self.cancelled = threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancelled.is_set(), dtype=torch.bool)


class QueueStreamer(BaseStreamer):
    """transformers' streaming hook, handing each new token's ids to another thread."""

    def __init__(self):
        self.chunks: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.chunks.put(value.reshape(-1).tolist())
        self.prompt_seen = True

    def end(self) -> None:
        self.chunks.put(None)


class TransformersEngine(Engine):
    name = "transformers"
    model_formats = ("gguf", "hf-float-folder")
    option_checks: ClassVar[dict] = {"threads": number(int, 1, 4096)}
    capabilities = frozenset(
        {
            "greedy",
            "stream",
            "logprobs",
            "sampling",
            "logit_bias",
            "speculative",
            "input_embeddings",
            "batch",
            "score",
        }
    )

    def __init__(self, source, *, threads: int | str | None = None):
        super().__init__(source)
        # Measured on the 2-core machines here: one thread generates 7-10x faster than two
        # (small matrices; threads contend with each other and with MLX's).
        self.threads = int(threads or os.environ.get("LMCONFORM_TORCH_THREADS", "1"))
        torch.set_num_threads(self.threads)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # keep the suite's own progress readable
        self.model, self.tokenizer = self._load(source)
        self.end_ids = self._end_ids(self.model)
        self.pad_id = self.model.generation_config.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.end_ids)
        self._drafts: dict[str, object] = {}

    @staticmethod
    def _load(source):
        kwargs = {"dtype": torch.float32}
        if source.format == "gguf":
            folder, kwargs["gguf_file"] = str(source.path.parent), source.path.name
        else:
            folder = str(source.path)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
        tokenizer_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
        return model, AutoTokenizer.from_pretrained(folder, **tokenizer_kwargs)

    @staticmethod
    def _end_ids(model) -> set[int]:
        ids = model.generation_config.eos_token_id
        if ids is None:
            ids = model.config.eos_token_id
        return set(ids if isinstance(ids, list) else [ids])

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def describe(self) -> dict:
        return {
            "engine": self.name,
            "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "model": self.source.describe(),
        }

    # -- generation -----------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        self._check_expressible(request)
        ends = self.end_ids | set(request.stop_tokens)
        options = self._generate_options(request, ends)
        collector = TokenCollector() if request.stream else None
        if request.prompt_embeddings is not None:
            embeds = torch.tensor(np.asarray(request.prompt_embeddings, dtype=np.float32))[None]
            inputs = {
                "inputs_embeds": embeds,
                "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long),
            }
            prompt_length = 0  # with embeddings alone, generate returns only new tokens
        else:
            ids = torch.tensor([list(request.prompt)], dtype=torch.long)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            prompt_length = ids.shape[1]
        if request.sampler.seed is not None:
            torch.manual_seed(request.sampler.seed)
        torch.set_num_threads(self.threads)  # per call: the setting is process-wide
        if request.stream and request.sampler.greedy and request.draft is None:
            capture = CaptureScores()
            tokens = self._generate_in_thread(inputs, options, capture)
            yield from self._events(tokens, capture.scores, 0, request, ends, streamed=True)
            return
        with torch.no_grad():
            out = self.model.generate(**inputs, **options, streamer=collector)
        tokens = out.sequences[0, prompt_length:].tolist()
        if collector is not None:
            tokens = collector.new_tokens
        scores = out.scores if request.sampler.greedy else out.logits
        yield from self._events(tokens, scores, 0, request, ends, streamed=collector is not None)

    def generate_batch(self, request: BatchRequest) -> list[list[TokenEvent]]:
        rows = [row.request for row in request.rows]
        first = rows[0]
        for r in rows:
            self._check_expressible(r)
            same = (r.sampler, r.processors, r.stop_tokens, r.stop_sequences) == (
                first.sampler,
                first.processors,
                first.stop_tokens,
                first.stop_sequences,
            )
            if not same or r.prompt_embeddings is not None or r.draft is not None:
                raise Unsupported("batch rows with different settings, embeddings or drafts")
        # Static batching: every row starts together (insert_at is a scheduling hint only).
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        ends = self.end_ids | set(first.stop_tokens)
        request_all = GenerateRequest(
            prompt=[],
            max_tokens=max(r.max_tokens for r in rows),
            sampler=first.sampler,
            processors=first.processors,
            stop_tokens=first.stop_tokens,
            stop_sequences=first.stop_sequences,
        )
        options = self._generate_options(request_all, ends)
        if first.sampler.seed is not None:
            torch.manual_seed(first.sampler.seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **options)
        results = []
        for i, r in enumerate(rows):
            tokens = out.sequences[i, width:].tolist()
            scores = out.scores if first.sampler.greedy else out.logits
            results.append(list(self._events(tokens, scores, i, r, ends, streamed=False)))
        return results

    def score(self, request: ScoreRequest) -> list[TokenEvent]:
        ids = torch.tensor([list(request.prompt) + list(request.continuation)], dtype=torch.long)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1).numpy()
        start = len(request.prompt) - 1
        return [
            event_from_logprobs(t, logprobs[start + i], self.vocab_size, request.top_logprobs)
            for i, t in enumerate(request.continuation)
        ]

    # -- pieces -------------------------------------------------------------------------

    def _check_expressible(self, request: GenerateRequest) -> None:
        p = request.processors
        if p.presence_penalty not in (None, 0) or p.frequency_penalty not in (None, 0):
            raise Unsupported("transformers has no presence or frequency penalty")
        context = len(request.prompt) + request.max_tokens
        if p.repetition_penalty not in (None, 0) and p.repetition_context_size < context:
            raise Unsupported(
                f"transformers' repetition_penalty covers the whole context ({context} tokens), "
                f"not the last {p.repetition_context_size}"
            )
        if request.prefill_step_size is not None or request.max_kv_size is not None:
            raise Unsupported("prefill chunking and bounded KV caches")
        if request.cache_key is not None:
            raise Unsupported("prompt-cache reuse")
        if request.draft is not None and not request.sampler.greedy:
            raise Unsupported("assisted generation with sampling")
        if p.active and not request.sampler.greedy:
            raise Unsupported("logprobs of sampled tokens under logit bias or penalties")

    def _generate_options(self, request: GenerateRequest, ends: set[int]) -> dict:
        s, p = request.sampler, request.processors
        options = {
            "max_new_tokens": request.max_tokens,
            "min_new_tokens": 0,
            "eos_token_id": sorted(ends),
            "pad_token_id": self.pad_id,
            "return_dict_in_generate": True,
            "output_scores": True,
            "output_logits": not s.greedy,
            "do_sample": not s.greedy,
        }
        if not s.greedy:
            options.update(
                temperature=s.temp,
                top_k=max(0, s.top_k),
                top_p=s.top_p if 0 < s.top_p < 1 else 1.0,
                min_p=s.min_p if s.min_p > 0 else None,
            )
            if s.min_tokens_to_keep != 1:
                raise Unsupported("min_tokens_to_keep (transformers keeps it fixed at 1)")
        if p.logit_bias:
            options["sequence_bias"] = {(int(t),): float(b) for t, b in p.logit_bias.items()}
        if p.repetition_penalty not in (None, 0):
            options["repetition_penalty"] = p.repetition_penalty
        if request.stop_sequences:
            options["stopping_criteria"] = StoppingCriteriaList(
                [StopOnSequences(request.stop_sequences)]
            )
        if request.draft is not None:
            options["assistant_model"] = self._draft(request.draft.model)
            options["num_assistant_tokens"] = request.draft.num_draft_tokens
            options["num_assistant_tokens_schedule"] = "constant"
            options["assistant_confidence_threshold"] = 0.0
        return options

    def _draft(self, name: str):
        if name == "self":
            return self.model
        if name not in self._drafts:
            source = resolve(name, self.model_formats)
            self._drafts[name] = self._load(source)[0]
        return self._drafts[name]

    def _generate_in_thread(self, inputs, options, capture: CaptureScores) -> Iterator[int]:
        """``generate`` in a worker thread; yields each new token id as it is chosen."""
        streamer, cancel = QueueStreamer(), StopWhenCancelled()
        options = dict(options)
        criteria = StoppingCriteriaList([*options.pop("stopping_criteria", []), cancel])
        failures: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():  # grad mode is per thread
                    self.model.generate(
                        **inputs,
                        **options,
                        streamer=streamer,
                        logits_processor=LogitsProcessorList([capture]),
                        stopping_criteria=criteria,
                    )
            except BaseException as error:  # noqa: BLE001 - raised again in the reader
                failures.append(error)
                streamer.end()

        worker = threading.Thread(target=work, name="transformers-generate", daemon=True)
        worker.start()
        try:
            while (chunk := streamer.chunks.get()) is not None:
                yield from chunk
        finally:
            cancel.cancelled.set()
            worker.join()
        if failures:
            raise failures[0]

    def _events(self, tokens, scores, row, request, ends, streamed: bool) -> Iterator[TokenEvent]:
        """Events for one row of a ``generate`` output, cut at its own end, one per token of
        ``tokens`` as it comes (which may be an iterator fed while generating).

        ``scores``: per step, the logits whose log-softmax is the protocol's logprob
        (processed scores when greedy, raw logits when sampling without processors).
        """
        cut: list[int] = []
        emitted = ""
        for step, token in enumerate(tokens):
            cut.append(int(token))
            stopped = cut[-1] in ends or ends_with_any(cut, request.stop_sequences)
            last = stopped or len(cut) == request.max_tokens
            finish = ("stop" if stopped else "length") if last else None
            # Text: streaming, the stable part of the decoded prefix; otherwise all at the end.
            if streamed or last:
                shown = cut[: step + 1]
                if last and finish == "stop" and token in ends:
                    shown = shown[:-1]
                text = self.tokenizer.decode(shown)
                if not last:
                    text = text.rstrip("\ufffd")
                piece = text[len(emitted) :] if text.startswith(emitted) else ""
                emitted += piece
            else:
                piece = ""
            logprobs = torch.log_softmax(scores[step][row].float(), dim=-1).numpy()
            yield event_from_logprobs(
                token,
                logprobs,
                self.vocab_size,
                request.top_logprobs,
                text=piece,
                finish_reason=finish,
            )
            if last:
                return
