"""Taking snapshots: run the catalogue's cases and write down what each asked of the oracle.

A case's check talks to the oracle (tokenize this prompt, embed these tokens,
what is the answer to this request?) and to the engine under test. To
snapshot an engine, it plays both parts: the oracle is a ``RecordingOracle``
around an oracle backed by that engine, and the check runs exactly as in a
live comparison. Everything the oracle is asked lands in the case's
``CaseSnapshot``; replaying those answers later (``oracle.py``)
makes the same checks run without the engine that gave them.

Two oracles can be recorded:

- the live ``ReferenceOracle`` (the reference engine; this is how the
  committed golden snapshots are made);
- an ``EngineOracle``: answers from any engine, prompts and embeddings from
  the committed golden snapshots (so a user's engine is snapshotted on the
  very same requests, without needing the reference or MLX).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from conformance.catalogue import Case
from conformance.comparator import ResumptionUnavailable
from conformance.conditioning import Conditioning
from conformance.oracle import REFERENCE_TOP, Oracle, as_asked, as_scored, request_key
from conformance.profiles import PrecisionProfile, profile_for_model
from conformance.runner import run_case
from conformance.snapshots.store import (
    MAX_STORED_VOCABULARY,
    Answer,
    CaseSnapshot,
    Embedding,
    GroupSnapshot,
    Inputs,
    VocabularyData,
    case_definition,
    request_summary,
)
from engines.protocol import GenerateRequest, ScoreRequest, Trace


class RecordingOracle:
    """An ``Oracle`` that passes every question on to ``inner`` and records question and
    answer.

    ``start()`` begins a new record (one per case); ``take()`` returns it.
    """

    def __init__(self, inner: Oracle):
        self.inner = inner
        self.start()

    # -- what stays the inner oracle's ------------------------------------------------

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def engine(self):
        # The engine under test may be the oracle's own engine (see CaseContext.run).
        return self.inner.engine

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def end_tokens(self) -> set[int]:
        return self.inner.end_tokens

    def default_profile(self, override: str | None = None) -> PrecisionProfile:
        return self.inner.default_profile(override)

    def missing(self, case: Case) -> str | None:
        return self.inner.missing(case)

    def continuation(self, request: GenerateRequest, tokens: list[int]) -> Trace:
        # Not recorded: a snapshot holds the reference's own path only (see oracle.py).
        return self.inner.continuation(request, tokens)

    def decode(self, tokens: list[int]) -> str:
        return self.inner.decode(tokens)

    def token_text(self, token: int) -> str:
        return self.inner.token_text(token)

    def close(self) -> None:
        self.inner.close()

    # -- what is recorded ------------------------------------------------------------------

    def start(self) -> None:
        self._inputs = Inputs()
        self._answers: dict[str, Answer] = {}
        self._not_replayable = ""

    def take(self) -> tuple[Inputs, list[Answer], str]:
        """What the case asked and got, and why it cannot be replayed ("" if it can)."""
        return self._inputs, list(self._answers.values()), self._not_replayable

    def encode(self, text: str) -> list[int]:
        ids = self._inputs.encode[text] = list(self.inner.encode(text))
        return ids

    def encode_chat(self, text: str) -> list[int]:
        ids = self._inputs.encode_chat[text] = list(self.inner.encode_chat(text))
        return ids

    def embed(self, tokens: list[int]) -> np.ndarray:
        rows = np.asarray(self.inner.embed(tokens), dtype=np.float32)
        if not any(e.tokens == list(tokens) for e in self._inputs.embed):
            self._inputs.embed.append(Embedding(list(tokens), rows.tolist()))
        return rows

    def greedy_tokens(self, request: GenerateRequest) -> list[int]:
        return self.answer(request).tokens

    def answer(self, request: GenerateRequest, top: int = REFERENCE_TOP) -> Trace:
        trace = self.inner.answer(request, top)
        if not request.sampler.greedy:
            # Sampled answers reach the oracle only as the engine's own draws (when the
            # engine under test is the oracle's engine): no check compares with them, and
            # they depend on the random generator of the MLX version. Not recorded.
            return trace
        stored, stored_top = trace, top
        if top > REFERENCE_TOP and self.vocab_size > MAX_STORED_VOCABULARY:
            stored_top = REFERENCE_TOP
            stored = Trace(
                [replace(e, top_logprobs=(e.top_logprobs or [])[:stored_top]) for e in trace.events]
            )
            self._not_replayable = (
                f"the case needs the logprobs of all {self.vocab_size} tokens, which snapshots "
                f"store only for vocabularies up to {MAX_STORED_VOCABULARY} tokens: check it "
                "against the live reference"
            )
        self._remember("generate", as_asked(request, stored_top), stored_top, stored)
        return trace

    def answer_score(self, request: ScoreRequest) -> Trace:
        trace = self.inner.answer_score(request)
        self._remember("score", as_scored(request), REFERENCE_TOP, trace)
        return trace

    def _remember(self, kind: str, request, top: int, trace: Trace) -> None:
        key = request_key(request)
        if key not in self._answers:
            self._answers[key] = Answer(kind, request_summary(request), key, top, trace)


class EngineOracle:
    """The ``Oracle``'s part played by any engine: answers from ``engine``, inputs from
    ``inputs``.

    ``inputs`` (usually a ``SnapshotOracle`` on the committed golden snapshots)
    tokenizes, embeds and decodes; ``engine`` answers every request. The
    engine is asked for ``top`` logprobs only if it declares ``logprobs``, and
    for streaming only if it declares ``stream``.
    """

    def __init__(self, inputs: Oracle, engine):
        self.inputs = inputs
        self.engine = engine
        self.model = inputs.model
        self.vocab_size = inputs.vocab_size
        self.end_tokens = inputs.end_tokens
        self._answers: dict[str, Trace] = {}

    def default_profile(self, override: str | None = None) -> PrecisionProfile:
        return profile_for_model(self.model, override)

    def encode(self, text: str) -> list[int]:
        return self.inputs.encode(text)

    def encode_chat(self, text: str) -> list[int]:
        return self.inputs.encode_chat(text)

    def embed(self, tokens: list[int]) -> np.ndarray:
        return self.inputs.embed(tokens)

    def decode(self, tokens: list[int]) -> str:
        return self.inputs.decode(tokens)

    def token_text(self, token: int) -> str:
        return self.inputs.token_text(token)

    def greedy_tokens(self, request: GenerateRequest) -> list[int]:
        return self.answer(request).tokens

    def missing(self, case: Case) -> str | None:
        return None  # the engine answers live; what the inputs lack fails the case itself

    def answer(self, request: GenerateRequest, top: int = REFERENCE_TOP) -> Trace:
        caps = self.engine.capabilities
        sent = replace(
            request,
            top_logprobs=top if "logprobs" in caps else 0,
            stream="stream" in caps,
        )
        key = request_key(as_asked(request, top))
        if key not in self._answers:
            self._answers[key] = Trace(list(self.engine.generate(sent)))
        return self._answers[key]

    def answer_score(self, request: ScoreRequest) -> Trace:
        top = REFERENCE_TOP if "logprobs" in self.engine.capabilities else 0
        sent = replace(request, top_logprobs=top)
        key = request_key(as_scored(request))
        if key not in self._answers:
            self._answers[key] = Trace(list(self.engine.score(sent)))
        return self._answers[key]

    def continuation(self, request: GenerateRequest, tokens: list[int]) -> Trace:
        """The engine along ``tokens``: only where they are its own answer (as in snapshots)."""
        own = self.answer(request)
        if own.tokens == list(tokens):
            return own
        raise ResumptionUnavailable(
            f"{self.engine.name}, playing the oracle, cannot score another path than its own"
        )

    def close(self) -> None:
        self.engine.close()


def record_case(
    case: Case,
    engine,
    oracle: RecordingOracle,
    profile: PrecisionProfile,
    timeout: float | None = None,
) -> CaseSnapshot:
    """Run ``case`` with ``engine`` as the engine under test; its record and verdict."""
    oracle.start()
    result = run_case(case, engine, oracle, profile, timeout)
    inputs, answers, not_replayable = oracle.take()
    if judges_engine_chosen_prefixes(case):
        # Which prefixes were asked about depends on the engine's random draws (and so on
        # the random generator of its version): only the verdict is kept.
        answers = []
        not_replayable = (
            "it judges whole sampled generations at the prefixes the engine's own draws "
            "reach, and a snapshot cannot know those in advance: check it against the live "
            "reference"
        )
    return CaseSnapshot(
        case_id=case.id,
        kind=case.kind,
        about=case.about,
        definition=case_definition(case),
        verdict=result.verdict,
        conditioning=_conditioning(result.conditioning),
        inputs=inputs,
        answers=answers,
        not_replayable=not_replayable,
    )


def judges_engine_chosen_prefixes(case: Case) -> bool:
    """A distribution case over generations longer than one token (speculative sampling),
    or a sampled case of another kind (the ``sampling`` combinations: each token judged at
    the prefix the engine's own draws reached)."""
    max_tokens = case.request.get("max_tokens", GenerateRequest().max_tokens)
    if case.kind == "distribution":
        return int(max_tokens) > 1
    return case.kind != "seed" and float(case.request.get("sampler", {}).get("temp", 0)) > 0


def record_group(
    model: str,
    group: str,
    cases: list[Case],
    oracle: RecordingOracle,
    engine_description: str,
    profile: PrecisionProfile,
    timeout: float | None = None,
    progress: Callable[[Case, CaseSnapshot], None] | None = None,
) -> GroupSnapshot:
    """Every case of ``group`` (among ``cases``) recorded, with ``oracle.engine`` under test."""
    snapshot = GroupSnapshot(model, group, engine_description, profile.name, cases={})
    for case in (c for c in cases if c.group == group):
        record = record_case(case, oracle.engine, oracle, profile, timeout)
        snapshot.cases[case.id] = record
        if progress:
            progress(case, record)
    return snapshot


def vocabulary_of(oracle) -> VocabularyData:
    """The tokens of a live ``ReferenceOracle``'s tokenizer, as a snapshot stores them."""
    hf = oracle.tokenizer.tokenizer
    decoder = type(hf.backend_tokenizer.decoder).__name__
    if decoder != "ByteLevel":
        raise ValueError(f"only byte-level vocabularies can be stored, not {decoder}")
    size = len(hf)
    return VocabularyData(
        model=oracle.model,
        vocab_size=oracle.vocab_size,
        end_tokens=sorted(oracle.end_tokens),
        tokens=hf.convert_ids_to_tokens(list(range(size))),
        added={int(i): bool(t.special) for i, t in hf.added_tokens_decoder.items()},
    )


def _conditioning(c: Conditioning | None) -> dict | None:
    if c is None or c.min_margin is None:
        return None
    return {
        "min_margin": c.min_margin,
        "step": c.step,
        "runner_up": c.runner_up,
        "epsilon": c.epsilon,
        "ill_conditioned": c.ill_conditioned,
    }
