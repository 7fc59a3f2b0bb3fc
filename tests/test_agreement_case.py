"""The ``agreement`` case kind: J6 judged inside ``check``, live and against golden snapshots.

Engines are the reference, the reference with deterministic logit noise, one whose
``score`` forgets the text before each 64-token chunk (``agreement_engines.py``),
and engines lacking what the kind needs; all on ``dummy``, one test on
``smollm2-135m``.
"""

from __future__ import annotations

import pytest
from agreement_engines import (
    LargeNoise,
    NoScore,
    NoTopLogprobs,
    ScoreChunksForgetContext,
    SmallNoise,
)
from conformance_helpers import dummy_oracle, reference_oracle

from conformance import catalogue
from conformance.agreement import load_texts
from conformance.catalogue import CatalogueError, agreement_cases, load_cases, select_cases
from conformance.comparator import FAIL, PASS
from conformance.runner import UNSUPPORTED, run_case, run_cases
from conformance.snapshots.oracle import SnapshotOracle
from conformance.snapshots.store import case_definition
from engines.adapters.reference import ReferenceEngine
from engines.models import ModelSource

SOURCE = ModelSource("dummy", "builtin")
SPEC = {"model": [{"name": "dummy", "positions": 128}]}


def agreement_of(model: str):
    return [c for c in select_cases(load_cases(), model) if c.kind == "agreement"]


def judged(engine, oracle, case):
    return run_case(case, engine, oracle, oracle.default_profile())


# -- the cases, generated from the shipped texts --------------------------------------------


def test_one_case_per_plain_text_on_dummy_and_the_prose_on_smollm2():
    texts = {t.name.split(".")[0]: t.content for t in load_texts()}
    dummy = {c.id: c for c in agreement_of("dummy")}
    assert set(dummy) == {"agreement/code", "agreement/prose", "agreement/utf8"}
    for case in dummy.values():
        name = case.params["text"]
        assert case.request == {"prompt": texts[name]} and case.params["positions"] == 128
    assert isinstance(texts["chat"], list)  # rendered by a chat template: not a case
    assert [c.id for c in agreement_of("smollm2-135m")] == ["agreement/smollm2_prose"]


def test_a_changed_text_makes_its_snapshot_out_of_date(monkeypatch):
    case = next(c for c in agreement_cases(SPEC) if c.id == "agreement/prose")
    edited = [
        type(t)(t.name, t.content + " One more sentence.") if t.name == "prose" else t
        for t in load_texts()
    ]
    monkeypatch.setattr(catalogue, "load_texts", lambda: edited)
    changed = next(c for c in agreement_cases(SPEC) if c.id == "agreement/prose")
    assert case_definition(changed) != case_definition(case)
    assert "out of date" in SnapshotOracle("dummy").missing(changed)


def test_unknown_texts_and_conflicting_budgets_are_catalogue_errors():
    with pytest.raises(CatalogueError, match=r"no plain text \['chat'\]"):
        agreement_cases({"model": [{"name": "dummy", "positions": 8, "texts": ["chat"]}]})
    two = [{"name": "dummy", "positions": 8}, {"name": "dummy-qwen2", "positions": 9}]
    with pytest.raises(CatalogueError, match="other positions"):
        agreement_cases({"model": two})
    same = agreement_cases({"model": [{**two[0]}, {**two[1], "positions": 8}]})
    assert {tuple(c.models) for c in same} == {("dummy", "dummy-qwen2")}


# -- verdicts ---------------------------------------------------------------------------------


def test_the_reference_agrees_exactly_at_every_position():
    oracle = dummy_oracle()
    for case in agreement_of("dummy"):
        result = judged(oracle.engine, oracle, case)
        (finding,) = result.findings
        assert result.verdict == PASS, finding.summary
        assert finding.summary.startswith(f"pass: 128 positions of {case.params['text']} ")
        assert "KL mean 0, p99 0, max 0; top-1 100.0%" in finding.summary


