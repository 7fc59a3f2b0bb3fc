"""llama.cpp, through llama-cpp-python (pinned 0.3.36), as an engine under test.

GGUF-native: it loads the very GGUF file the reference loads (``smollm2-135m``,
Q4_1). Models without a GGUF file (the dummy family) are unavailable to it.

It decodes token by token on llama.cpp's own KV cache (``Llama.eval``, one call
per generated token, so each event is yielded as soon as its token is chosen),
keeps the logits of every evaluated position (``logits_all=True``) and chooses
tokens with llama.cpp's own samplers (``llama_sampler_*``) applied to them:

1. processing: llama.cpp's logit-bias sampler, then its penalties sampler
   (repetition, then frequency and presence: the protocol's order). The penalties
   sampler counts the tokens it has accepted; it accepts the prompt first, as
   llama.cpp's server does, so its window covers prompt and output. It has one
   window for all three penalties: different windows are ``Unsupported``.
2. logprobs: the log-softmax of the logits step 1 leaves (the protocol's definition).
3. choice: llama.cpp's greedy sampler, or llama-cpp-python's sampling chain: top-k,
   top-p, min-p, temperature, then a draw from llama.cpp's seeded RNG (``dist``).
   That is not the protocol's order (top-p, min-p, top-k): llama.cpp's top-p measures
   the mass of the top-k survivors renormalised, so with both filters on it can keep
   fewer tokens. It is declared as it is; the sampling statistics judge it.

Also llama.cpp's own: reuse of the KV cache for a request with the same ``cache_key``
as the one before (the longest common prefix is kept and the rest removed, as
``Llama.generate`` does); the prompt evaluated ``prefill_step_size`` positions per
``llama_decode`` call (what llama.cpp's ``n_batch`` does); prompt embeddings, fed as
a ``llama_batch`` of vectors instead of token ids (as llama.cpp's multimodal
projectors feed images).

Not offered: batches (``Llama`` holds one sequence), speculative decoding with a
draft model (llama-cpp-python has only prompt-lookup drafting) and a bounded KV
cache with sink positions (llama.cpp's context shift discards half the context at
once instead).

Options (``--engine llama-cpp:threads=2,n_ctx=4096``): ``threads``, llama.cpp's
thread count (default ``$LMCONFORM_LLAMA_THREADS`` or 1); ``n_ctx``, the context
length (default 2048; logits of every position are kept, 0.2 MB each).
"""

from __future__ import annotations

import codecs
import ctypes
import os
from collections.abc import Iterator
from typing import ClassVar

import llama_cpp
import numpy as np

from engines.adapters.base import Engine, ends_with_any, event_from_logprobs
from engines.inputs import number
from engines.protocol import (
    GenerateRequest,
    ProcessorSettings,
    SamplerSettings,
    ScoreRequest,
    TokenEvent,
    Unsupported,
)

# llama.cpp's llama_token_data, as a numpy record: a candidate token and its logit.
TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities from logits, in float64 (entries of -inf stay -inf)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


class Candidates:
    """llama.cpp's ``llama_token_data_array`` over a numpy buffer: every token and its logit.

    Samplers work on it in place: processors change logits, filters shrink and sort it,
    the final sampler sets ``selected``.
    """

    def __init__(self, logits: np.ndarray):
        self.buffer = np.zeros(len(logits), dtype=TOKEN_DATA)
        self.buffer["id"] = np.arange(len(logits))
        self.buffer["logit"] = logits
        self.array = llama_cpp.llama_token_data_array(
            data=self.buffer.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=len(logits),
            selected=-1,
            sorted=False,
        )

    def apply(self, sampler) -> None:
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(self.array))

    def logits(self) -> np.ndarray:
        """The logits by token id (while no sampler has dropped a candidate)."""
        if self.array.size != len(self.buffer):
            raise RuntimeError("a sampler dropped candidates before the logits were read")
        by_id = np.empty(len(self.buffer), dtype=np.float32)
        by_id[self.buffer["id"]] = self.buffer["logit"]
        return by_id

    def selected(self) -> int:
        if self.array.selected < 0:
            raise RuntimeError("llama.cpp's sampler selected no token")
        return int(self.array.data[self.array.selected].id)


