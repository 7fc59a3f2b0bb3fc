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
and reports progress through a callback. It runs ``Unit``s (a model's cases on
each engine) in a ``MatrixSession``; ``conformance.parallel`` runs smaller units
(a model's case group) in worker processes, each with a session of its own.
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
from conformance.profiles import PrecisionProfile, profile_for_engine, profile_for_model
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


@dataclass(frozen=True)
class Unit:
    """A piece of a matrix run: some of one model's cases, on each engine in turn.

    ``column`` is every case selected for the model (in catalogue order): progress
    counts a case's place in it, so that a unit holding part of a column reports the
    same "k/n" as a serial run.
    """

    model: str
    engines: tuple[str, ...]
    cases: tuple[str, ...]  # case ids
    column: tuple[str, ...]


@dataclass
class EngineRun:
    """One engine's results on one unit's cases."""

    engine: str  # the spec
    model: str
    results: list[CaseResult]
    skipped: str = ""  # why the engine, or the model's snapshots, could not be used
    description: dict | None = None  # what the engine says of itself, when it ran
    seconds: float = 0.0


def plan_units(
    engines: list[str], models: list[str], pattern: str | None = None, by_group: bool = False
) -> list[Unit]:
    """The units of a matrix run, in the order a serial run takes them: one per model,
    or with ``by_group`` one per model and case group (``greedy/...``, ``combo/...``)."""
    catalogue = load_cases()
    units = []
    for model in models:
        column = tuple(c.id for c in select_cases(catalogue, model, pattern))
        if not by_group:
            units += [Unit(model, tuple(engines), column, column)] if column else []
            continue
        groups: dict[str, list[str]] = {}
        for case_id in column:
            groups.setdefault(case_id.split("/", 1)[0], []).append(case_id)
        units += [Unit(model, tuple(engines), tuple(ids), column) for ids in groups.values()]
    return units


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
    session = MatrixSession(against, profile_name, timeout, oracles, keep_engines=False)
    results: list[CaseResult] = []
    try:
        for unit in plan_units(engines, models, pattern):
            for run in session.run(unit, progress):
                if run.skipped and on_skip:
                    on_skip(run.engine, run.model, run.skipped)
                if run.description is not None and on_done:
                    on_done(run.engine, run.model, run.description, run.seconds)
                results += run.results
    finally:
        session.close()
    return results


class MatrixSession:
    """Runs units, keeping what they open for the next one: the oracle of the current
    model and, with ``keep_engines``, its engines (a ``check -j`` worker loads each
    once); without, each engine is closed after its part of the unit, as soon as
    possible. Moving on to another model closes the previous model's oracle and engines.
    """

    def __init__(
        self,
        against: str = "reference",
        profile_name: str | None = None,
        timeout: float | None = DEFAULT_CASE_TIMEOUT_S,
        oracles: dict | None = None,
        keep_engines: bool = True,
    ):
        self.against = against
        self.profile_name = profile_name
        self.timeout = timeout
        self.given = dict(oracles or {})
        self.keep_engines = keep_engines
        self.cases = {c.id: c for c in load_cases()}
        self.model: str | None = None
        self.oracle: Oracle | str | None = None  # a string: why there is none
        self.uncovered: dict[str, str] = {}
        self.engines: dict[str, object] = {}  # spec -> engine, or why it cannot open

    def run(self, unit: Unit, progress: ProgressCallback | None = None):
        """Yields each engine's ``EngineRun`` on the unit's cases, in ``unit.engines`` order."""
        self._enter(unit.model)
        cases = [self.cases[i] for i in unit.cases]
        if isinstance(self.oracle, str):
            profile = profile_for_model(unit.model, self.profile_name)
            for spec in unit.engines:
                skipped = _for_all(cases, spec, unit.model, profile, SKIPPED, self.oracle)
                yield EngineRun(spec, unit.model, skipped, skipped=self.oracle)
            return
        oracle = self.oracle
        profile = oracle.default_profile(self.profile_name)
        covered_column = [i for i in unit.column if i not in self.uncovered]
        place = {case_id: index for index, case_id in enumerate(covered_column)}

        def in_column(engine, model, index, total, case, result) -> None:
            progress(engine, model, place[case.id], len(covered_column), case, result)

        covered = [c for c in cases if c.id not in self.uncovered]
        order = {case_id: index for index, case_id in enumerate(unit.column)}
        for spec in unit.engines:
            engine = self._engine(spec)
            if isinstance(engine, EngineUnavailable):
                skipped = _for_all(cases, spec, unit.model, profile, SKIPPED, str(engine))
                yield EngineRun(spec, unit.model, skipped, skipped=str(engine))
                continue
            if isinstance(engine, str):  # it raised while opening: it fails its cases
                column = _for_all(covered, spec, unit.model, profile, FAIL, engine)
                column += _uncovered(cases, self.uncovered, spec, unit.model, profile)
                yield EngineRun(spec, unit.model, sorted(column, key=lambda r: order[r.case_id]))
                continue
            judged = profile_for_engine(profile, engine, self.profile_name)
            column = _uncovered(cases, self.uncovered, engine.name, unit.model, judged)
            start = time.perf_counter()
            try:
                column += run_cases(
                    covered, engine, oracle, judged, self.timeout, progress and in_column
                )
            finally:
                if not self.keep_engines:
                    self._close_engine(spec)
            seconds = time.perf_counter() - start
            yield EngineRun(
                spec,
                unit.model,
                sorted(column, key=lambda r: order[r.case_id]),
                description=_description(engine),
                seconds=seconds,
            )

    def close(self) -> None:
        """Close every engine and the oracle (even when one of them raises)."""
        try:
            for spec in list(self.engines):
                self._close_engine(spec)
        finally:
            oracle, self.oracle, self.model = self.oracle, None, None
            if oracle is not None and not isinstance(oracle, str):
                oracle.close()

    def _enter(self, model: str) -> None:
        if model == self.model:
            return
        self.close()
        self.model = model
        try:
            self.oracle = self.given.get(model) or open_oracle(model, self.against)
        except SnapshotError as error:
            self.oracle = str(error)
        self.uncovered = (
            {} if isinstance(self.oracle, str)
            else not_covered(self.oracle, [c for c in self.cases.values() if model in c.models])
        )

    def _engine(self, spec: str):
        """The opened engine; ``EngineUnavailable`` if it cannot be used, or a string saying
        why opening it raised (the model's oracle is open)."""
        if spec not in self.engines:
            oracle = self.oracle
            try:
                self.engines[spec] = (
                    oracle.engine
                    if spec == "reference" and oracle.engine is not None
                    else open_engine(spec, self.model)
                )
            except EngineUnavailable as error:
                self.engines[spec] = error
            except Interrupted:
                raise
            except BaseException as error:  # noqa: BLE001 - one that cannot load fails its cases
                self.engines[spec] = f"could not open the engine: {_describe_exception(spec, error)}"
        return self.engines[spec]

    def _close_engine(self, spec: str) -> None:
        engine = self.engines.pop(spec)
        oracle_engine = getattr(self.oracle, "engine", None)
        if not isinstance(engine, str | EngineUnavailable) and engine is not oracle_engine:
            _close(engine)


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
