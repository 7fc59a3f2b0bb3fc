"""conformance/checks/validation.py (kind ``request_validation``) pinned down on ``dummy``:
every invalid request of the catalogue's case is refused by the reference, and an engine
that answers one in any other way (serving it, answering ``Unsupported``, crashing) fails
that probe with an account naming engine, probe and what happened; an engine refusing the
valid request too fails the case; a probe needing a capability the engine lacks is not
sent. Over JSON lines (``cmd:``, the worked example engine) the process-only probe and the
misspelt sampler field are sent as well.

Engines are the unbroken reference wrapper (``Control``) and small subclasses of it with one
deliberate difference; the ``cmd:`` engine is started once for the module (about 2 s)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conformance_helpers import dummy_case, dummy_oracle, findings
from conformance_helpers import run_dummy_case as run
from mutants import Control

from conformance.checks.validation import Refusal, record, refusal, with_unknown_sampler_field
from conformance.comparator import FAIL, PASS
from engines.models import ModelSource
from engines.protocol import SamplerSettings, TokenEvent, Unsupported
from engines.registry import open_engine
from engines.serialization import dumps

SOURCE = ModelSource("dummy", "builtin")
CASE = "validation/invalid_requests"
VALID = "the valid request vs reference"
# The catalogue's probes, as labelled, and what the reference says of each.
REFUSED = {
    "max_tokens=0": "max_tokens must be at least 1, got 0",
    "prompt_tokens=[]": "the prompt is empty",
    "stop_tokens=[1000000]": "token 1000000 is outside the vocabulary [0, 260)",
    "stop_sequences=[[]]": "an empty stop sequence",
    "top_logprobs=-1": "top_logprobs must not be negative, got -1",
    'sampler={"temp":1.0,"top_p":1.5}': "top_p must lie in [0, 1], got 1.5",
    'sampler={"temp":-0.5}': "temp must not be negative, got -0.5",
}
PROCESS_ONLY = "prompt_tokens=[72, 1000000]"
UNKNOWN = "unknown field sampler.temperature"


def with_params(**params):
    case = dummy_case(CASE)
    return replace(case, params={**case.params, **params})


def summaries(result) -> dict[str, str]:
    return {f.check: f.summary for f in result.findings}


def is_valid(request) -> bool:
    try:
        Control(SOURCE).refuse_invalid(request)
    except ValueError:
        return False
    return True


class Answering(Control):
    """The reference wrapper, but an invalid request is answered by ``answer_invalid``."""

    def generate(self, request):
        if is_valid(request):
            return super().generate(request)
        return self.answer_invalid(request)


class ServesInvalid(Answering):
    name = "serves-invalid"

    def answer_invalid(self, request):
        yield TokenEvent(72, -1.0)
        yield TokenEvent(105, -1.0, finish_reason="length")


class AnswersUnsupported(Answering):
    name = "answers-unsupported"

    def answer_invalid(self, request):
        raise Unsupported("not served here")


class Crashes(Answering):
    name = "crashes"

    def answer_invalid(self, request):
        raise RuntimeError("index out of range")


class RefusesEverything(Control):
    name = "refuses-everything"

    def generate(self, request):
        raise ValueError("no")


class NoisyRefusal(Answering):
    """Refuses as the reference does, the reason followed by the stderr report a JSON-lines
    engine's error carries when the engine wrote nothing to stderr."""

    name = "noisy-refusal"

    def answer_invalid(self, request):
        try:
            self.refuse_invalid(request)
        except ValueError as error:
            raise ValueError(f"{error}; the engine wrote nothing to stderr") from None


class GreedyOnly(Control):
    name = "greedy-only"
    capabilities = frozenset(Control.capabilities - {"sampling", "logit_bias"})


# -- Python engines ---------------------------------------------------------------------------


def test_the_reference_refuses_every_probe_and_serves_the_valid_request():
    result = run(CASE, Control(SOURCE))
    # A Python engine gets neither the process-only probe nor the unknown field.
    assert findings(result) == [(VALID, PASS)] + [(label, PASS) for label in REFUSED]
    assert result.verdict == PASS
    assert summaries(result) == {
        VALID: "pass: 4 identical tokens, finish_reason 'length', max logprob |diff| 0",
        **{label: f"pass: refused: {why}" for label, why in REFUSED.items()},
    }


