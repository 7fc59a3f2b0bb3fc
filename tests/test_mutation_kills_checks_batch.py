"""The batch, equivalence and invariance checks pinned down beyond their findings' names:
which label each engine call carries (the label an invalid answer is reported under),
how a batch with sampled rows is judged (the batch run again, row by row, with both sides
named), how a haystack of random rows is drawn from its seed, that the case's reference
runs from scratch, and that every finding of a passing case is a pass.

Engines are the unbroken reference wrapper on ``dummy`` (``Control``) and small subclasses
of it with one deliberate difference, as in ``test_mutation_kills_checks.py``."""

from __future__ import annotations

import re
from dataclasses import replace

from conformance_helpers import differs, dummy_case, dummy_oracle, findings, summary
from conformance_helpers import run_dummy_case as run
from mutants import Control

from conformance.catalogue import Case, random_prompts
from conformance.comparator import FAIL, PASS
from engines.models import ModelSource

SOURCE = ModelSource("dummy", "builtin")
SHIFT = 0.5  # a logprob shift far beyond any tolerance
OUTSIDE = 100_000  # a token id outside the dummy vocabulary


class Broken(Control):
    """Answers the single requests ``when`` picks with a token outside the vocabulary at
    ``step`` (batches are answered correctly)."""

    name = "broken"

    def __init__(self, when, step=1):
        super().__init__(SOURCE)
        self.when, self.step = when, step

    def generate(self, request):
        for i, event in enumerate(super().generate(request)):
            broken = i == self.step and self.when(request)
            yield replace(event, token=OUTSIDE) if broken else event


def violation(label: str, step: int = 1) -> str:
    """run_case's reason for Broken's answer, given under ``label``."""
    vocab = dummy_oracle().vocab_size
    return (
        f"protocol violation: broken ({label}): token {OUTSIDE} at step {step} "
        f"is outside the vocabulary [0, {vocab})"
    )


# -- equivalence ------------------------------------------------------------------------------


def test_an_invalid_variant_answer_is_reported_under_the_variants_label():
    result = run("stopping/max_tokens_exact", Broken(lambda r: r.max_tokens == 7))
    assert result.verdict == FAIL
    assert result.reason == violation("max_tokens=7")
    # The variants before it were judged (and passed) first.
    assert findings(result) == [(f"max_tokens={n} vs reference", PASS) for n in (1, 2)]


# -- invariance -------------------------------------------------------------------------------


def test_an_invariance_case_without_a_draft_passes_whole():
    result = run("embeddings/from_tokens", Control(SOURCE))
    assert (result.verdict, result.reason) == (PASS, "")
    assert [v for _, v in findings(result)] == [PASS, PASS, PASS]


def test_an_invalid_plain_answer_is_reported_as_plain():
    result = run("embeddings/from_tokens", Broken(lambda r: r.prompt_embeddings is None))
    assert result.verdict == FAIL
    assert result.reason == violation("plain")
    assert result.findings == []


def test_an_invalid_variant_answer_is_reported_under_the_variant():
    result = run("embeddings/from_tokens", Broken(lambda r: r.prompt_embeddings is not None))
    assert result.verdict == FAIL
    assert result.reason == violation("prompt_embeddings=from_tokens")
    assert findings(result) == [("plain vs reference", PASS)]


class AllFromDraft(Control):
    """Reports every token of a drafted request as taken from the draft."""

    name = "all-from-draft"

    def generate(self, request):
        events = list(super().generate(request))
        if request.draft is not None:
            events = [replace(e, from_draft=True) for e in events]
        return iter(events)


def test_accepted_drafts_are_a_passing_finding():
    case = dummy_case("speculative/self_draft")
    case = replace(
        case,
        request={**case.request, "max_tokens": 4},
        params={"variants": [{"draft": {"model": "self", "num_draft_tokens": 2}}]},
    )
    result = run(case, AllFromDraft(SOURCE))
    assert findings(result) == [
        ("plain vs reference", PASS),
        ("draft=self/2 vs plain", PASS),
        ("draft=self/2 vs reference", PASS),
        ("draft=self/2 drafts accepted", PASS),
    ]
    assert result.verdict == PASS


# -- batch: labels of the single runs ---------------------------------------------------------


def test_an_invalid_answer_alone_is_reported_under_its_row():
    # Row 2 of batch/equals_single is the one with max_tokens 8.
    result = run("batch/equals_single", Broken(lambda r: r.max_tokens == 8))
    assert result.verdict == FAIL
    assert result.reason == violation("row 2 alone")
    assert findings(result) == [
        (f"row {i} in batch vs {other}", PASS) for i in range(2) for other in ("alone", "reference")
    ]


def cached_case() -> Case:
    return Case(
        "batch/cached",
        "batch",
        ["dummy"],
        "",
        {"prompt": "Hello, world!", "max_tokens": 3},
        {
            "rows": [
                {"prompt": "Hello, world!", "max_tokens": 3},
                {"prompt": "The quick brown fox", "max_tokens": 2, "cache_prefix": 4},
            ]
        },
    )


def test_an_invalid_cache_warm_up_is_reported_under_its_row():
    result = run(cached_case(), Broken(lambda r: r.cache_key is not None, step=0))
    assert result.verdict == FAIL
    assert result.reason == violation("row 1 cache warm-up", step=0)
    assert result.findings == []


# -- batch: sampled rows ----------------------------------------------------------------------