def test_float32_sized_noise_passes_and_large_noise_fails_naming_kl():
    oracle = dummy_oracle()
    for case in agreement_of("dummy"):
        assert judged(SmallNoise(SOURCE), oracle, case).verdict == PASS
        result = judged(LargeNoise(SOURCE), oracle, case)
        (finding,) = result.failures()
        # Limits in the profile table's order; the first one names the worst position.
        assert finding.summary.startswith("FAIL: KL mean "), finding.summary
        assert "> 1e-06" in finding.summary and "(profile fp32)" in finding.summary
        assert "KL mean is worst here (KL " in finding.details


def test_a_score_bug_past_the_first_64_positions_fails_only_the_agreement_cases():
    # The engine generates as the reference does (the greedy group, up to 168 positions
    # of context, passes) and scores as it does up to 64 tokens (the score cases pass):
    # only the agreement cases go further. (The whole dummy catalogue passes too; 3 min.)
    oracle = dummy_oracle()
    given = [
        c
        for c in select_cases(load_cases(), "dummy")
        if c.kind in ("score", "agreement") or c.group == "greedy"
    ]
    results = run_cases(given, ScoreChunksForgetContext(SOURCE), oracle, oracle.default_profile())
    failed = {r.case_id: r for r in results if r.verdict == FAIL}
    assert set(failed) == {c.id for c in agreement_of("dummy")}
    for result in failed.values():
        (finding,) = result.failures()
        assert "top-1 agreement" in finding.summary, finding.summary
        d = finding.diagnostic
        # The worst position lies past the chunk: predicted without the text before it.
        assert d.kind == "agreement" and d.step > ScoreChunksForgetContext.chunk
        assert d.expected_token != d.actual_token
        assert len(d.expected_top) == len(d.actual_top) == 5
        assert f"step {d.step}, after {d.context!r}" in finding.details
        assert "reference top-5: " in finding.details


def test_the_chunk_bug_is_invisible_within_one_chunk():
    # The same engine on the first 64 positions only: the cases' budget is what finds it.
    oracle = dummy_oracle()
    short = agreement_cases({"model": [{"name": "dummy", "positions": 63}]})
    for case in short:
        assert judged(ScoreChunksForgetContext(SOURCE), oracle, case).verdict == PASS


def outcome(result):
    """A verdict as replay must reproduce it: the limits broken (not their last digits, as
    snapshots round logprobs to 1e-6) and the worst position."""
    limits = [f.summary.split(" (profile")[0].split("; ") for f in result.findings]
    names = [[" ".join(w for w in b.split() if not w[0].isdigit()) for b in f] for f in limits]
    steps = [f.diagnostic.step if f.diagnostic else None for f in result.findings]
    return result.verdict, names, steps, result.reason


@pytest.mark.parametrize(
    "engine",
    [SmallNoise, LargeNoise, ScoreChunksForgetContext, NoScore, NoTopLogprobs],
    ids=lambda e: e.__name__,
)
def test_against_the_golden_snapshots_the_verdicts_are_the_live_ones(engine):
    live, golden = dummy_oracle(), SnapshotOracle("dummy")
    for case in agreement_of("dummy"):
        assert golden.missing(case) is None
        expected = outcome(judged(engine(SOURCE), live, case))
        assert outcome(judged(engine(SOURCE), golden, case)) == expected, case.id


def test_against_the_golden_snapshots_the_reference_passes():
    golden = SnapshotOracle("dummy")
    for case in agreement_of("dummy"):
        assert judged(dummy_oracle().engine, golden, case).verdict == PASS


