"""Running cases on engines: every case gets a verdict, and nothing stops the run.

``run_case`` turns whatever happens into a ``CaseResult``:

- the engine lacks a capability, or raises ``Unsupported``: "unsupported";
- any finding failed, the engine raised (even ``SystemExit`` or
  ``KeyboardInterrupt``: an engine cannot end the run), broke the protocol
  (wrong-length logprobs, a token outside the vocabulary, no finish reason,
  output after a finished request, ...) or ran past the time limit: "fail",
  with the error and where it happened;
- otherwise "near-tie" if some comparison ended at a near-tie, else "pass".

``run_matrix`` runs the selected cases for each (model, engine) pair, sharing
one oracle per model (the live reference, or golden snapshots: ``open_oracle``),
and reports progress through a callback.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from conformance.catalogue import Case, CatalogueError, load_cases, select_cases
from conformance.checks import CHECKS
from conformance.checks.context import CaseContext, Finding
from conformance.comparator import FAIL, NEAR_TIE, PASS
from conformance.conditioning import Conditioning
from conformance.oracle import Oracle, ReferenceOracle
from conformance.profiles import PrecisionProfile, profile_for_model
from conformance.snapshots.oracle import SnapshotOracle
from conformance.snapshots.store import GOLDEN_DIR, SnapshotError
from engines.adapters.line_process import EngineFailure
from engines.deadline import CaseTimeout, Interrupted, deadline
from engines.models import DEFAULT_CASE_TIMEOUT_S
from engines.protocol import ProtocolError, Unsupported
from engines.registry import EngineUnavailable, open_engine

UNSUPPORTED = "unsupported"
SKIPPED = "skipped"  # the engine itself could not be used (not installed)
VERDICTS = (PASS, NEAR_TIE, FAIL, UNSUPPORTED, SKIPPED)
TRACEBACK_LINES = 6


@dataclass
class CaseResult:
    case_id: str
    engine: str
    model: str
    profile: str
    verdict: str
    about: str = ""
    findings: list[Finding] = field(default_factory=list)
    conditioning: Conditioning | None = None
    reason: str = ""  # why unsupported, skipped, or failed without a finding
    duration_s: float = 0.0
    label: str = ""  # the engine's short name for tables (``engine`` is the full spec), if other

    @property
    def engine_label(self) -> str:
        return self.label or self.engine

    @property
    def ill_conditioned(self) -> bool:
        return bool(self.conditioning and self.conditioning.ill_conditioned)

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == FAIL]

    def near_ties(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == NEAR_TIE]


# (engine label, model, case index, case count, case, its result or None when it starts)
ProgressCallback = Callable[[str, str, int, int, Case, "CaseResult | None"], None]


def run_case(
    case: Case,
    engine,
    oracle: Oracle,
    profile: PrecisionProfile,
    timeout: float | None = DEFAULT_CASE_TIMEOUT_S,
) -> CaseResult:
    """Run one case on one engine; always returns a result."""
    ctx = CaseContext(case, engine, oracle, profile)
    result = CaseResult(case.id, engine.name, oracle.model, profile.name, PASS, about=case.about)
    if engine.label != engine.name:
        result.label = engine.label
    start = time.perf_counter()
    try:
        with deadline(timeout):
            CHECKS[case.kind](ctx)
            settle = getattr(engine, "settle", None)  # output after the case's last answer
            if settle is not None:
                settle()
    except Interrupted:
        raise  # the run is being stopped: not a verdict on the engine
    except Unsupported as error:
        result.verdict, result.reason = UNSUPPORTED, str(error)
    except CatalogueError as error:
        result.verdict, result.reason = FAIL, f"catalogue: {error}"
    except CaseTimeout as error:
        result.verdict, result.reason = FAIL, f"timeout: {error}"
    except ProtocolError as error:
        result.verdict, result.reason = FAIL, f"protocol violation: {error}"
    except EngineFailure as error:  # an engine process that crashed or reported an error
        result.verdict, result.reason = FAIL, f"engine failure: {error}"
    except BaseException as error:  # noqa: BLE001 - an engine that raises fails its case only
        result.verdict, result.reason = FAIL, _describe_exception(engine.name, error)
    result.duration_s = time.perf_counter() - start
    result.findings = ctx.findings
    result.conditioning = ctx.conditioning
    if result.verdict == PASS:
        verdicts = {f.verdict for f in ctx.findings}
        result.verdict = FAIL if FAIL in verdicts else NEAR_TIE if NEAR_TIE in verdicts else PASS
    return result


def run_cases(
    cases: Iterable[Case],
    engine,
    oracle: Oracle,
    profile: PrecisionProfile,
    timeout: float | None = DEFAULT_CASE_TIMEOUT_S,
    progress: ProgressCallback | None = None,
) -> list[CaseResult]:
    cases = list(cases)
    results = []
    for index, case in enumerate(cases):
        if progress:
            progress(engine.label, oracle.model, index, len(cases), case, None)
        result = run_case(case, engine, oracle, profile, timeout)
        results.append(result)
        if progress:
            progress(engine.label, oracle.model, index, len(cases), case, result)
    return results


def run_matrix(
    engines: list[str],
    models: list[str],
    pattern: str | None = None,
    profile_name: str | None = None,
    timeout: float | None = DEFAULT_CASE_TIMEOUT_S,
    progress: ProgressCallback | None = None,
    on_skip: Callable[[str, str, str], None] | None = None,
    on_done: Callable[[str, str, dict, float], None] | None = None,
    against: str = "reference",
    oracles: dict | None = None,
) -> list[CaseResult]:
    """Every selected case for every (model, engine); unusable engines give "skipped" rows.

    ``against`` is the source of truth (see ``open_oracle``). Cases the
    snapshots do not cover are "skipped", with the reason.
    ``on_skip(engine, model, why)`` hears of engines (or snapshots) that could not
    be used; ``on_done(engine, model, description, seconds)`` of each finished column.
    ``oracles``: oracles already opened (and so validated) by the caller, by model.
    """
    catalogue = load_cases()
    results: list[CaseResult] = []
    for model in models:
        cases = select_cases(catalogue, model, pattern)
        if not cases:
            continue
        try:
            oracle = (oracles or {}).get(model) or open_oracle(model, against)
        except SnapshotError as error:
            for spec in engines:
                if on_skip:
                    on_skip(spec, model, str(error))
                results += _for_all(
                    cases, spec, model, profile_for_model(model, profile_name), SKIPPED, str(error)
                )
            continue
        profile = oracle.default_profile(profile_name)
        uncovered = not_covered(oracle, cases)
        try:
            covered = [c for c in cases if c.id not in uncovered]
            for spec in engines:
                try:
                    engine = (
                        oracle.engine
                        if spec == "reference" and oracle.engine is not None
                        else open_engine(spec, model)
                    )
                except EngineUnavailable as error:
                    if on_skip:
                        on_skip(spec, model, str(error))
                    results += _for_all(cases, spec, model, profile, SKIPPED, str(error))
                    continue
                except Interrupted:
                    raise
                except BaseException as error:  # noqa: BLE001 - one that cannot load fails its cases
                    reason = f"could not open the engine: {_describe_exception(spec, error)}"
                    results += _for_all(covered, spec, model, profile, FAIL, reason)
                    results += _uncovered(cases, uncovered, spec, model, profile)
                    continue
                column = _uncovered(cases, uncovered, engine.name, model, profile)
                start = time.perf_counter()
                try:
                    column += run_cases(covered, engine, oracle, profile, timeout, progress)
                finally:
                    if engine is not oracle.engine:
                        _close(engine)
                order = {c.id: i for i, c in enumerate(cases)}
                results += sorted(column, key=lambda r: order[r.case_id])
                if on_done:
                    on_done(spec, model, _description(engine), time.perf_counter() - start)
        finally:
            oracle.close()
    return results


def open_oracle(model: str, against: str = "reference") -> Oracle:
    """The source of truth for ``model``.

    ``"reference"``: the reference engine, live. ``"snapshots"``: the committed
    golden snapshots of the reference (``conformance/golden``; needs no MLX).
    Anything else: a folder written by ``lmconform snapshot``.
    """
    if against == "reference":
        return ReferenceOracle(model)
    folder = GOLDEN_DIR if against == "snapshots" else Path(against)
    return SnapshotOracle(model, folder)


def not_covered(oracle: Oracle, cases: list[Case]) -> dict[str, str]:
    """The cases ``oracle`` cannot judge (e.g. snapshots without their answers), with why."""
    return {c.id: why for c in cases if (why := oracle.missing(c))}


def _uncovered(cases, uncovered: dict[str, str], engine, model, profile) -> list[CaseResult]:
    return [
        CaseResult(c.id, engine, model, profile.name, SKIPPED, c.about, reason=uncovered[c.id])
        for c in cases
        if c.id in uncovered
    ]


def _for_all(cases, engine, model, profile, verdict, reason) -> list[CaseResult]:
    return [
        CaseResult(c.id, engine, model, profile.name, verdict, c.about, reason=reason)
        for c in cases
    ]


def _close(engine) -> None:
    """Close an engine; one whose ``close`` raises has had its verdicts already."""
    try:
        engine.close()
    except Interrupted:
        raise
    except BaseException:  # noqa: BLE001, S110 - nothing left to judge, the run goes on
        pass


def _description(engine) -> dict:
    try:
        return dict(engine.describe())
    except Interrupted:
        raise
    except BaseException as error:  # noqa: BLE001 - a report line, not a verdict
        return {"version": f"{engine.name} (describe() raised {type(error).__name__})"}


def _describe_exception(engine: str, error: BaseException) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    tail = "".join(lines[-TRACEBACK_LINES:]).rstrip()
    return f"{engine} raised {type(error).__name__}: {error}\n{tail}"