def test_an_engine_serving_an_invalid_request_fails_that_probe_with_the_event_count():
    result = run(CASE, ServesInvalid(SOURCE))
    assert result.verdict == FAIL
    assert findings(result) == [(VALID, PASS)] + [(label, FAIL) for label in REFUSED]
    assert summaries(result)["max_tokens=0"] == (
        "FAIL: serves-invalid, max_tokens=0: accepted it silently: answered 2 events"
    )


def test_answering_unsupported_to_an_invalid_request_fails():
    result = run(CASE, AnswersUnsupported(SOURCE))
    assert result.verdict == FAIL
    assert findings(result) == [(VALID, PASS)] + [(label, FAIL) for label in REFUSED]
    assert summaries(result)["top_logprobs=-1"] == (
        "FAIL: answers-unsupported, top_logprobs=-1: answered 'unsupported' (not served here); "
        "an invalid request is a bad one"
    )


def test_crashing_on_an_invalid_request_fails_and_names_the_exception():
    result = run(CASE, Crashes(SOURCE))
    assert result.verdict == FAIL
    assert findings(result) == [(VALID, PASS)] + [(label, FAIL) for label in REFUSED]
    assert summaries(result)['sampler={"temp":-0.5}'] == (
        'FAIL: crashes, sampler={"temp":-0.5}: failed with RuntimeError: index out of range'
    )


def test_an_engine_refusing_the_valid_request_too_fails_the_case():
    result = run(CASE, RefusesEverything(SOURCE))
    assert result.verdict == FAIL
    assert result.findings == []
    assert result.reason.startswith("refuses-everything raised ValueError: no\n")


def test_a_refusal_is_shown_by_its_first_line_without_the_stderr_tail():
    result = run(CASE, NoisyRefusal(SOURCE))
    assert result.verdict == PASS
    assert (
        summaries(result)["max_tokens=0"] == "pass: refused: max_tokens must be at least 1, got 0"
    )
    assert all("\n" not in s and "; the engine" not in s for s in summaries(result).values())


def test_record_keeps_a_failures_whole_account_and_a_refusals_first_line():
    ctx = type("Ctx", (), {})()
    ctx.engine_name, ctx.added = "e", []
    ctx.add = lambda *finding: ctx.added.append(finding)
    ctx.fail = lambda check, summary: ctx.added.append((check, FAIL, summary))
    account = "bad; the engine wrote nothing to stderr"
    record(ctx, "p", Refusal(True, account))
    crash = "crashed; the engine's stderr ends with:\n  | Traceback"
    record(ctx, "q", Refusal(False, crash))
    record(ctx, "r", Refusal(True, "first\nsecond"))
    record(ctx, "s", Refusal(True, "refused: no; the engine's stderr ends with:\n  | warning"))
    assert ctx.added == [
        ("p", PASS, "pass: bad"),
        ("q", FAIL, f"FAIL: e, q: {crash}"),
        ("r", PASS, "pass: first"),
        ("s", PASS, "pass: refused: no"),  # the stderr it wrote is not part of the refusal
    ]


def test_refusal_tells_each_way_of_answering_apart():
    request = replace(_base_request(), max_tokens=0)
    assert refusal(ServesInvalid(SOURCE), request) == Refusal(
        False, "accepted it silently: answered 2 events"
    )
    assert refusal(RefusesEverything(SOURCE), request) == Refusal(True, "refused: no")
    assert refusal(AnswersUnsupported(SOURCE), request) == Refusal(
        False, "answered 'unsupported' (not served here); an invalid request is a bad one"
    )
    assert refusal(Crashes(SOURCE), request) == Refusal(
        False, "failed with RuntimeError: index out of range"
    )


def test_a_probe_needing_a_capability_the_engine_lacks_is_not_sent_and_the_next_one_is():
    case = with_params(
        invalid=[
            {"sampler": {"temp": -0.5}, "processors": {"logit_bias": {"72": 1.0}}},
            {"max_tokens": 0},
        ]
    )
    result = run(case, GreedyOnly(SOURCE))
    probe = 'sampler={"temp":-0.5}, processors={"logit_bias":{"72":1.0}}'
    assert findings(result) == [(VALID, PASS), (probe, PASS), ("max_tokens=0", PASS)]
    assert summaries(result)[probe] == "pass: not sent (it needs logit_bias, sampling)"
    assert summaries(result)["max_tokens=0"] == f"pass: refused: {REFUSED['max_tokens=0']}"


