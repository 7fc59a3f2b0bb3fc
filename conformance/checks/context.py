"""What a check works with: the case, the engine, the oracle, the profile, the findings.

Every engine call goes through ``CaseContext`` so that the same rules apply
to every case: requests are sent only with capabilities the engine declared,
answers are validated (``validation.py``) before anything compares them, an
engine that streams more events than ``max_tokens`` is cut off, and every
comparison is recorded as a ``Finding`` with a readable account.

A comparison whose expected side is a reference answer (``reference()``) of a
greedy request resumes after a near-tie on the engine's own path: the oracle
scores the engine's tokens (``oracle.continuation``) and the comparator judges
every later step there (``comparator.py``, rule 5).

Text pieces are checked in the cases about text (``params.check_text``) and in
every ``stream`` case, not everywhere: one detokenizer difference would
otherwise fail every case of an engine and hide what the other cases show.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from conformance.catalogue import Case, CatalogueError, build_request, check_expectations
from conformance.checks.sampled import SHOWN_PROBLEMS, judge_sampled_path
from conformance.comparator import (
    FAIL,
    NEAR_TIE,
    PASS,
    Comparison,
    Diagnostic,
    Resume,
    compare_traces,
)
from conformance.conditioning import Conditioning, conditioning_of
from conformance.oracle import Oracle
from conformance.profiles import PrecisionProfile
from conformance.validation import validate_generation, validate_score, validate_text
from engines.protocol import (
    BatchRequest,
    GenerateRequest,
    ProtocolError,
    SamplerSettings,
    ScoreRequest,
    Trace,
    Unsupported,
)
from engines.serialization import dumps

ENGINE_TOP = 5  # top logprobs asked of an engine: enough for the top-5 in diagnostics


@dataclass
class Finding:
    """One comparison or assertion within a case."""

    check: str  # what was compared, e.g. "max_tokens=7 vs reference"
    verdict: str  # "pass", "near-tie" or "fail"
    summary: str
    details: str = ""
    diagnostic: Diagnostic | None = None
    near_tie_steps: list[int] = field(default_factory=list)  # near-ties the engine took
    unjudged_steps: int = 0  # engine steps after a near-tie nothing could judge


class CaseContext:
    def __init__(self, case: Case, engine, oracle: Oracle, profile: PrecisionProfile):
        self.case = case
        self.engine = engine
        self.oracle = oracle
        self.profile = profile
        self.findings: list[Finding] = []
        self.conditioning: Conditioning | None = None
        self._requests: dict[str, GenerateRequest] = {}
        # The request behind each reference answer handed out, by the answer's identity
        # (the oracle keeps its answers, so identities stay valid): compare() needs it
        # to score the engine's own continuation after a near-tie.
        self._answered: dict[int, GenerateRequest] = {}
        # The engine's answers to sampled requests, by identity (kept alive here): between
        # two of them a near-tie is no excuse, the same seed must give the same tokens.
        self._sampled: dict[int, Trace] = {}
        self.checks_text = bool(case.params.get("check_text")) or case.kind == "stream"

    @property
    def params(self) -> dict[str, Any]:
        return self.case.params

    @property
    def engine_name(self) -> str:
        return self.engine.name

    # -- requests ------------------------------------------------------------------------

    def request(self, spec: dict[str, Any] | None = None, **overrides: Any) -> GenerateRequest:
        """The concrete request for ``spec`` (default: the case's request) with overrides."""
        spec = self.case.request if spec is None else spec
        key = repr((sorted(spec.items()), sorted(overrides.items())))
        if key not in self._requests:
            self._requests[key] = build_request(spec, self.oracle, **overrides)
        return self._requests[key]

    def require(self, needed: set[str]) -> None:
        missing = sorted(needed - set(self.engine.capabilities))
        if missing:
            raise Unsupported(f"{self.engine_name} lacks capability {', '.join(missing)}")

    # -- the reference's side -------------------------------------------------------------

    def reference(self, request: GenerateRequest, top: int | None = None) -> Trace:
        trace = self.oracle.answer(request) if top is None else self.oracle.answer(request, top)
        self._answered[id(trace)] = request
        return trace

    def resumption(self, expected: Trace) -> Resume | None:
        """How to go on after a near-tie against ``expected``: only a reference answer to a
        greedy request can be resumed (the reference's top token is then the rule)."""
        request = self._answered.get(id(expected))
        if request is None or not request.sampler.greedy:
            return None
        return lambda tokens: self.oracle.continuation(request, tokens)

    def primary_reference(self, request: GenerateRequest) -> Trace:
        """The reference's answer to the case's main request: checked against the case's
        expectations, and the source of the case's conditioning."""
        trace = self.reference(request)
        if request.sampler.greedy:
            self.conditioning = conditioning_of(trace, self.profile.tie_epsilon)
        check_expectations(
            self.case,
            trace.tokens,
            trace.finish_reason,
            self.oracle.decode([t for t in trace.tokens if t not in self.oracle.end_tokens]),
            self.conditioning.min_margin if self.conditioning else None,
        )
        return trace

    # -- the engine's side -----------------------------------------------------------------

    def run(self, request: GenerateRequest, label: str = "") -> Trace:
        """The engine's validated answer to ``request``."""
        self.require(request.capabilities_needed())
        caps = self.engine.capabilities
        sent = replace(
            request,
            top_logprobs=engine_top(request, caps),
            stream=request.stream and "stream" in caps,
        )
        if self.engine is self.oracle.engine and sent.stream:
            # The reference under test: its streamed answers are the oracle's (same code, same
            # numbers), so reuse them instead of generating twice.
            trace = self._truncated(self.oracle.answer(sent), sent.top_logprobs)
        else:
            trace = self._collect(sent)
        try:
            validate_generation(
                trace,
                sent,
                vocab_size=self.oracle.vocab_size,
                end_tokens=self.oracle.end_tokens,
                top_logprobs=sent.top_logprobs,
            )
        except ProtocolError as error:
            raise ProtocolError(f"{self.engine_name}{_for(label)}: {error}") from None
        if self.checks_text:
            self.check_text(trace, set(sent.stop_tokens), label)
        if not sent.sampler.greedy:
            self._sampled[id(trace)] = trace
        return trace

    def check_text(self, trace: Trace, stop_tokens: set[int], label: str) -> None:
        """Text problems are findings, not errors: the case's other checks still run."""
        try:
            validate_text(trace, self.oracle.decode, self.oracle.end_tokens | stop_tokens)
        except ProtocolError as error:
            summary = f"FAIL: {self.engine_name}{_for(label)}: {error}"
            if not any(f.check == "text" and f.summary.endswith(str(error)) for f in self.findings):
                self.fail("text", summary)

    def run_batch(self, batch: BatchRequest) -> list[Trace]:
        self.require(batch.capabilities_needed())
        caps = self.engine.capabilities
        sent = BatchRequest(
            [
                replace(
                    row, request=replace(row.request, top_logprobs=engine_top(row.request, caps))
                )
                for row in batch.rows
            ]
        )
        answer = self.engine.generate_batch(sent)
        if len(answer) != len(sent.rows):
            raise ProtocolError(
                f"{self.engine_name} answered {len(answer)} rows for a batch of {len(sent.rows)}"
            )
        traces = []
        for i, (row, events) in enumerate(zip(sent.rows, answer)):
            trace = Trace(list(events))
            try:
                validate_generation(
                    trace,
                    row.request,
                    vocab_size=self.oracle.vocab_size,
                    end_tokens=self.oracle.end_tokens,
                    top_logprobs=row.request.top_logprobs,
                )
            except ProtocolError as error:
                raise ProtocolError(f"{self.engine_name}, batch row {i}: {error}") from None
            if self.checks_text:
                self.check_text(trace, set(row.request.stop_tokens), f"batch row {i}")
            if not row.request.sampler.greedy:
                self._sampled[id(trace)] = trace
            traces.append(trace)
        return traces

    def run_score(self, request: ScoreRequest, top: int = ENGINE_TOP) -> Trace:
        self.require(request.capabilities_needed())
        top = top if "logprobs" in self.engine.capabilities else 0
        sent = replace(request, top_logprobs=top)
        trace = Trace(list(self.engine.score(sent)))
        try:
            validate_score(trace, sent, vocab_size=self.oracle.vocab_size, top_logprobs=top)
        except ProtocolError as error:
            raise ProtocolError(f"{self.engine_name} scoring: {error}") from None
        return trace

    def _collect(self, request: GenerateRequest) -> Trace:
        events = []
        stream = self.engine.generate(request)
        try:
            for event in stream:
                events.append(event)
                if len(events) > request.max_tokens:
                    raise ProtocolError(
                        f"more than max_tokens={request.max_tokens} events "
                        "(the engine does not stop)"
                    )
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return Trace(events)

    @staticmethod
    def _truncated(trace: Trace, top: int) -> Trace:
        return Trace(
            [replace(e, top_logprobs=(e.top_logprobs or [])[:top] or None) for e in trace.events]
        )

    # -- findings ---------------------------------------------------------------------------

    def compare(
        self,
        check: str,
        expected: Trace,
        actual: Trace,
        expected_label: str = "reference",
        actual_label: str | None = None,
    ) -> Comparison | None:
        """``actual`` against ``expected``, recorded as a finding. A reference answer to a
        sampled request is not compared token by token: the engine's own path is judged
        against the settings and the reference's logprobs (``sampled.py``); None then."""
        actual_label = actual_label or self.engine_name
        asked = self._answered.get(id(expected))
        if asked is not None and not asked.sampler.greedy:
            self.judge_sampled(check, asked, actual, actual_label)
            return None
        result = compare_traces(
            expected,
            actual,
            self.profile,
            self.oracle.decode,
            expected_label=expected_label,
            actual_label=actual_label,
            token_text=self.oracle.token_text,
            resume=self.resumption(expected),
        )
        if result.verdict == NEAR_TIE and id(expected) in self._sampled:
            result = replace(
                result,
                verdict=FAIL,
                summary=f"FAIL: the same seed gave other tokens ({result.summary})",
            )
        self.findings.append(
            Finding(
                check=check,
                verdict=result.verdict,
                summary=result.summary,
                details=result.render(expected_label, actual_label),
                diagnostic=result.diagnostic,
                near_tie_steps=result.near_tie_steps,
                unjudged_steps=result.unjudged_steps,
            )
        )
        return result

    def judge_sampled(self, check: str, request: GenerateRequest, trace: Trace, label: str):
        """The engine's sampled ``trace`` judged on its own path (``sampled.py``)."""
        if request.prompt_embeddings is not None:
            raise CatalogueError(f"{self.case.id}: a sampled path is judged on token ids")
        single = replace(
            request,
            sampler=SamplerSettings(),
            max_tokens=1,
            draft=None,
            cache_key=None,
            stop_tokens=[],
            stop_sequences=[],
        )

        def logprobs_after(tokens: list[int]) -> np.ndarray:
            asked = replace(single, prompt=list(request.prompt) + list(tokens))
            answer = self.reference(asked, top=self.oracle.vocab_size)
            vector = np.full(self.oracle.vocab_size, -np.inf)
            for token, logprob in answer.events[0].top_logprobs or []:
                vector[token] = logprob
            return vector

        problems = judge_sampled_path(
            trace, request.sampler, logprobs_after, self.profile, self.oracle.token_text
        )
        scope = f"{len(trace)} sampled tokens of {label} on its own path"
        if not problems:
            self.add(check, PASS, f"pass: {scope}: each allowed by the settings, logprobs agree")
            return
        summary = f"FAIL: {len(problems)} of {scope}: {problems[0].problem}"
        shown = [f"  {p.problem}" for p in problems[:SHOWN_PROBLEMS]]
        self.fail(check, summary, "\n".join([summary, *shown]))

    def add(self, check: str, verdict: str, summary: str, details: str = "") -> None:
        self.findings.append(Finding(check, verdict, summary, details or summary))

    def fail(self, check: str, summary: str, details: str = "") -> None:
        self.add(check, FAIL, summary, details)


def engine_top(request: GenerateRequest, capabilities) -> int:
    """Top logprobs asked of an engine: the request's own count where a case asks for more
    than the diagnostics need (the top_logprobs combinations), none without ``logprobs``."""
    return max(request.top_logprobs, ENGINE_TOP) if "logprobs" in capabilities else 0


def describe_overrides(overrides: dict[str, Any]) -> str:
    """A short label for a variant, e.g. ``draft=self/3`` or ``prefill_step_size=4``."""
    parts = []
    for key, value in overrides.items():
        if key == "draft":
            parts.append(f"draft={value['model']}/{value['num_draft_tokens']}")
        elif isinstance(value, dict):
            parts.append(f"{key}={dumps(value)}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts) or "as given"


def _for(label: str) -> str:
    return f" ({label})" if label else ""
