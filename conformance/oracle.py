"""The oracle: the source of truth for one model, and its contract.

``Oracle`` is what the runner and the checks ask of the truth: tokenize and
embed prompts for the catalogue, answer requests (each answer computed once
and reused by every engine compared against it), score an engine's own
continuation, and decode tokens for diagnostics. Implementations:

- ``ReferenceOracle`` (here): the reference engine, live;
- ``SnapshotOracle`` (``snapshots/oracle.py``): the reference's answers replayed
  from snapshot files, without MLX;
- ``RecordingOracle`` and ``EngineOracle`` (``snapshots/recorder.py``): an oracle
  whose answers are written down, and any engine playing the oracle's part.

Answers always carry the top ``REFERENCE_TOP`` logprobs, enough to find the
reference's logprob of whatever token an engine chose instead, and so to
tell a near-tie from a bug. ``request_key`` names a request the same way for
every oracle's cache and for the snapshot files, and ``readable_token`` shows
a token the same way in every diagnostic.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Protocol

import numpy as np

from conformance.catalogue import Case
from conformance.catalogue import Oracle as CatalogueOracle
from conformance.profiles import PrecisionProfile, profile_for_model
from engines.adapters.base import Engine, event_from_logprobs
from engines.byte_level import BYTE_OF_CHAR
from engines.protocol import GenerateRequest, SamplerSettings, ScoreRequest, Trace
from engines.registry import open_engine
from engines.serialization import dumps

REFERENCE_TOP = 20
KEY_CHARS = 16  # hex digits of a request hash: collisions among a few hundred requests are moot


class Oracle(CatalogueOracle, Protocol):
    """The source of truth for one model, as the runner and the checks use it.

    Besides the catalogue's four questions (``encode``, ``encode_chat``,
    ``embed``, ``greedy_tokens``): answers, scores, continuations, decoding,
    and whether a case can be judged against this oracle at all.
    """

    model: str
    vocab_size: int
    end_tokens: set[int]
    # The live engine giving the answers, if any: the reference under test reuses it
    # instead of loading the model twice. None for replayed answers.
    engine: Engine | None

    def default_profile(self, override: str | None = None) -> PrecisionProfile: ...

    def answer(self, request: GenerateRequest, top: int = REFERENCE_TOP) -> Trace:
        """The streamed answer to ``request``, with ``top`` logprobs per step."""
        ...

    def answer_score(self, request: ScoreRequest) -> Trace:
        """Teacher-forced logprobs of ``request.continuation``, ``REFERENCE_TOP`` per step."""
        ...

    def continuation(self, request: GenerateRequest, tokens: list[int]) -> Trace:
        """The oracle's logprobs along ``tokens`` (an engine's greedy answer to ``request``);
        raises ``comparator.ResumptionUnavailable`` if it cannot tell."""
        ...

    def missing(self, case: Case) -> str | None:
        """Why ``case`` cannot be judged against this oracle, or None if it can."""
        ...

    def decode(self, tokens: list[int]) -> str: ...

    def token_text(self, token: int) -> str:
        """A token as a human should see it (see ``readable_token``)."""
        ...

    def close(self) -> None: ...


def request_key(request: GenerateRequest | ScoreRequest) -> str:
    """A short hash naming the exact request, as the oracle was asked it.

    The one identity of a question to an oracle: every oracle's cache uses it,
    and snapshot files store it to find an answer again (so changing it makes
    every stored snapshot unreadable).
    """
    prefix = "score:" if isinstance(request, ScoreRequest) else ""
    return hashlib.sha256((prefix + dumps(request)).encode()).hexdigest()[:KEY_CHARS]


def as_asked(request: GenerateRequest, top: int = REFERENCE_TOP) -> GenerateRequest:
    """``request`` as an oracle answers it: streamed, with ``top`` logprobs per step."""
    return replace(request, top_logprobs=top, stream=True)


def as_scored(request: ScoreRequest) -> ScoreRequest:
    """``request`` as an oracle scores it: with ``REFERENCE_TOP`` logprobs per step."""
    return replace(request, top_logprobs=REFERENCE_TOP)




def readable_token(text: str, piece: str) -> str:
    """A token as a human should see it: its decoded ``text``, or, when that is only part
    of a UTF-8 character (a bare replacement character), its bytes (from ``piece``, its
    byte-level vocabulary entry) as ``<e2 80>``; a piece of another kind as it is."""
    if "\ufffd" not in text:
        return text
    if all(ch in BYTE_OF_CHAR for ch in piece):
        return f"<{bytes(BYTE_OF_CHAR[ch] for ch in piece).hex(' ')}>"
    return piece


class ReferenceOracle:
    """The reference engine, live: every answer computed on demand and kept."""

    def __init__(self, model: str, engine=None):
        self.model = model
        self.engine = engine if engine is not None else open_engine("reference", model)
        self.tokenizer = self.engine.tokenizer
        self.end_tokens: set[int] = set(self.tokenizer.eos_token_ids)
        self.vocab_size: int = self.engine.vocab_size
        self._answers: dict[str, Trace] = {}
        self._continuations: dict[tuple[str, tuple[int, ...]], Trace] = {}

    def default_profile(self, override: str | None = None) -> PrecisionProfile:
        return profile_for_model(self.model, override)

    # -- what the catalogue needs (catalogue.Oracle) ------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_chat(self, text: str) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

    def embed(self, tokens: list[int]) -> np.ndarray:
        return self.engine.embed(tokens)

    def greedy_tokens(self, request: GenerateRequest) -> list[int]:
        return self.answer(request).tokens

    def missing(self, case: Case) -> str | None:
        return None  # the live reference answers any question

    # -- answers ---------------------------------------------------------------------------

    def answer(self, request: GenerateRequest, top: int = REFERENCE_TOP) -> Trace:
        """The reference's streamed answer to ``request``, with ``top`` logprobs per step."""
        asked = as_asked(request, top)
        key = request_key(asked)
        if key not in self._answers:
            self._answers[key] = Trace(list(self.engine.generate(asked)))
        return self._answers[key]

    def answer_score(self, request: ScoreRequest) -> Trace:
        asked = as_scored(request)
        key = request_key(asked)
        if key not in self._answers:
            self._answers[key] = Trace(self.engine.score(asked))
        return self._answers[key]

    def continuation(self, request: GenerateRequest, tokens: list[int]) -> Trace:
        """The reference teacher-forced on ``tokens`` (an engine's greedy answer to
        ``request``): at each step, the reference's logprobs at the prefix the engine
        had produced, with ``REFERENCE_TOP`` top logprobs. ``event.token`` is the
        engine's token; the comparator resumes on this after a near-tie.

        A request whose settings do not shape the logits goes through the reference's
        ``score`` path (one forward pass over prompt + tokens). Logit bias,
        penalties, a bounded KV cache or an embeddings prompt do shape them, so those
        are decoded with the request's own settings and a sampler that picks the
        engine's tokens. A draft model and a cache key change nothing in a correct
        greedy answer, and are left out.
        """
        key = (request_key(request), tuple(tokens))
        if key not in self._continuations:
            plain = (
                not request.processors.active
                and request.max_kv_size is None
                and request.prompt_embeddings is None
            )
            if plain:
                scored = ScoreRequest(list(request.prompt), list(tokens), REFERENCE_TOP)
                self._continuations[key] = Trace(self.engine.score(scored))
            else:
                self._continuations[key] = Trace(self._forced_decoding(request, list(tokens)))
        return self._continuations[key]

    def _forced_decoding(self, request: GenerateRequest, tokens: list[int]):
        import mlx.core as mx  # only the live reference needs MLX (snapshots do not)

        plain = replace(request, draft=None, cache_key=None, sampler=SamplerSettings())
        kwargs = self.engine.generation_kwargs(plain)
        calls = 0

        def forced(logprobs: mx.array) -> mx.array:
            # generate_step asks for one token beyond max_tokens (it computes ahead).
            nonlocal calls
            token = tokens[min(calls, len(tokens) - 1)]
            calls += 1
            return mx.array([token], dtype=mx.int32)

        kwargs["sampler"] = forced
        steps = self.engine.api.generate_step(
            self.engine.prompt_array(plain), self.engine.model, max_tokens=len(tokens), **kwargs
        )
        return [
            event_from_logprobs(
                token, np.array(logprobs.astype(mx.float32)), self.vocab_size, REFERENCE_TOP
            )
            for token, logprobs in steps
        ]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def token_text(self, token: int) -> str:
        return readable_token(
            self.decode([token]), self.tokenizer.convert_ids_to_tokens(int(token))
        )

    def close(self) -> None:
        self.engine.close()