def sampler_chain(*samplers):
    """A llama.cpp sampler chain owning ``samplers`` (free it with ``llama_sampler_free``)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in samplers:
        llama_cpp.llama_sampler_chain_add(chain, sampler)
    return chain


class LlamaCppEngine(Engine):
    name = "llama-cpp"
    model_formats = ("gguf",)
    option_checks: ClassVar[dict] = {"threads": number(int, 1, 4096), "n_ctx": number(int, 16, 2**24)}
    # ggml's CPU path quantizes activations to 8 bits (Q8_0/Q8_1 blocks) before every
    # quantized matmul: judged under q4q8 on a 4-bit model (conformance/profiles.py).
    activation_bits = 8
    capabilities = frozenset(
        {
            "greedy",
            "stream",
            "logprobs",
            "sampling",
            "logit_bias",
            "input_embeddings",
            "prompt_cache",
            "prefill_chunking",
            "score",
        }
    )

    def __init__(self, source, *, threads: int | str | None = None, n_ctx: int | str = 2048):
        super().__init__(source)
        self.threads = int(threads or os.environ.get("LMCONFORM_LLAMA_THREADS", "1"))
        self.llm = llama_cpp.Llama(
            model_path=str(source.path),
            n_ctx=int(n_ctx),
            logits_all=True,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            verbose=False,
        )
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        # llama.cpp's end-of-generation tokens (EOS, EOT, <|im_end|>, ...): where it stops.
        self.end_ids = {t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        self._cache_key: str | None = None  # the key of the request whose KV cache is held

    @property
    def vocab_size(self) -> int:
        return self.llm.n_vocab()

    def describe(self) -> dict:
        return {
            "engine": self.name,
            "version": f"llama-cpp-python {llama_cpp.__version__}, {self.threads} thread(s)",
            "model": self.source.describe(),
        }

    def close(self) -> None:
        self.llm.close()

    # -- generation -----------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        self._check(request)
        processors = self._processors(request.processors)
        choice = self._choice(request.sampler)
        try:
            if processors is not None:
                for token in request.prompt:  # the penalty window starts in the prompt
                    llama_cpp.llama_sampler_accept(processors, token)
            logits = self._prefill(request)
            ends = self.end_ids | set(request.stop_tokens)
            text = codecs.getincrementaldecoder("utf-8")(errors="replace")
            generated: list[int] = []
            while True:
                candidates = Candidates(logits)
                if processors is not None:
                    candidates.apply(processors)
                logprobs = log_softmax(candidates.logits())
                candidates.apply(choice)
                token = candidates.selected()
                if processors is not None:
                    llama_cpp.llama_sampler_accept(processors, token)
                generated.append(token)
                stopped = token in ends or ends_with_any(generated, request.stop_sequences)
                last = stopped or len(generated) == request.max_tokens
                silent = stopped and token in ends  # an end or stop token shows no text
                piece = "" if silent else text.decode(self.llm.detokenize([token]))
                if last:
                    piece += text.decode(b"", final=True)
                yield event_from_logprobs(
                    token,
                    logprobs,
                    self.vocab_size,
                    request.top_logprobs,
                    text=piece,
                    finish_reason=("stop" if stopped else "length") if last else None,
                )
                if last:
                    return
                logits = self._feed([token])
        finally:
            for chain in (processors, choice):
                if chain is not None:
                    llama_cpp.llama_sampler_free(chain)

    def score(self, request: ScoreRequest) -> list[TokenEvent]:
        if not request.prompt:
            raise ValueError("scoring needs at least one prompt token")
        tokens = list(request.prompt) + list(request.continuation)
        self._check_tokens(tokens, len(tokens))
        self._cache_key = None
        self.llm.reset()
        self.llm.eval(tokens)
        start = len(request.prompt) - 1  # the logits at position i predict token i + 1
        return [
            event_from_logprobs(
                token,
                log_softmax(self.llm.scores[start + i]),
                self.vocab_size,
                request.top_logprobs,
            )
            for i, token in enumerate(request.continuation)
        ]

    # -- pieces -------------------------------------------------------------------------

    def _check(self, request: GenerateRequest) -> None:
        if request.draft is not None:
            raise Unsupported("speculative decoding with a draft model")
        if request.prompt_embeddings is not None and request.cache_key is not None:
            raise Unsupported("a cache key together with prompt embeddings")
        if request.max_kv_size is not None:
            raise Unsupported("a bounded KV cache keeping sink positions")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        length = len(request.prompt)
        if request.prompt_embeddings is not None:
            length = len(request.prompt_embeddings)
            if request.prompt and len(request.prompt) != length:
                raise ValueError("prompt and prompt_embeddings differ in length")
            if any(len(vector) != self.llm.n_embd() for vector in request.prompt_embeddings):
                raise ValueError(f"prompt embeddings must have {self.llm.n_embd()} values each")
        if length == 0:
            raise ValueError("the prompt is empty")
        # The last generated token is never fed back, so the cache needs one position less.
        self._check_tokens(request.prompt, length + request.max_tokens - 1)
        p = request.processors
        windows = {
            size
            for penalty, size in [
                (p.repetition_penalty, p.repetition_context_size),
                (p.presence_penalty, p.presence_context_size),
                (p.frequency_penalty, p.frequency_context_size),
            ]
            if penalty not in (None, 0)
        }
        if len(windows) > 1:
            raise Unsupported(
                f"penalty windows of different sizes ({sorted(windows)}): llama.cpp's "
                "penalties sampler has one window for all three"
            )

    def _check_tokens(self, tokens: list[int], positions: int) -> None:
        """Token ids llama.cpp would abort on, and contexts longer than ``n_ctx``."""
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if positions > self.llm.n_ctx():
            raise Unsupported(
                f"{positions} positions exceed the context of {self.llm.n_ctx()} "
                f"(open the engine as llama-cpp:n_ctx=N)"
            )

    def _processors(self, p: ProcessorSettings):
        """llama.cpp's logit-bias and penalties samplers as one chain, or None if unused."""
        samplers = []
        if p.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(p.logit_bias))()
            for entry, (token, bias) in zip(biases, p.logit_bias.items(), strict=True):
                entry.token, entry.bias = int(token), float(bias)
            samplers.append(
                llama_cpp.llama_sampler_init_logit_bias(self.vocab_size, len(biases), biases)
            )
        penalties = [
            (p.repetition_penalty, p.repetition_context_size),
            (p.presence_penalty, p.presence_context_size),
            (p.frequency_penalty, p.frequency_context_size),
        ]
        windows = [size for penalty, size in penalties if penalty not in (None, 0)]
        if windows:
            samplers.append(
                llama_cpp.llama_sampler_init_penalties(
                    self.vocab_size,
                    windows[0],  # _check made sure the active penalties share it
                    p.repetition_penalty or 1.0,
                    p.frequency_penalty or 0.0,
                    p.presence_penalty or 0.0,
                )
            )
        return sampler_chain(*samplers) if samplers else None

    @staticmethod
    def _choice(s: SamplerSettings):
        """llama.cpp's greedy sampler, or llama-cpp-python's chain (``Llama._init_sampler``)."""
        if s.greedy:
            return sampler_chain(llama_cpp.llama_sampler_init_greedy())
        seed = llama_cpp.LLAMA_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF
        return sampler_chain(
            llama_cpp.llama_sampler_init_top_k(s.top_k),  # 0: off
            llama_cpp.llama_sampler_init_top_p(s.top_p if 0 < s.top_p < 1 else 1.0, 1),
            llama_cpp.llama_sampler_init_min_p(s.min_p, s.min_tokens_to_keep),  # 0: off
            llama_cpp.llama_sampler_init_temp(s.temp),
            llama_cpp.llama_sampler_init_dist(seed),
        )

    def _prefill(self, request: GenerateRequest) -> np.ndarray:
        """Feed the prompt (what the held KV cache lacks of it); the last position's logits."""
        if request.prompt_embeddings is not None:
            self._cache_key = None
            self.llm.reset()
            vectors = np.asarray(request.prompt_embeddings, dtype=np.float32)
            step = request.prefill_step_size or len(vectors)
            for start in range(0, len(vectors), step):
                logits = self._feed_embeddings(vectors[start : start + step])
            return logits
        prompt = list(request.prompt)
        keep = 0
        if request.cache_key is not None and request.cache_key == self._cache_key:
            held = self.llm.input_ids[: self.llm.n_tokens]
            while keep < min(len(held), len(prompt)) and held[keep] == prompt[keep]:
                keep += 1
            keep = min(keep, len(prompt) - 1)  # the last prompt token is fed for its logits
        self._cache_key = request.cache_key
        self.llm.reset()
        self.llm.n_tokens = keep  # eval() removes every cached position from here on
        step = request.prefill_step_size or len(prompt)
        for start in range(keep, len(prompt), step):
            logits = self._feed(prompt[start : start + step])
        return logits

    def _feed(self, tokens: list[int]) -> np.ndarray:
        """Evaluate ``tokens`` after the cached ones; the logits at the last of them."""
        self.llm.eval(tokens)
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def _feed_embeddings(self, vectors: np.ndarray) -> np.ndarray:
        """Evaluate embedding vectors (positions, n_embd) after the cached positions, in one
        ``llama_decode`` call; the logits at the last of them."""
        count, width = vectors.shape
        start = self.llm.n_tokens
        # As Llama.eval does: drop whatever the cache holds from this position on.
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), -1, start, -1)
        batch = llama_cpp.llama_batch_init(count, width, 1)
        try:
            batch.n_tokens = count
            ctypes.memmove(batch.embd, np.ascontiguousarray(vectors).ctypes.data, vectors.nbytes)
            for i in range(count):
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == count - 1
            status = llama_cpp.llama_decode(self.llm.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode of {count} embeddings failed ({status})")
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self.llm.ctx, count - 1), shape=(self.vocab_size,)
            ).copy()
        finally:
            llama_cpp.llama_batch_free(batch)
        # Llama's own bookkeeping: these positions are held (their token ids are unknown).
        self.llm.input_ids[start : start + count] = -1
        self.llm.n_tokens += count
        return logits