def test_the_catalogue_probes_needing_sampling_are_not_sent_to_a_greedy_engine():
    result = run(CASE, GreedyOnly(SOURCE))
    shown = summaries(result)
    assert [label for label, _ in findings(result)] == [VALID, *REFUSED]
    assert shown['sampler={"temp":-0.5}'] == "pass: not sent (it needs sampling)"
    assert shown['sampler={"temp":1.0,"top_p":1.5}'] == "pass: not sent (it needs sampling)"


def test_an_unknown_sampler_field_is_carried_with_its_value_in_the_json():
    base = _base_request()
    request = with_unknown_sampler_field(base, {"temperature": 0.7, "beam": 2})
    sampler = request.sampler
    assert isinstance(sampler, SamplerSettings)
    assert (sampler.temperature, sampler.beam) == (0.7, 2)
    types = {f.name: f.type for f in dataclasses.fields(sampler)}
    assert (types["temperature"], types["beam"]) == (float, int)
    assert {k: getattr(sampler, k) for k in vars(base.sampler)} == vars(base.sampler)
    assert replace(request, sampler=base.sampler) == base
    sent = json.loads(dumps(request))["sampler"]
    assert (sent["temperature"], sent["beam"]) == (0.7, 2)
    assert type(sampler).__name__ == "SamplerSettingsWithUnknownField"


def _base_request():
    from conformance.catalogue import build_request

    return build_request(dummy_case(CASE).request, dummy_oracle())


# -- an engine over JSON lines ----------------------------------------------------------------


@pytest.fixture(scope="module")
def jsonl():
    engine = open_engine(f"cmd:{sys.executable} -m conformance.examples.jsonl_engine", "dummy")
    yield engine
    engine.close()


def refused_over_jsonl(why: str) -> str:
    return (
        r"^pass: refused: the engine answered event of request r\d+ "
        r"\(request timeout [\d.]+ s\) with an error \(bad_request\): "
        f"{re.escape(why)}$"
    )


def test_a_jsonl_engine_also_gets_the_process_only_probe_and_the_unknown_field(jsonl):
    result = run(CASE, jsonl)
    assert result.verdict == PASS
    assert findings(result) == [(VALID, PASS)] + [
        (label, PASS) for label in [*REFUSED, PROCESS_ONLY, UNKNOWN]
    ]
    shown = summaries(result)
    for label, why in REFUSED.items():
        # The stderr tail the engine's error carries is cut off.
        assert re.match(refused_over_jsonl(why), shown[label]), shown[label]
    assert re.match(refused_over_jsonl(REFUSED["stop_tokens=[1000000]"]), shown[PROCESS_ONLY])
    assert re.match(
        refused_over_jsonl(
            "generate.sampler: unknown field(s) ['temperature']; known: ['min_p', "
            "'min_tokens_to_keep', 'seed', 'temp', 'top_k', 'top_p']"
        ),
        shown[UNKNOWN],
    )


def test_a_case_without_process_only_probes_or_unknown_field_sends_only_its_own(jsonl):
    case = with_params(invalid=[{"max_tokens": 0}])
    del case.params["process_only"], case.params["unknown_field"]
    result = run(case, jsonl)
    assert findings(result) == [(VALID, PASS), ("max_tokens=0", PASS)]


def test_a_jsonl_engine_dropping_the_unknown_field_fails_it():
    lenient = Path(__file__).with_name("lenient_jsonl_engine.py")
    engine = open_engine(f"cmd:{sys.executable} {lenient}", "dummy")
    try:
        result = run(with_params(invalid=[]), engine)
    finally:
        engine.close()
    assert findings(result) == [(VALID, PASS), (PROCESS_ONLY, PASS), (UNKNOWN, FAIL)]
    name = engine.name
    assert summaries(result)[UNKNOWN] == (
        f"FAIL: {name}, {UNKNOWN}: accepted it silently: answered 4 events"
    )