def test_an_engine_without_score_or_logprobs_is_unsupported_and_without_top_lists_fails():
    oracle = dummy_oracle()
    case = agreement_of("dummy")[0]
    result = judged(NoScore(SOURCE), oracle, case)
    assert (result.verdict, result.reason) == (UNSUPPORTED, "no-score lacks capability score")

    class NoLogprobs(ReferenceEngine):
        name = "no-logprobs"
        capabilities = ReferenceEngine.capabilities - {"logprobs"}

    result = judged(NoLogprobs(SOURCE), oracle, case)
    assert (result.verdict, result.reason) == (UNSUPPORTED, "no-logprobs lacks capability logprobs")
    result = judged(NoTopLogprobs(SOURCE), oracle, case)
    assert result.verdict == FAIL and result.reason.startswith("protocol violation")


@pytest.mark.smollm
def test_on_smollm2_the_reference_passes_live_and_against_its_snapshot():
    live = reference_oracle("smollm2-135m")
    golden = SnapshotOracle("smollm2-135m")
    (case,) = agreement_of("smollm2-135m")
    assert golden.missing(case) is None
    for oracle in (live, golden):
        result = judged(live.engine, oracle, case)
        assert result.verdict == PASS, result.findings
        assert result.findings[0].summary.startswith("pass: 128 positions of prose ")


def test_a_failing_agreement_case_reports_the_worst_position_field_by_field():
    """Every field of the finding, recomputed here from both sides' scores with the
    agreement functions: which position, the text before it, both top tokens and lists."""
    from conformance.agreement import breaches, position, summarize, worst_position
    from conformance.catalogue import build_request
    from conformance.oracle import REFERENCE_TOP
    from engines.protocol import ScoreRequest

    oracle = dummy_oracle()
    engine = ScoreChunksForgetContext(SOURCE)
    case = next(c for c in agreement_of("dummy") if c.id == "agreement/code")
    profile = oracle.default_profile()
    (finding,) = judged(engine, oracle, case).failures()

    tokens = build_request(case.request, oracle).prompt[: case.params["positions"] + 1]
    request = ScoreRequest(prompt=tokens[:1], continuation=tokens[1:], top_logprobs=REFERENCE_TOP)
    expected = oracle.answer_score(request).events
    actual = engine.score(request)
    measured = [
        position("code", i + 1, e.top_logprobs, a.top_logprobs, profile.tie_epsilon)
        for i, (e, a) in enumerate(zip(expected, actual, strict=True))
    ]
    broken = breaches(summarize(measured), profile.agreement)
    worst = worst_position(measured, broken[0].metric)
    ref, eng = expected[worst.index - 1], actual[worst.index - 1]
    show = oracle.token_text

    assert finding.check == "agreement vs reference"
    assert finding.summary == (
        f"FAIL: {'; '.join(map(str, broken))} (profile fp32); worst position {worst.index}"
    )
    d = finding.diagnostic
    assert (d.kind, d.step) == ("agreement", worst.index)
    assert d.context == oracle.decode(tokens[max(0, worst.index - 12) : worst.index])
    assert (d.expected_token, d.actual_token) == (ref.top_logprobs[0][0], eng.top_logprobs[0][0])
    assert (d.expected_text, d.actual_text) == (show(d.expected_token), show(d.actual_token))
    for listed, event in ((d.expected_top, ref), (d.actual_top, eng)):
        assert [(r.token, r.text, r.logprob) for r in listed] == [
            (t, show(t), lp) for t, lp in event.top_logprobs[:5]
        ]
    lines = finding.details.splitlines()
    assert lines[0] == finding.summary
    assert lines[1].startswith(f"  {len(measured)} positions of code (top {REFERENCE_TOP} per side)")
    assert f"  {engine.name} top-5: " in finding.details
    assert f"the text goes on with {show(tokens[worst.index])!r}" in d.detail


def test_a_passing_agreement_case_is_one_finding_that_passes():
    (finding,) = judged(dummy_oracle().engine, dummy_oracle(), agreement_of("dummy")[0]).findings
    assert (finding.check, finding.verdict) == ("agreement vs reference", PASS)
    assert finding.summary.startswith("pass: 128 positions of ")