SAMPLED_ROW = {
    "prompt": "The quick brown fox",
    "max_tokens": 4,
    "sampler": {"temp": 1.0, "seed": 3},
}


def mixed_case() -> Case:
    """A sampled row (first: the reference seeds a batch from its first row) and a greedy one."""
    return Case(
        "batch/mixed",
        "batch",
        ["dummy"],
        "",
        {"prompt": "Hello, world!", "max_tokens": 4},
        {"rows": [SAMPLED_ROW, {"prompt": "Hello, world!", "max_tokens": 4}]},
    )


def test_a_sampled_row_is_compared_with_the_batch_run_again_a_greedy_row_alone():
    result = run(mixed_case(), Control(SOURCE))
    assert (result.verdict, result.reason) == (PASS, "")
    assert findings(result) == [
        ("row 0, the batch again", PASS),
        ("row 0 in batch vs reference", PASS),
        ("row 1 in batch vs alone", PASS),
        ("row 1 in batch vs reference", PASS),
    ]
    assert summary(result, "row 0, the batch again") == (
        "pass: 4 identical tokens, finish_reason 'length', max logprob |diff| 0"
    )
    assert summary(result, "row 0 in batch vs reference").startswith(
        "pass: 4 sampled tokens of control batch row 0 on its own path"
    )


class Runs(Control):
    """Counts single and batch calls."""

    name = "runs"

    def __init__(self):
        super().__init__(SOURCE)
        self.single, self.batches = 0, 0

    def generate(self, request):
        self.single += 1
        return super().generate(request)

    def generate_batch(self, batch):
        self.batches += 1
        return super().generate_batch(batch)


def test_a_sampled_batch_runs_twice_and_its_sampled_rows_never_alone():
    engine = Runs()
    sampled_only = replace(mixed_case(), params={"rows": [SAMPLED_ROW]})
    result = run(sampled_only, engine)
    assert result.verdict == PASS
    assert (engine.single, engine.batches) == (0, 2)
    greedy = Runs()
    assert run("batch/equals_single", greedy).verdict == PASS
    assert (greedy.single, greedy.batches) == (4, 1)  # each row alone, the batch once


class SecondBatchShifted(Control):
    """The second batch it answers has the first step of row 0 shifted by SHIFT."""

    name = "perturbed"

    def __init__(self):
        super().__init__(SOURCE)
        self.batches = 0

    def generate_batch(self, batch):
        self.batches += 1
        rows = super().generate_batch(batch)
        if self.batches == 2:
            first = rows[0][0]
            tops = [(t, lp - SHIFT) for t, lp in first.top_logprobs]
            rows[0][0] = replace(first, logprob=first.logprob - SHIFT, top_logprobs=tops)
        return rows


def test_a_sampled_row_that_does_not_repeat_names_both_batch_runs():
    result = run(mixed_case(), SecondBatchShifted())
    assert findings(result) == [
        ("row 0, the batch again", FAIL),
        ("row 0 in batch vs reference", PASS),
        ("row 1 in batch vs alone", PASS),
        ("row 1 in batch vs reference", PASS),
    ]
    assert re.match(
        differs("perturbed batch row 0", "perturbed batch again, row 0"),
        summary(result, "row 0, the batch again"),
    )


# -- batch: the haystack and the reference's request ------------------------------------------


class Stop(Exception):
    pass


class RecordBatch(Control):
    """Records the batch it is asked and stops the case there."""

    name = "record-batch"

    def __init__(self):
        super().__init__(SOURCE)
        self.seen = []

    def generate_batch(self, batch):
        self.seen.append(batch)
        raise Stop


def test_the_haystack_is_drawn_from_its_seed():
    hay = {"count": 200, "seed": 11, "min_chars": 3, "max_chars": 20}
    case = replace(dummy_case("batch/needle"), params={"haystack": hay})
    engine = RecordBatch()
    run(case, engine)
    [batch] = engine.seen
    assert len(batch.rows) == 201
    needle_prompt = dummy_oracle().encode("What is the capital of France?")
    [needle] = [i for i, row in enumerate(batch.rows) if row.request.prompt == needle_prompt]
    others = [row for i, row in enumerate(batch.rows) if i != needle]
    # The other rows' prompts are the seeded random prompts, in order.
    prompts = random_prompts(dummy_oracle(), 200, 11, 3, 20)
    assert [row.request.prompt for row in others] == prompts
    # Their max_tokens cover 4 to 20 (200 draws: each of the 17 values comes up).
    assert {row.request.max_tokens for row in others} == set(range(4, 21))
    # The same seed gives the same haystack.
    again = RecordBatch()
    run(case, again)
    assert [r.request for r in again.seen[0].rows] == [r.request for r in batch.rows]


def test_the_cases_reference_is_asked_from_scratch(monkeypatch):
    oracle = dummy_oracle()
    asked = []
    answer = oracle.answer

    def recording(request, *args):
        asked.append(request)
        return answer(request, *args)

    monkeypatch.setattr(oracle, "answer", recording)
    case = Case(
        "batch/keyed",
        "batch",
        ["dummy"],
        "",
        {"prompt": "Hello, world!", "max_tokens": 3, "cache_key": "case-key"},
        {"rows": [{"prompt": "Hello, world!", "max_tokens": 3}]},
    )
    result = run(case, Control(SOURCE))
    assert result.verdict == PASS
    assert asked and all(request.cache_key is None for request in asked)
    assert asked[0].prompt == oracle.encode("Hello, world!")
