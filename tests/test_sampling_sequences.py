"""Sampling judged over whole generations, and the logprobs reported while sampling.

The catalogue's multi-token ``distribution`` cases without a draft
(``sampling/sequence_*``) judge every token of every generation against the
reference's distribution at the prefix it followed (``judge_sequences``); every
``distribution`` case also compares the logprob reported with each sampled token
with the reference's (``conformance/sampling/paths.py``). Here, on batched draws of the
reference and of the broken samplers of ``sampler_mutants.py``:

- the reference passes each sequence case (false alarm at most 0.001 per case: 0.002);
- a sampler that is right at the first step and wrong later passes every one-token case
  (its draws there are the reference's, token for token) and fails its sequence case;
- an engine reporting the tempered, filtered distribution's logprobs draws the
  reference's tokens (so support and frequencies pass) and fails ``sampled logprobs``
  (deterministic: no false alarm);
- through an adapter (``lmconform check``'s path) the finding is reported.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conformance_helpers import dummy_oracle
from mutants import Control
from sampler_mutants import REPORT_MUTANTS, SEQUENCE_MUTANTS

from conformance.catalogue import load_cases
from conformance.checks.sampling import (
    judge_generations,
    reference_logprobs,
    sampling_plan,
)
from conformance.profiles import PROFILES
from conformance.runner import FAIL, PASS, run_case
from conformance.sampling.draws import reference_draw, reference_generation_draw
from conformance.sampling.paths import compare_path_logprobs
from conformance.sampling.stats import (
    DEFAULT_ALPHA,
    CellDeviation,
    FitResult,
    monte_carlo_p_value,
)
from engines.models import ModelSource

FP32 = PROFILES["fp32"]
SOURCE = ModelSource("dummy", "builtin")
LOGPROB_MUTANT = "logprobs after temperature and filters"
CASES = {c.id: c for c in load_cases() if c.kind == "distribution" and c.models == ["dummy"]}
SEQUENCE = [i for i, c in CASES.items() if c.request["max_tokens"] > 1 and "draft" not in c.request]
NEXT_TOKEN = [i for i, c in CASES.items() if c.request["max_tokens"] == 1]


@pytest.fixture(scope="module")
def oracle():
    return dummy_oracle()


def judged(case_id, oracle, seed_set=0, **draw_options):
    plan = sampling_plan(CASES[case_id], oracle)
    logprobs_at = reference_logprobs(oracle.answer, oracle.vocab_size, plan.request)
    draw = reference_generation_draw(oracle.engine.model, **draw_options)
    return plan, judge_generations(plan, logprobs_at, draw, FP32, oracle.token_text, None, seed_set)


def test_the_catalogue_has_sequence_cases():
    assert sorted(SEQUENCE) == ["sampling/sequence_temperature", "sampling/sequence_top_p"]


@pytest.mark.parametrize("case_id", SEQUENCE)
def test_reference_passes_each_sequence_case(oracle, case_id):
    plan, (verdict, paths) = judged(case_id, oracle)
    assert verdict.passed, verdict.diagnostic
    tested = [r.context for r in verdict.results if r.tested]
    assert sum("position" in label for label in tested) == plan.length - 1
    # Its reported logprobs are the teacher-forced reference's (a batch of rows sums in
    # another order than one row: up to 1e-5 apart).
    assert [p.compared for p in paths] == [plan.n_draws * plan.length]
    assert all(not p.mismatches and p.largest_difference < 1e-4 for p in paths), [
        (len(p.mismatches), p.largest_difference) for p in paths
    ]


@pytest.mark.parametrize(
    ("mutant", "case_id"),
    [
        ("temperature only at the first step", "sampling/sequence_temperature"),
        ("top-p mask kept from the first step", "sampling/sequence_top_p"),
    ],
)
def test_a_sampler_wrong_after_the_first_step_passes_one_token_cases_and_fails_its_sequence_case(
    oracle, mutant, case_id
):
    factory = SEQUENCE_MUTANTS[mutant]
    right, broken = (
        reference_draw(oracle.engine.model),
        reference_draw(oracle.engine.model, factory),
    )
    for one_token in NEXT_TOKEN:
        plan = sampling_plan(CASES[one_token], oracle)
        for _, tokens in plan.contexts:
            assert broken(list(tokens), plan.settings, 5, 300) == right(
                list(tokens), plan.settings, 5, 300
            ), one_token  # the same draws: every one-token verdict is the reference's
    for seed_set in range(3):
        _, (verdict, _) = judged(case_id, oracle, seed_set, sampler_factory=factory)
        assert not verdict.passed, (seed_set, verdict.diagnostic)
        if mutant.startswith("temperature"):
            assert verdict.support_passed  # reweighted, not out of the support
            worst = min(verdict.results, key=lambda r: r.asymptotic_p_value)
            assert worst.context != verdict.results[0].context  # a later step, not the first
            assert worst.adjusted_p_value <= DEFAULT_ALPHA
            assert worst.asymptotic_p_value < 1e-6  # a wide margin, not luck
        else:
            assert verdict.violations
            assert all(" + [" in v.context for v in verdict.violations)  # after step 1 only
            assert {tuple(v.rules) for v in verdict.violations} == {("top_p",)}


def test_logprobs_of_the_drawn_distribution_fail_only_the_logprob_finding(oracle):
    """The same tokens as the reference's (so support and frequencies judge them alike),
    and most reported logprobs off, in every case whose settings change the distribution."""
    model = oracle.engine.model
    right = reference_generation_draw(model)
    wrong = reference_generation_draw(model, reported=REPORT_MUTANTS[LOGPROB_MUTANT])
    for case_id in [*NEXT_TOKEN, *SEQUENCE]:
        plan = sampling_plan(CASES[case_id], oracle)
        logprobs_at = reference_logprobs(oracle.answer, oracle.vocab_size, plan.request)
        settings, mismatched, compared = plan.settings, 0, 0
        for text, tokens in plan.contexts:
            expected = right(list(tokens), settings, 3, 100, plan.length)
            generations = wrong(list(tokens), settings, 3, 100, plan.length)
            assert [g.tokens for g in generations] == [g.tokens for g in expected], case_id
            path = compare_path_logprobs(
                text, tokens, generations, logprobs_at, FP32.logprobs_agree, FP32.logprob_tolerance
            )
            mismatched, compared = mismatched + len(path.mismatches), compared + path.compared
        if settings.temp == 1.0 and not (settings.top_p or settings.min_p or settings.top_k):
            assert mismatched == 0, case_id  # the drawn distribution is the model's here
        else:
            assert mismatched > compared / 2, (case_id, mismatched, compared)


class ReportsTemperedLogprobs(Control):
    """Samples correctly; reports logprob / temp (and top logprobs alike) for sampled tokens."""

    name = "mutant-tempered-logprobs"

    def generate(self, request):
        temp = request.sampler.temp or 1.0
        for event in super().generate(request):
            top = [(t, lp / temp) for t, lp in event.top_logprobs or []] or None
            yield replace(event, logprob=event.logprob / temp, top_logprobs=top)


def test_the_finding_through_an_adapter(oracle):
    case = replace(CASES["sampling/temperature"], params={"contexts": ["abc"], "draws": 40})
    passed = run_case(case, Control(SOURCE), oracle, FP32)
    assert passed.verdict == PASS, [f.summary for f in passed.findings]
    found = {f.check: f for f in passed.findings}
    assert "40 sampled tokens' logprobs" in found["sampled logprobs"].summary
    failed = run_case(case, ReportsTemperedLogprobs(SOURCE), oracle, FP32)
    assert failed.verdict == FAIL
    assert [f.check for f in failed.failures()] == ["sampled logprobs"]
    summary = failed.failures()[0].summary
    assert "40 of 40 sampled tokens' logprobs" in summary and "'abc'" in summary


def test_monte_carlo_accepts_a_cell_summing_to_one_plus_rounding():
    """Pooled cells can sum to 1 + 2e-16, which ``rng.multinomial`` refuses (found by
    the sequence cases' per-position fits)."""
    cells = [CellDeviation([0], "a", 3, 5.5, -1.1), CellDeviation([1], "b", 5, 2.5, 1.6)]
    parts = [(3, np.array([1.0 + 2.2e-16, 0.0])), (5, np.array([0.5, 0.5]))]
    fit = FitResult(3.2, 1, 0.07, cells, parts)
    assert 0 < monte_carlo_p_value(fit, 1000) <= 1
