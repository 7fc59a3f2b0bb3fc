"""Bad engine behaviour is reported as that case's failure, and the run goes on."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from conformance_helpers import dummy_case, dummy_oracle
from mutants import Control

from conformance.runner import FAIL, PASS, UNSUPPORTED, run_case, run_cases, run_matrix
from engines.models import ModelSource
from engines.protocol import TokenEvent, Unsupported

SOURCE = ModelSource("dummy", "builtin")
CASES = ["greedy/hello", "greedy/fox"]


class RaisesMidStream(Control):
    name = "raises"

    def generate(self, request):
        for n, event in enumerate(super().generate(request)):
            if n == 3:
                raise RuntimeError("the engine crashed at token 3")
            yield event


class WrongLengthLogprobs(Control):
    name = "short-vector"

    def event(self, token, logprobs, request, text, from_draft, finish):
        return super().event(token, logprobs[:-7], request, text, from_draft, finish)


class TokenOutOfRange(Control):
    name = "out-of-range"

    def generate(self, request):
        for n, event in enumerate(super().generate(request)):
            yield replace(event, token=self.vocab_size + 5) if n == 2 else event


class NeverStops(Control):
    name = "never-stops"

    def generate(self, request):
        while True:
            yield TokenEvent(token=65, logprob=-0.1)


class Hangs(Control):
    name = "hangs"

    def generate(self, request):
        while True:
            time.sleep(0.01)
        yield  # pragma: no cover


class RefusesEverything(Control):
    name = "refuses"

    def generate(self, request):
        raise Unsupported("this engine refuses on principle")


def run(engine_cls, case_ids=CASES, timeout=60.0):
    oracle = dummy_oracle()
    engine = engine_cls(SOURCE)
    cases = [dummy_case(c) for c in case_ids]
    return run_cases(cases, engine, oracle, oracle.default_profile(), timeout=timeout)


@pytest.mark.parametrize(
    "engine_cls, complaint",
    [
        (RaisesMidStream, "raises raised RuntimeError: the engine crashed at token 3"),
        (WrongLengthLogprobs, "logprob vector has 253 entries; the vocabulary has 260"),
        (TokenOutOfRange, "token 265 at step 2 is outside the vocabulary [0, 260)"),
        (NeverStops, "more than max_tokens=24 events"),
    ],
)
def test_a_misbehaving_engine_fails_each_case_with_the_error_and_the_run_continues(
    engine_cls, complaint
):
    results = run(engine_cls)
    assert [r.case_id for r in results] == CASES  # every case ran, none was lost
    for result in results:
        assert result.verdict == FAIL
        assert complaint in result.reason
    # The same oracle and catalogue still serve a well-behaved engine afterwards.
    assert {r.verdict for r in run(Control)} == {PASS}


def test_a_hanging_engine_is_stopped_by_the_case_time_limit():
    start = time.perf_counter()
    results = run(Hangs, timeout=0.5)
    assert time.perf_counter() - start < 10
    assert [r.verdict for r in results] == [FAIL, FAIL]
    assert all("timeout" in r.reason for r in results)


def test_an_engine_raising_unsupported_makes_the_case_unsupported():
    results = run(RefusesEverything)
    assert [r.verdict for r in results] == [UNSUPPORTED, UNSUPPORTED]
    assert "refuses on principle" in results[0].reason


def test_missing_capabilities_make_cases_unsupported_not_failed():
    class GreedyOnly(Control):
        name = "greedy-only"
        capabilities = frozenset({"greedy", "logprobs", "stream"})

    oracle = dummy_oracle()
    result = run_case(
        dummy_case("batch/needle"), GreedyOnly(SOURCE), oracle, oracle.default_profile()
    )
    assert result.verdict == UNSUPPORTED and "lacks capability batch" in result.reason


def test_results_carry_findings_and_conditioning():
    (result,) = run(Control, ["greedy/hello"])
    assert (
        result.verdict == PASS
        and result.findings
        and result.findings[0].check == "engine vs reference"
    )
    assert result.conditioning is not None and not result.conditioning.ill_conditioned
    assert result.conditioning.min_margin > result.conditioning.epsilon


def test_an_engine_that_cannot_load_fails_its_cases_in_the_matrix():
    results = run_matrix(
        ["test_conformance_runner:BrokenLoader"], ["dummy"], pattern="greedy/hello"
    )
    assert [r.verdict for r in results] == [FAIL]
    assert (
        "could not open the engine" in results[0].reason
        and "weights are corrupt" in results[0].reason
    )


class BrokenLoader(Control):
    name = "broken-loader"
    model_formats = ("builtin",)

    def load(self, source):
        raise OSError("weights are corrupt")


def test_every_oracle_implements_the_whole_oracle_contract():
    """The runner and the checks use only ``Oracle``: each implementation must have all of it
    (the catalogue's four questions included)."""
    import inspect

    from conformance.catalogue import Oracle as CatalogueOracle
    from conformance.oracle import Oracle
    from conformance.snapshots.oracle import SnapshotOracle
    from conformance.snapshots.recorder import EngineOracle, RecordingOracle

    members = {
        name
        for protocol in (Oracle, CatalogueOracle)
        for name, value in vars(protocol).items()
        if not name.startswith("_") and inspect.isfunction(value)
    } | set(Oracle.__annotations__)
    assert {"answer", "continuation", "missing", "token_text", "encode", "engine"} <= members
    snapshots = SnapshotOracle("dummy")
    oracles = [
        dummy_oracle(),
        snapshots,
        RecordingOracle(snapshots),
        EngineOracle(snapshots, Control(SOURCE)),
    ]
    for oracle in oracles:
        lacking = sorted(name for name in members if not hasattr(oracle, name))
        assert lacking == [], type(oracle).__name__
    case = dummy_case("greedy/hello")
    assert [o.missing(case) for o in oracles] == [None, None, None, None]
