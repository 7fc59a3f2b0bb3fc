"""conformance/checks/ pinned down: each check's findings (names, verdicts, the labels of
both sides), its pass and fail branches, and the engine-facing rules of ``CaseContext``
(what is sent, what is validated, each complaint word for word).

Engines are the unbroken reference wrapper on ``dummy`` (``Control``) and small
subclasses of it with one deliberate difference (``Perturbed`` shifts one answer's
logprobs), so a finding's failure names exactly the two sides a check compared.
Catalogue cases are the fast ones (under a second each on dummy); distribution cases are
built here with a few dozen draws, and the sampler statistics' glue is driven with
hand-made log-probabilities."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from conformance_helpers import (
    GreedyOnlyEngine,
    differs,
    dummy_case,
    dummy_engine,
    dummy_oracle,
    findings,
    summary,
)
from conformance_helpers import run_dummy_case as run
from mutants import Control

from conformance.catalogue import Case, CatalogueError
from conformance.checks import CHECKS, invariance, sampling
from conformance.checks.context import ENGINE_TOP, CaseContext, describe_overrides, engine_top
from conformance.comparator import FAIL, PASS
from engines.models import ModelSource
from engines.protocol import (
    BatchRequest,
    BatchRow,
    DraftSettings,
    GenerateRequest,
    ProtocolError,
    SamplerSettings,
    ScoreRequest,
    TokenEvent,
    Trace,
    Unsupported,
)

SOURCE = ModelSource("dummy", "builtin")
SHIFT = 0.5  # what Perturbed takes off every logprob of a step: far beyond any tolerance


def shifted(event: TokenEvent) -> TokenEvent:
    tops = [(t, lp - SHIFT) for t, lp in event.top_logprobs] if event.top_logprobs else None
    return replace(event, logprob=event.logprob - SHIFT, top_logprobs=tops)


class Perturbed(Control):
    """The reference wrapper, but the first step of the answers ``when`` picks has every
    logprob lowered by SHIFT (same tokens, same order: only the logprob comparison fails)."""

    name = "perturbed"

    def __init__(self, when):
        super().__init__(SOURCE)
        self.when = when

    def generate(self, request):
        for i, event in enumerate(super().generate(request)):
            yield shifted(event) if i == 0 and self.when(request) else event

    def generate_batch(self, batch):
        rows = super().generate_batch(batch)
        return [
            [shifted(e) if i == 0 and self.when(row.request) else e for i, e in enumerate(events)]
            for row, events in zip(batch.rows, rows)
        ]

    def score(self, request):
        for i, event in enumerate(super().score(request)):
            yield shifted(event) if i == 0 and self.when(request) else event


@pytest.fixture(scope="module")
def oracle():
    return dummy_oracle()


@pytest.fixture(scope="module")
def control():
    return Control(SOURCE)


# -- every kind has its check -------------------------------------------------------------------


def test_every_kind_maps_to_its_check():
    # (other kinds may join: each kind listed here keeps its check)
    mapped = {kind: f.__module__ + "." + f.__name__ for kind, f in CHECKS.items()}
    assert (
        mapped.items()
        >= {
            "equivalence": "conformance.checks.equivalence.run",
            "stream": "conformance.checks.stream.run",
            "invariance": "conformance.checks.invariance.run",
            "batch": "conformance.checks.batch.run",
            "prompt_cache": "conformance.checks.prompt_cache.run",
            "seed": "conformance.checks.sampling.run_seed",
            "distribution": "conformance.checks.sampling.run_distribution",
            "score": "conformance.checks.scoring.run",
            "agreement": "conformance.checks.agreement.run",
        }.items()
    )


# -- equivalence ----------------------------------------------------------------------------------


def test_equivalence_compares_the_request_with_the_reference(control):
    result = run("greedy/hello", control)
    assert findings(result) == [("engine vs reference", PASS)]
    wrong = run("greedy/hello", Perturbed(lambda r: True))
    assert findings(wrong) == [("engine vs reference", FAIL)]
    assert re.match(differs("reference", "perturbed"), summary(wrong, "engine vs reference"))


def test_equivalence_runs_every_variant(control):
    result = run("stopping/max_tokens_exact", control)
    assert findings(result) == [(f"max_tokens={n} vs reference", PASS) for n in (1, 2, 7, 16)]
    # Only the 7-token variant differs: the other findings stay passes.
    wrong = run("stopping/max_tokens_exact", Perturbed(lambda r: r.max_tokens == 7))
    assert [v for _, v in findings(wrong)] == [PASS, PASS, FAIL, PASS]


# -- stream ---------------------------------------------------------------------------------------


def test_stream_compares_both_answers_and_the_reference(control):
    assert findings(run("stream/equals_nonstream", control)) == [
        ("stream vs non-stream", PASS),
        ("streamed vs reference", PASS),
    ]
    wrong = run("stream/equals_nonstream", Perturbed(lambda r: r.stream))
    assert findings(wrong) == [("stream vs non-stream", FAIL), ("streamed vs reference", FAIL)]
    assert re.match(
        differs("perturbed non-streaming", "perturbed streaming"),
        summary(wrong, "stream vs non-stream"),
    )
    assert re.match(differs("reference", "perturbed"), summary(wrong, "streamed vs reference"))
    # The non-streamed answer is the one compared with the stream only.
    other = run("stream/equals_nonstream", Perturbed(lambda r: not r.stream))
    assert findings(other) == [("stream vs non-stream", FAIL), ("streamed vs reference", PASS)]


def test_stream_needs_the_stream_capability():
    result = run("stream/equals_nonstream", NoStream(SOURCE))
    assert (result.verdict, result.reason) == ("unsupported", "no-stream lacks capability stream")


class NoStream(Control):
    name = "no-stream"
    capabilities = frozenset(Control.capabilities - {"stream"})


# -- invariance -----------------------------------------------------------------------------------


def test_invariance_compares_each_variant_with_plain_and_reference(control):
    assert findings(run("embeddings/from_tokens", control)) == [
        ("plain vs reference", PASS),
        ("prompt_embeddings=from_tokens vs plain", PASS),
        ("prompt_embeddings=from_tokens vs reference", PASS),
    ]
    wrong = run("embeddings/from_tokens", Perturbed(lambda r: r.prompt_embeddings is not None))
    label = "prompt_embeddings=from_tokens"
    assert re.match(
        differs("perturbed plain", f"perturbed {label}"), summary(wrong, f"{label} vs plain")
    )
    assert re.match(
        differs("reference", f"perturbed {label}"), summary(wrong, f"{label} vs reference")
    )
    plain = run("embeddings/from_tokens", Perturbed(lambda r: r.prompt_embeddings is None))
    assert re.match(differs("reference", "perturbed"), summary(plain, "plain vs reference"))


class DraftFlags(Control):
    """Reports ``from_draft`` as given for every token of a drafted request."""

    name = "draft-flags"

    def __init__(self, flag, cut=None):
        super().__init__(SOURCE)
        self.flag, self.cut = flag, cut

    def generate(self, request):
        events = list(super().generate(request))
        if request.draft is not None:
            events = [replace(e, from_draft=self.flag) for e in events]
        return iter(events)


def self_draft_case(max_tokens: int) -> Case:
    case = dummy_case("speculative/self_draft")
    variant = {"draft": {"model": "self", "num_draft_tokens": 2}}
    return replace(
        case, request={**case.request, "max_tokens": max_tokens}, params={"variants": [variant]}
    )


def test_a_self_draft_must_accept_some_drafts():
    assert invariance.MIN_TOKENS_FOR_DRAFT_CHECK == 4
    result = run(self_draft_case(4), DraftFlags(False))
    assert summary(result, "draft=self/2 drafts accepted") == (
        "FAIL: with the model as its own draft no token came from the draft (4 tokens): "
        "speculative decoding is not happening"
    )
    accepted = run(self_draft_case(4), DraftFlags(True))
    assert summary(accepted, "draft=self/2 drafts accepted") == "pass: 4 of 4 tokens from the draft"
    real = run(self_draft_case(6), Control(SOURCE))
    assert re.fullmatch(
        r"pass: [1-6] of 6 tokens from the draft", summary(real, "draft=self/2 drafts accepted")
    )


def test_the_draft_check_needs_four_flagged_tokens():
    # Three tokens, or flags the engine does not report (None): nothing to judge.
    for result in (
        run(self_draft_case(3), DraftFlags(False)),
        run(self_draft_case(6), DraftFlags(None)),
    ):
        assert [c for c, _ in findings(result)] == [
            "plain vs reference",
            "draft=self/2 vs plain",
            "draft=self/2 vs reference",
        ]
        assert result.verdict == PASS


def test_a_drafted_request_the_engine_cannot_serve_is_unsupported():
    result = run("speculative/self_draft", GreedyOnlyEngine(SOURCE))
    assert result.verdict == "unsupported"
    assert result.reason == "greedy-only lacks capability speculative"
    assert result.findings == []  # checked before anything runs


# -- batch ----------------------------------------------------------------------------------------


def test_each_batch_row_is_compared_alone_and_with_the_reference(control):
    result = run("batch/equals_single", control)
    assert findings(result) == [
        (f"row {i} in batch vs {other}", PASS) for i in range(4) for other in ("alone", "reference")
    ]
    wrong = run("batch/equals_single", Perturbed(lambda r: r.prompt == [] or len(r.prompt) == 1))
    # Row 2 ("x", one token) is shifted in the batch and alone: equal to itself, not the reference.
    failed = [c for c, v in findings(wrong) if v == FAIL]
    assert failed == ["row 2 in batch vs reference"]


class BatchOnlyShift(Perturbed):
    """Shifts batch rows only (the single answers are the reference's)."""

    def generate(self, request):
        return Control.generate(self, request)


def test_a_batch_row_names_both_sides():
    wrong = run("batch/equals_single", BatchOnlyShift(lambda r: r.max_tokens == 8))
    assert re.match(
        differs("perturbed alone", "perturbed batch row 2"),
        summary(wrong, "row 2 in batch vs alone"),
    )
    assert re.match(
        differs("reference", "perturbed batch row 2"), summary(wrong, "row 2 in batch vs reference")
    )


def test_the_needle_is_the_only_judged_row(control, oracle):
    result = run("batch/needle", control)
    # 6 random prompts and the needle at a seeded position: only the needle's row is judged.
    assert findings(result) == [
        ("row 5 in batch vs alone", PASS),
        ("row 5 in batch vs reference", PASS),
    ]
    seen = []

    class Recording(Control):
        def generate_batch(self, batch):
            seen.append(batch)
            return super().generate_batch(batch)

    run("batch/needle", Recording(SOURCE))
    [batch] = seen
    needle = CaseContext(dummy_case("batch/needle"), control, oracle, oracle.default_profile())
    assert len(batch.rows) == 7
    assert batch.rows[5].request.prompt == needle.request().prompt
    assert all(4 <= row.request.max_tokens <= 20 for i, row in enumerate(batch.rows) if i != 5)


def test_staggered_rows_join_late_and_cached_rows_are_warmed(oracle):
    seen = []

    class Recording(Control):
        def generate(self, request):
            seen.append(("single", request.cache_key, len(request.prompt), request.max_tokens))
            return super().generate(request)

        def generate_batch(self, batch):
            seen.append(("batch", [(r.insert_at, r.request.cache_key) for r in batch.rows]))
            return super().generate_batch(batch)

    case = Case(
        "batch/probe",
        "batch",
        ["dummy"],
        "",
        {"prompt": "Hello, world!", "max_tokens": 3},
        {
            "rows": [
                {"prompt": "Hello, world!", "max_tokens": 3},
                {"prompt": "The quick brown fox", "max_tokens": 2, "cache_prefix": 4},
                {"prompt": "x", "max_tokens": 2, "insert_at": 2},
            ]
        },
    )
    result = run(case, Recording(SOURCE))
    assert result.verdict == PASS, result.reason
    key = "lmconform:batch/probe:row1"
    assert seen[0] == ("single", key, 4, 1)  # the warm-up: the first 4 tokens, one token
    assert seen[1] == ("batch", [(0, None), (0, key), (2, None)])
    # Alone (and for the reference) every row runs from scratch.
    assert all(entry[1] is None for entry in seen[2:])
    assert [c for c, _ in findings(result)] == [
        f"row {i} in batch vs {other}" for i in range(3) for other in ("alone", "reference")
    ]


# -- prompt cache ---------------------------------------------------------------------------------


def test_a_cached_continuation_is_compared_with_scratch_and_the_reference(control):
    assert findings(run("prompt_cache/continuation", control)) == [
        ("first turn vs reference", PASS),
        ("cached vs from scratch", PASS),
        ("cached vs reference", PASS),
    ]
    cached = Perturbed(lambda r: r.cache_key is not None and r.max_tokens == 12)
    wrong = run("prompt_cache/continuation", cached)
    assert re.match(
        differs("perturbed from scratch", "perturbed cached"),
        summary(wrong, "cached vs from scratch"),
    )
    assert re.match(differs("reference", "perturbed cached"), summary(wrong, "cached vs reference"))
    first = run("prompt_cache/continuation", Perturbed(lambda r: r.max_tokens == 8))
    assert findings(first)[0] == ("first turn vs reference", FAIL)


def test_the_second_turn_extends_or_departs_from_the_first(oracle):
    seen = []

    class Recording(Control):
        def generate(self, request):
            events = list(super().generate(request))
            seen.append((request, [e.token for e in events]))
            return iter(events)

    for follow in ("continue", "diverge"):
        seen.clear()
        case = replace(
            dummy_case("prompt_cache/continuation"),
            params={"follow": follow, "suffix": " Next:", "max_tokens": 5},
        )
        assert run(case, Recording(SOURCE)).verdict == PASS
        (first, answer), (cached, _), (fresh, _) = seen
        suffix = oracle.encode(" Next:")
        tail = answer + suffix if follow == "continue" else suffix
        assert cached.prompt == first.prompt + tail
        assert (first.cache_key, cached.cache_key, fresh.cache_key) == (
            "lmconform:prompt_cache/continuation",
            "lmconform:prompt_cache/continuation",
            None,
        )
        assert (first.max_tokens, cached.max_tokens, fresh.prompt) == (8, 5, cached.prompt)


def test_a_malformed_prompt_cache_case_is_a_catalogue_error(control, oracle):
    case = dummy_case("prompt_cache/continuation")
    bad = run(replace(case, params={**case.params, "follow": "sideways"}), control)
    assert bad.reason == (
        "catalogue: prompt_cache/continuation: follow must be 'continue' or 'diverge', "
        "got 'sideways'"
    )
    # A diverging suffix that starts with the first answer's token does not diverge.
    first = oracle.answer(build(case, oracle)).tokens
    suffix = oracle.decode(first[:2])
    assert oracle.encode(suffix)[0] == first[0]
    same = run(
        replace(case, params={**case.params, "follow": "diverge", "suffix": suffix}), control
    )
    assert same.reason == (
        "catalogue: prompt_cache/continuation: the suffix starts with the first answer's token"
    )


def build(case, oracle):
    return CaseContext(case, None, oracle, oracle.default_profile()).request()


# -- scoring --------------------------------------------------------------------------------------


def test_scores_are_compared_with_the_reference(control):
    assert findings(run("score/teacher_forced", control)) == [("scores vs reference", PASS)]
    wrong = run("score/teacher_forced", Perturbed(lambda r: True))
    assert re.match(differs("reference", "perturbed"), summary(wrong, "scores vs reference"))


def test_scoring_needs_the_score_capability():
    result = run("score/teacher_forced", GreedyOnlyEngine(SOURCE))
    assert (result.verdict, result.reason) == ("unsupported", "greedy-only lacks capability score")


# -- the seed check ---------------------------------------------------------------------------


def seed_case(other_seeds) -> Case:
    case = dummy_case("sampling/same_seed")
    return replace(
        case, request={**case.request, "max_tokens": 6}, params={"other_seeds": other_seeds}
    )


def test_a_seed_repeats_and_other_seeds_differ(control):
    result = run(seed_case([1, 2]), control)
    assert [f.summary for f in result.findings] == [
        "pass: seed 1234 repeats 6 tokens",
        "pass: 2 of 2 other seeds gave other tokens",
    ]
    # The same seed listed again gives the same tokens: one of two differs.
    assert summary(run(seed_case([1, 1234]), control), "other seeds, other tokens") == (
        "pass: 1 of 2 other seeds gave other tokens"
    )


class SameTokensAnySeed(Control):
    name = "seedless"

    def generate(self, request):
        sampler = replace(request.sampler, seed=1234)
        return super().generate(replace(request, sampler=sampler))


def test_ignoring_the_seed_is_caught_both_ways(control):
    same = run(seed_case([1, 2]), SameTokensAnySeed(SOURCE))
    tokens = run(seed_case([]), control)  # noqa: F841 - warms nothing, documents the tokens
    first = re.search(r"the same tokens (\[.*\])", summary(same, "other seeds, other tokens"))
    assert summary(same, "other seeds, other tokens") == (
        f"FAIL: seeds [1234, 1, 2] all gave the same tokens {first.group(1)}: "
        "the seed (or sampling itself) is ignored"
    )
    assert findings(same)[0] == ("same seed, same tokens", PASS)


class Unrepeatable(Control):
    """The second answer to the same request differs from its fourth token on."""

    name = "unrepeatable"

    def __init__(self):
        super().__init__(SOURCE)
        self.calls = 0

    def generate(self, request):
        self.calls += 1
        events = list(super().generate(request))
        if self.calls == 2:
            events[3] = replace(events[3], token=(events[3].token + 1) % 256, text="")
        return iter(events)


def test_a_seed_that_does_not_repeat_names_the_first_step_that_differs():
    result = run(seed_case([1]), Unrepeatable())
    text = summary(result, "same seed, same tokens")
    assert text.startswith("FAIL: seed 1234 gave different tokens on a second run, from step 3: [")
    first, again = (eval(part) for part in text.split(": ", 2)[2].split(" vs "))
    assert first[:3] == again[:3] and first[3] != again[3] and len(first) == len(again) == 6


# -- the distribution check, on the engine ----------------------------------------------------


def distribution_case(draws: int = 40, **sampler) -> Case:
    return Case(
        "sampling/probe",
        "distribution",
        ["dummy"],
        "",
        {"prompt": "yes or no?", "max_tokens": 1, "sampler": {"temp": 1.0, **sampler}},
        {"draws": draws},
    )


def test_a_distribution_case_on_a_correct_engine_passes_all_three_findings(control):
    result = run(distribution_case(top_k=5), control)
    assert findings(result) == [
        ("support", PASS),
        ("frequencies", PASS),
        ("sampled logprobs", PASS),
    ]
    assert summary(result, "support") == (
        "pass: temp 1, top_k 5: every draw inside the allowed tokens (5 allowed; 40 draws at "
        "one context)"
    )
    assert re.fullmatch(
        r"pass: 40 sampled tokens' logprobs, profile fp32 agree with the reference on the "
        r"engine's paths \(largest difference .*\)",
        summary(result, "sampled logprobs"),
    )
    assert summary(result, "frequencies").startswith("pass: worst context 'yes or no?': chi-square")
    assert summary(result, "frequencies").endswith("[temp 1, top_k 5; 40 draws at one context]")


def test_a_draw_outside_top_k_fails_the_support_finding():
    result = run(distribution_case(top_k=5), StrayDraws())
    text = summary(result, "support")
    assert text.startswith("FAIL: temp 1, top_k 5 allows 5 tokens, but the engine drew ")
    assert text.endswith("x10 (excluded by top_k) at 'yes or no?'")
    [details] = [f.details for f in result.findings if f.check == "support"]
    assert details.startswith(
        text + "\nevery draw outside the allowed tokens (a correct sampler draws none):\n  "
    )


class NoLogprobs(Control):
    name = "no-logprobs"
    capabilities = frozenset(Control.capabilities - {"logprobs"})

    def generate(self, request):
        for event in super().generate(request):
            yield replace(event, logprob=None, top_logprobs=None)


class StrayDraws(NoLogprobs):
    """Every fourth draw is token 0 (well outside the top 5 at 'yes or no?' on dummy)."""

    name = "stray"

    def __init__(self):
        super().__init__(SOURCE)
        self.calls = 0

    def generate(self, request):
        self.calls += 1
        for event in super().generate(request):
            yield replace(event, token=0, text="") if self.calls % 4 == 0 else event


def test_an_engine_without_logprobs_is_not_compared_on_them():
    result = run(distribution_case(top_k=5), NoLogprobs(SOURCE))
    assert summary(result, "sampled logprobs") == (
        "pass: not compared (the engine reports no logprobs)"
    )


class TemperedLogprobs(Control):
    """Draws correctly but reports the logprob after temperature (PROTOCOL S2 says before)."""

    name = "tempered"

    def generate(self, request):
        temp = request.sampler.temp
        for event in super().generate(request):
            tops = [(t, lp / temp) for t, lp in event.top_logprobs]
            yield replace(event, logprob=event.logprob / temp, top_logprobs=tops)


def test_sampled_logprobs_after_temperature_fail_with_each_mismatch():
    result = run(distribution_case(draws=12, temp=2.0), TemperedLogprobs(SOURCE))
    text = summary(result, "sampled logprobs")
    assert text.startswith("FAIL: 12 of 12 sampled tokens' logprobs, profile fp32 differ from")
    [details] = [f.details for f in result.findings if f.check == "sampled logprobs"]
    lines = details.splitlines()
    assert lines[0] == text
    assert lines[1] == "the first mismatches (logprob: before temperature and filters, S2):"
    assert len(lines) == 2 + sampling.SHOWN_MISMATCHES and lines[2].startswith("  ")


# -- the distribution check's parts, on hand-made data ------------------------------------------


def plan_of(case: Case) -> sampling.SamplingPlan:
    return sampling.sampling_plan(case, dummy_oracle())


def test_a_sampling_plan_reads_its_case(oracle):
    case = distribution_case(draws=30, top_p=0.9)
    plan = plan_of(case)
    assert (plan.name, plan.n_draws, plan.alpha, plan.min_draws_to_fit) == (
        "sampling/probe",
        30,
        sampling.DEFAULT_ALPHA,
        sampling.DEFAULT_MIN_DRAWS_TO_FIT,
    )
    assert plan.contexts == (("yes or no?", tuple(oracle.encode("yes or no?"))),)
    assert plan.settings == SamplerSettings(temp=1.0, top_p=0.9)
    assert plan.length == 1
    custom = replace(
        case,
        params={"draws": "7", "alpha": "0.01", "min_draws_to_fit": "3", "contexts": ["a", "bc"]},
    )
    plan = plan_of(custom)
    assert (plan.n_draws, plan.alpha, plan.min_draws_to_fit) == (7, 0.01, 3)
    assert plan.contexts == (("a", tuple(oracle.encode("a"))), ("bc", tuple(oracle.encode("bc"))))
    # Without a prompt text the context is named for what it is.
    tokens = replace(case, request={"prompt_tokens": [5, 6], "sampler": {"temp": 1.0}})
    assert plan_of(tokens).contexts == (("the prompt", (5, 6)),)


def test_a_sampling_plan_refuses_greedy_or_no_draws():
    with pytest.raises(CatalogueError) as greedy:
        plan_of(distribution_case(temp=0.0))
    assert str(greedy.value) == (
        "case sampling/probe: a distribution case needs a temperature above 0"
    )
    with pytest.raises(CatalogueError) as no_draws:
        plan_of(replace(distribution_case(), params={}))
    assert str(no_draws.value) == "case sampling/probe: params.draws (draws per context) is missing"


def test_reference_logprobs_ask_a_greedy_one_token_request_for_every_logprob():
    asked = []
    template = GenerateRequest(
        prompt=[1],
        prompt_embeddings=np.zeros((1, 8)),
        max_tokens=9,
        sampler=SamplerSettings(temp=2.0, top_k=3),
        stop_tokens=[4],
        draft=DraftSettings(model="self", num_draft_tokens=2),
    )

    def answer(request, top):
        asked.append((request, top))
        return Trace([TokenEvent(2, -0.1, [(2, -0.1), (0, -2.5)], finish_reason="length")])

    at = sampling.reference_logprobs(answer, 4, template)
    vector = at([7, 8])
    assert vector.tolist() == [-2.5, -np.inf, -0.1, -np.inf]
    [(request, top)] = asked
    assert top == 4
    assert (request.prompt, request.max_tokens, request.sampler) == ([7, 8], 1, SamplerSettings())
    assert (request.draft, request.prompt_embeddings, request.stop_tokens) == (None, None, [4])


def test_case_seeds_differ_by_case_seed_set_and_context():
    seeds = {
        sampling.case_seed(name, seed_set, index)
        for name in ("a", "b")
        for seed_set in (0, 1)
        for index in (0, 1)
    }
    assert len(seeds) == 8
    assert sampling.case_seed("a", 0, 0) == sampling.case_seed("a", 0, 0)
    import zlib

    expected = np.random.SeedSequence([zlib.crc32(b"a"), 1, 2]).generate_state(1)[0]
    assert sampling.case_seed("a", 1, 2) == int(expected)


# Four tokens; after token 0 the next token is 2 or 3, after anything else 0 or 1.
START = np.log([0.5, 0.3, 0.15, 0.05])
AFTER_0 = np.array([-np.inf, -np.inf, np.log(0.5), np.log(0.5)])
AFTER_OTHER = np.array([np.log(0.5), np.log(0.5), -np.inf, -np.inf])


def logprobs_at(tokens):
    if len(tokens) == 1:
        return START
    return AFTER_0 if tokens[-1] == 0 else AFTER_OTHER


def hand_plan(length=1, n=200, contexts=(("p", (9,)),), **settings) -> sampling.SamplingPlan:
    request = GenerateRequest(
        prompt=[9], max_tokens=length, sampler=SamplerSettings(temp=1.0, **settings)
    )
    return sampling.SamplingPlan("hand", request, tuple(contexts), n, min_draws_to_fit=50)


def exact_draw(context, settings, seed, n, length=1):
    """Draws from the right conditionals, seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = list(context)
        for _ in range(length):
            p = np.exp(logprobs_at(tokens))
            tokens.append(int(rng.choice(4, p=p / p.sum())))
        out.append(tokens[len(context) :])
    return out


def test_next_token_draws_are_judged_at_each_context_with_its_own_seed():
    seeds = []

    def draw(context, settings, seed, n):
        seeds.append(seed)
        return [t[0] for t in exact_draw(context, settings, seed, n)]

    plan = hand_plan(contexts=(("p", (9,)), ("q", (8,))))
    verdict = sampling.judge_next_token(plan, logprobs_at, draw)
    assert verdict.passed
    assert [r.context for r in verdict.results] == ["'p'", "'q'"]
    assert seeds == [sampling.case_seed("hand", 0, 0), sampling.case_seed("hand", 0, 1)]
    again = []
    sampling.judge_next_token(
        plan, logprobs_at, lambda c, s, seed, n: again.append(seed) or [0] * n, seed_set=3
    )
    assert again == [sampling.case_seed("hand", 3, 0), sampling.case_seed("hand", 3, 1)]


def test_sequences_are_judged_per_prefix_and_per_position():
    plan = hand_plan(length=2, n=200)
    verdict = sampling.judge_plan(plan, logprobs_at, exact_draw, decode=lambda t: f"<{t}>")
    labels = [r.context for r in verdict.results]
    # First tokens at the prompt; second tokens under each first token; position 2 pooled.
    assert labels[0] == "'p'"
    assert set(labels[1:-1]) <= {f"'p' + [{t}] '<[{t}]>'" for t in range(4)}
    assert labels[-1] == "'p' position 2, all prefixes"
    assert verdict.passed
    fitted = {r.context: r.tested for r in verdict.results}
    counts = {r.context: r.n_draws for r in verdict.results}
    for label in labels[1:-1]:  # a prefix is fit-tested alone iff 50 generations reached it
        assert fitted[label] == (counts[label] >= 50) or counts[label] < 50 and not fitted[label]
    assert counts[labels[-1]] == 200 and counts["'p'"] == 200

    # The first token drawn wrongly: caught at the prompt.
    def wrong_first(context, settings, seed, n, length):
        return [[3, 0]] * n

    assert not sampling.judge_plan(plan, logprobs_at, wrong_first).passed


def test_a_second_token_drawn_from_the_wrong_prefix_fails():
    # Second tokens drawn as if after the prompt (0 or 1 after token 0): outside the support.
    def confused(context, settings, seed, n, length):
        rng = np.random.default_rng(seed)
        return [[0, int(rng.integers(0, 2))] for _ in range(n)]

    verdict = sampling.judge_plan(hand_plan(length=2), logprobs_at, confused)
    assert not verdict.support_passed
    assert verdict.worst_context == "'p' + [0]"


def test_an_unstable_context_is_refused_with_the_settings():
    plan = hand_plan(top_p=0.8 + 1e-4, top_k=3)  # 0.5 + 0.3 = 0.8: token 2 at the threshold
    with pytest.raises(CatalogueError) as raised:
        sampling.stable_implied(plan, "p", START)
    assert str(raised.value) == (
        "case hand no longer tests what it says: at 'p' a token lies within 1e-3 of a threshold "
        "of temp 1, top_p 0.8001, top_k 3, so a correct engine may keep or drop it"
    )
    implied = sampling.stable_implied(hand_plan(top_k=2), "p", START)
    assert implied.support == {0, 1}
    with pytest.raises(CatalogueError) as next_token:
        sampling.judge_next_token(plan, logprobs_at, lambda c, s, seed, n: [0] * n)
    assert str(next_token.value) == str(raised.value)


def test_context_draws_carry_the_implied_distribution():
    implied = sampling.stable_implied(hand_plan(top_k=2), "p", START)
    context = sampling.context_draws("c", implied, (0, 1, 1), fit=False)
    assert (context.label, context.draws, context.fit) == ("c", [0, 1, 1], False)
    assert context.probabilities is implied.probabilities
    assert context.allowed_by_rule is implied.allowed_by_rule
    assert sampling.context_draws("c", implied, [0]).fit is True


def test_group_by_prefix_and_prefix_labels():
    groups = sampling.group_by_prefix([[1, 2, 3], [1, 4], [5]])
    assert groups == {(): [1, 1, 5], (1,): [2, 4], (1, 2): [3]}
    assert sampling.prefix_label("hi", ()) == "'hi'"
    assert sampling.prefix_label("hi", (1, 2)) == "'hi' + [1, 2]"
    assert sampling.prefix_label("hi", (1, 2), lambda t: "ab") == "'hi' + [1, 2] 'ab'"


def test_settings_are_described_by_their_active_filters():
    describe = sampling.describe_settings
    assert describe(SamplerSettings(temp=0.7)) == "temp 0.7"
    assert describe(SamplerSettings(temp=1.0, top_p=1.0, min_p=0.0, top_k=0)) == "temp 1"
    assert describe(SamplerSettings(temp=1.0, top_p=0.9, min_p=0.05, top_k=40)) == (
        "temp 1, top_p 0.9, min_p 0.05, top_k 40"
    )


# -- recording a verdict ----------------------------------------------------------------------


class Recorder:
    """What record_verdict and record_path_logprobs write to: a context's findings."""

    def __init__(self):
        self.findings = []
        self.profile = dummy_oracle().default_profile()
        self.oracle = type("O", (), {"token_text": staticmethod(lambda t: f"<{t}>")})()

    def add(self, check, verdict, summary, details=""):
        self.findings.append((check, verdict, summary, details or summary))

    def fail(self, check, summary, details=""):
        self.add(check, FAIL, summary, details)


def test_a_support_violation_is_recorded_with_every_stray_draw():
    plan = hand_plan(top_k=2, n=100, contexts=(("p", (9,)), ("q", (8,))))

    def draw(context, settings, seed, n):
        stray = [3] * 2 if context == [9] else [2]
        return [0, 1] * ((n - len(stray)) // 2) + stray

    verdict = sampling.judge_next_token(plan, logprobs_at, draw, lambda t: f"<{t}>")
    ctx = Recorder()
    sampling.record_verdict(ctx, plan, verdict)
    (check, verdict_, text, details), (fit_check, *_) = ctx.findings
    assert (check, verdict_, fit_check) == ("support", FAIL, "frequencies")
    assert text == (
        "FAIL: temp 1, top_k 2 allows 2 tokens, but the engine drew '<3>'(3) x2 "
        "(excluded by top_k) at 'p'"
    )
    every = "every draw outside the allowed tokens (a correct sampler draws none):"
    assert details.splitlines() == [
        text,
        every,
        "  'p': token 3 '<3>' was drawn 2x but top_k excludes it",
        "  'q': token 2 '<2>' was drawn 1x but top_k excludes it",
    ]


def test_a_passing_verdict_records_support_sizes_and_every_fit():
    plan = hand_plan(n=100, contexts=(("p", (9,)), ("q", (8,))), top_k=3)
    draw = lambda context, settings, seed, n: [0, 1, 2, 0] * (n // 4)
    verdict = sampling.judge_next_token(plan, logprobs_at, draw)
    ctx = Recorder()
    sampling.record_verdict(ctx, plan, verdict)
    (_, support_verdict, support_text, _), (_, fit_verdict, fit_text, details) = ctx.findings
    assert support_verdict == PASS
    assert support_text == (
        "pass: temp 1, top_k 3: every draw inside the allowed tokens (3 allowed; "
        "100 draws at each of 2 contexts)"
    )
    # 50/25/25 against 52.6/31.6/15.8 expected: X² = 6.9 on 2 df, p ~ 0.03 (x2 for Holm).
    assert fit_verdict == PASS
    assert fit_text.startswith("pass: worst context ")
    assert fit_text.endswith(" [temp 1, top_k 3; 100 draws at each of 2 contexts]")
    lines = details.splitlines()
    assert lines[0] == fit_text and "every fit test:" in lines
    table = lines[lines.index("every fit test:") + 1 :]
    assert [line.split(":")[0] for line in table] == ["  'p'", "  'q'"]
    r = verdict.results[0]
    assert table[0] == (
        f"  'p': 100 tokens, chi-square {r.statistic:.1f} on {r.dof} df, "
        f"p = {r.p_value:.3g}, Holm-adjusted {r.adjusted_p_value:.3g}"
    )


def test_nothing_to_fit_is_a_pass_that_says_so():
    plan = hand_plan(length=3, n=5)
    ctx = Recorder()
    draw = lambda context, settings, seed, n, length: [[1, 1, 1]] * n
    sampling.record_verdict(ctx, plan, sampling.judge_plan(plan, logprobs_at, draw))
    # Five generations: no prefix reaches 50, and each position holds one cell only.
    assert ctx.findings[1][:3] == (
        "frequencies",
        PASS,
        "pass: nothing to fit-test [temp 1; 5 generations at one context]",
    )
    assert ctx.findings[0][2] == (
        "pass: temp 1: every draw inside the allowed tokens (2/4 allowed; 5 generations at "
        "one context)"
    )


def test_path_logprobs_are_recorded_with_the_largest_difference():
    Path = sampling.PathLogprobs
    ctx = Recorder()
    paths = [
        Path("c", compared=3, largest_difference=0.0002),
        Path("d", compared=2, largest_difference=0.001),
    ]
    sampling.record_path_logprobs(ctx, paths)
    text = (
        "pass: 5 sampled tokens' logprobs, profile fp32 agree with the reference on the "
        "engine's paths (largest difference 0.001)"
    )
    assert ctx.findings == [("sampled logprobs", PASS, text, text)]


def test_describe_overrides_and_labels():
    assert describe_overrides({"draft": {"model": "self", "num_draft_tokens": 3}}) == "draft=self/3"
    assert describe_overrides({"max_tokens": 7, "prefill_step_size": 4}) == (
        "max_tokens=7, prefill_step_size=4"
    )
    assert describe_overrides({"sampler": {"temp": 1.0}}) == 'sampler={"temp":1.0}'
    assert describe_overrides({}) == "as given"


# -- CaseContext ----------------------------------------------------------------------------


def context(engine, case_id="greedy/hello", **params) -> CaseContext:
    oracle = dummy_oracle()
    case = dummy_case(case_id)
    if params:
        case = replace(case, params={**case.params, **params})
    return CaseContext(case, engine, oracle, oracle.default_profile())


def test_requests_are_built_once_per_spec_and_overrides(control):
    ctx = context(control)
    assert ctx.request() is ctx.request()
    assert ctx.request(max_tokens=2).max_tokens == 2 and ctx.request().max_tokens == 24
    assert ctx.request(max_tokens=2) is ctx.request(max_tokens=2)
    other = ctx.request({"prompt": "x", "max_tokens": 3})
    assert (other.max_tokens, other.prompt) == (3, dummy_oracle().encode("x"))
    assert ctx.params is ctx.case.params and ctx.engine_name == "control"


def test_missing_capabilities_are_named_in_order():
    ctx = context(GreedyOnlyEngine(SOURCE))
    with pytest.raises(Unsupported) as raised:
        ctx.require({"score", "batch", "greedy"})
    assert str(raised.value) == "greedy-only lacks capability batch, score"
    ctx.require({"greedy", "stream"})


class Recording(Control):
    name = "recording"

    def __init__(self, capabilities=None):
        super().__init__(SOURCE)
        self.sent = []
        if capabilities is not None:
            self.capabilities = frozenset(capabilities)

    def generate(self, request):
        self.sent.append(request)
        return super().generate(request)


def test_the_engine_is_asked_for_top_logprobs_and_streaming_only_if_it_can():
    engine = Recording()
    ctx = context(engine)
    trace = ctx.run(replace(ctx.request(), stream=True))
    assert (engine.sent[-1].top_logprobs, engine.sent[-1].stream) == (ENGINE_TOP, True)
    assert ENGINE_TOP == 5 and all(len(e.top_logprobs) == 5 for e in trace.events)
    ctx.run(replace(ctx.request(), stream=False))
    assert engine.sent[-1].stream is False
    plain = Recording(Control.capabilities - {"logprobs", "stream"})
    ctx = context(plain)
    ctx.run(replace(ctx.request(), stream=True))
    assert (plain.sent[-1].top_logprobs, plain.sent[-1].stream) == (0, False)


def test_the_reference_under_test_streams_the_oracles_answer_cut_to_the_top_five(oracle):
    engine = dummy_engine("reference")
    assert engine is oracle.engine
    ctx = context(engine)
    request = replace(ctx.request(), stream=True)
    trace = ctx.run(request)
    full = oracle.answer(replace(request, top_logprobs=ENGINE_TOP))
    assert trace.tokens == full.tokens
    assert [e.top_logprobs for e in trace.events] == [e.top_logprobs[:5] for e in full.events]
    assert [e.top_logprobs for e in CaseContext._truncated(full, 0).events] == [None] * len(full)


class Broken(Control):
    """Answers with a token outside the vocabulary at ``step``."""

    name = "broken"
    step = 1

    def generate(self, request):
        for i, event in enumerate(super().generate(request)):
            yield replace(event, token=100_000) if i == self.step else event


def test_an_invalid_answer_is_a_protocol_error_naming_engine_and_label():
    ctx = context(Broken(SOURCE))
    vocab = dummy_oracle().vocab_size
    outside = f"token 100000 at step 1 is outside the vocabulary [0, {vocab})"
    with pytest.raises(ProtocolError) as labelled:
        ctx.run(ctx.request(), "plain")
    assert str(labelled.value) == f"broken (plain): {outside}"
    with pytest.raises(ProtocolError) as unlabelled:
        ctx.run(ctx.request())
    assert str(unlabelled.value) == f"broken: {outside}"


class Endless(Control):
    name = "endless"

    def __init__(self):
        super().__init__(SOURCE)
        self.closed = False

    def generate(self, request):
        try:
            while True:
                yield TokenEvent(65, -0.5)
        finally:
            self.closed = True


def test_an_engine_that_does_not_stop_is_cut_off_and_closed():
    engine = Endless()
    ctx = context(engine)
    with pytest.raises(ProtocolError) as raised:
        ctx.run(ctx.request(max_tokens=3))
    assert str(raised.value) == "more than max_tokens=3 events (the engine does not stop)"
    assert engine.closed


class WrongText(Control):
    name = "wrong-text"

    def generate(self, request):
        for i, event in enumerate(super().generate(request)):
            yield replace(event, text="?") if i == 0 else event


def test_text_is_checked_only_where_the_case_asks_and_reported_once():
    assert not context(WrongText(SOURCE)).checks_text
    assert context(WrongText(SOURCE), "stream/equals_nonstream").checks_text
    ctx = context(WrongText(SOURCE), check_text=True)
    assert ctx.checks_text
    ctx.run(ctx.request(), "first")
    ctx.run(ctx.request(), "second")  # the same problem again: one finding
    [finding] = ctx.findings
    assert (finding.check, finding.verdict) == ("text", FAIL)
    assert finding.summary.startswith("FAIL: wrong-text (first): text pieces join to '?")
    quiet = context(WrongText(SOURCE))
    quiet.run(quiet.request())
    assert quiet.findings == []


def test_a_batch_answer_is_checked_row_by_row():
    class Short(Control):
        name = "short"

        def generate_batch(self, batch):
            return super().generate_batch(batch)[:-1]

    ctx = context(Short(SOURCE))
    rows = BatchRequest([BatchRow(ctx.request()), BatchRow(ctx.request(max_tokens=2))])
    with pytest.raises(ProtocolError) as short:
        ctx.run_batch(rows)
    assert str(short.value) == "short answered 1 rows for a batch of 2"

    class BadRow(Control):
        name = "bad-row"

        def generate_batch(self, batch):
            answer = super().generate_batch(batch)
            answer[1] = [replace(answer[1][0], token=-1), *answer[1][1:]]
            return answer

    ctx = context(BadRow(SOURCE))
    with pytest.raises(ProtocolError) as bad:
        ctx.run_batch(rows)
    assert str(bad.value) == (
        f"bad-row, batch row 1: token -1 at step 0 is outside the vocabulary "
        f"[0, {dummy_oracle().vocab_size})"
    )
    traces = context(Control(SOURCE)).run_batch(rows)
    assert [len(t) for t in traces] == [24, 2]
    assert all(len(e.top_logprobs) == ENGINE_TOP for t in traces for e in t.events)
    plain = context(Recording(Control.capabilities - {"logprobs"})).run_batch(rows)
    assert all(e.top_logprobs is None for t in plain for e in t.events)


def test_batch_rows_get_their_text_checked_under_their_row():
    class BatchWrongText(Control):
        name = "batch-text"

        def generate_batch(self, batch):
            answer = super().generate_batch(batch)
            answer[1] = [replace(answer[1][0], text="?"), *answer[1][1:]]
            return answer

    ctx = context(BatchWrongText(SOURCE), check_text=True)
    ctx.run_batch(BatchRequest([BatchRow(ctx.request()), BatchRow(ctx.request())]))
    [finding] = ctx.findings
    assert finding.summary.startswith("FAIL: batch-text (batch row 1): text pieces join to")


def test_scores_are_validated_and_asked_for_the_top_logprobs():
    class BadScore(Control):
        name = "bad-score"

        def score(self, request):
            return list(super().score(request))[:-1]

    ctx = context(BadScore(SOURCE))
    request = ScoreRequest(prompt=[1, 2], continuation=[3, 4, 5])
    with pytest.raises(ProtocolError) as raised:
        ctx.run_score(request)
    assert str(raised.value).startswith("bad-score scoring: ")
    trace = context(Control(SOURCE)).run_score(request, top=3)
    assert len(trace) == 3 and all(len(e.top_logprobs) == 3 for e in trace.events)
    assert all(
        len(e.top_logprobs) == ENGINE_TOP
        for e in context(Control(SOURCE)).run_score(request).events
    )
    no_logprobs = Recording(Control.capabilities - {"logprobs"})
    assert all(e.top_logprobs is None for e in context(no_logprobs).run_score(request).events)


def test_only_reference_answers_to_greedy_requests_resume(control):
    ctx = context(control)
    greedy = ctx.reference(ctx.request())
    resume = ctx.resumption(greedy)
    assert resume is not None
    assert resume(greedy.tokens[:2]).tokens[:2] == greedy.tokens[:2]
    sampled = ctx.reference(ctx.request(sampler={"temp": 1.0, "seed": 1}))
    assert ctx.resumption(sampled) is None
    assert ctx.resumption(ctx.run(ctx.request())) is None
    top = ctx.reference(ctx.request(), top=3)
    assert all(len(e.top_logprobs) == 3 for e in top.events)


def test_the_primary_reference_sets_the_conditioning_and_checks_expectations(control):
    ctx = context(control)
    ctx.primary_reference(ctx.request())
    assert ctx.conditioning is not None and ctx.conditioning.min_margin > 0
    sampled = context(control)
    sampled.primary_reference(sampled.request(sampler={"temp": 1.0, "seed": 1}))
    assert sampled.conditioning is None
    case = replace(dummy_case("greedy/hello"), expect={"length": 3})
    strict = CaseContext(case, control, dummy_oracle(), dummy_oracle().default_profile())
    with pytest.raises(CatalogueError):
        strict.primary_reference(strict.request())


def test_findings_record_the_comparison_and_plain_verdicts(control):
    ctx = context(control)
    expected = ctx.reference(ctx.request())
    actual = Trace([shifted(expected.events[0]), *expected.events[1:]])
    result = ctx.compare("mine", expected, actual, "left", "right")
    [finding] = ctx.findings
    assert (finding.check, finding.verdict, finding.summary) == ("mine", FAIL, result.summary)
    assert finding.details == result.render("left", "right")
    assert finding.diagnostic is result.diagnostic
    assert (finding.near_tie_steps, finding.unjudged_steps) == (
        result.near_tie_steps,
        result.unjudged_steps,
    )
    assert re.match(differs("left", "right"), finding.summary)
    ctx.compare("default", expected, actual)
    assert re.match(differs("reference", "control"), ctx.findings[-1].summary)
    ctx.add("a", PASS, "fine")
    ctx.add("b", PASS, "fine", "more")
    ctx.fail("c", "bad")
    assert [(f.check, f.verdict, f.summary, f.details) for f in ctx.findings[2:]] == [
        ("a", PASS, "fine", "fine"),
        ("b", PASS, "fine", "more"),
        ("c", FAIL, "bad", "bad"),
    ]


def test_an_engine_is_asked_for_the_larger_of_the_requests_top_and_five():
    caps = Control.capabilities
    request = GenerateRequest(prompt=[1], max_tokens=1)
    assert engine_top(replace(request, top_logprobs=12), caps) == 12
    assert engine_top(replace(request, top_logprobs=3), caps) == ENGINE_TOP
    assert engine_top(replace(request, top_logprobs=12), caps - {"logprobs"}) == 0
    engine = Recording()
    ctx = context(engine)
    traces = ctx.run_batch(BatchRequest([BatchRow(replace(ctx.request(), top_logprobs=7))]))
    assert all(len(e.top_logprobs) == 7 for e in traces[0].events)


# -- the seed and distribution checks: labels, seeds and prefixes -------------------------------


class BrokenOnCall(Broken):
    """Answers ``call`` (1-based) with a token outside the vocabulary; the others are valid."""

    def __init__(self, call):
        super().__init__(SOURCE)
        self.call, self.calls = call, 0

    def generate(self, request):
        self.calls += 1
        source = super().generate if self.calls == self.call else Control(SOURCE).generate
        return source(request)


@pytest.mark.parametrize(
    "call, label", [(1, "seeded"), (2, "same seed again"), (3, "seed 1"), (4, "seed 2")]
)
def test_each_run_of_the_seed_check_is_labelled(call, label):
    result = run(seed_case([1, 2]), BrokenOnCall(call))
    assert result.reason.startswith(f"protocol violation: broken ({label}): token 100000 at step 1")


def test_the_seed_checks_verdicts():
    assert findings(run(seed_case([1, 2]), Control(SOURCE))) == [
        ("same seed, same tokens", PASS),
        ("other seeds, other tokens", PASS),
    ]
    assert findings(run(seed_case([1]), SameTokensAnySeed(SOURCE))) == [
        ("same seed, same tokens", PASS),
        ("other seeds, other tokens", FAIL),
    ]


def test_each_draw_of_a_distribution_case_is_labelled_with_its_seed():
    engine = BrokenOnCall(2)
    engine.step = 0  # one-token draws
    result = run(distribution_case(draws=5, top_k=5), engine)
    assert re.match(
        r"protocol violation: broken \(draw with seed \d+\): token 100000 at step 0", result.reason
    )


def test_a_sequence_case_labels_its_prefixes_with_their_text(oracle):
    case = replace(distribution_case(draws=60, top_k=2), params={"draws": 60})
    case = replace(case, request={**case.request, "max_tokens": 2})
    result = run(case, Control(SOURCE))
    assert result.verdict == PASS, result.reason
    [details] = [f.details for f in result.findings if f.check == "frequencies"]
    # Each prefix (a first token) reached by 100 generations or fewer: only the position
    # aggregate and the prompt are fit-tested; the prefixes' labels show in the support pass.
    lines = details.splitlines()
    assert "  'yes or no?' position 2, all prefixes: 60 tokens" in "\n".join(lines)
    tested = replace(case, params={"draws": 60, "min_draws_to_fit": 10})
    [details] = [
        f.details for f in run(tested, Control(SOURCE)).findings if f.check == "frequencies"
    ]
    prefixed = [line for line in details.splitlines() if line.startswith("  'yes or no?' + [")]
    assert prefixed, details
    for line in prefixed:
        token = int(line.split("[", 1)[1].split("]", 1)[0])
        assert line.startswith(f"  'yes or no?' + [{token}] {oracle.decode([token])!r}: ")


def test_judge_generations_passes_seeds_decode_and_seed_set_on():
    seeds = []

    def draw(context, settings, seed, n, length):
        seeds.append((tuple(context), settings, seed))
        return [
            sampling.Generation(tokens, [float(START[tokens[0]]), float(AFTER_OTHER[tokens[1]])])
            for tokens in ([1, 0], [1, 1]) * (n // 2)
        ]

    plan = hand_plan(length=2, n=60, contexts=(("p", (9,)), ("q", (8,))))
    profile = dummy_oracle().default_profile()
    verdict, paths = sampling.judge_generations(
        plan, logprobs_at, draw, profile, decode=lambda t: f"<{t}>", seed_set=2
    )
    assert seeds == [
        ((9,), plan.settings, sampling.case_seed("hand", 2, 0)),
        ((8,), plan.settings, sampling.case_seed("hand", 2, 1)),
    ]
    assert [p.context for p in paths] == ["'p'", "'q'"]
    assert [p.compared for p in paths] == [120, 120] and all(not p.mismatches for p in paths)
    labels = [r.context for r in verdict.results]
    assert "'p' + [1] '<[1]>'" in labels and "'q' + [1] '<[1]>'" in labels
    # Both contexts keep their position aggregate.
    assert [x for x in labels if x.endswith("all prefixes")] == [
        "'p' position 2, all prefixes",
        "'q' position 2, all prefixes",
    ]
    default = []
    sampling.judge_generations(
        plan,
        logprobs_at,
        lambda c, s, seed, n, k: default.append(seed) or draw(c, s, seed, n, k),
        profile,
    )
    assert default[0] == sampling.case_seed("hand", 0, 0)


def test_a_prefix_reached_exactly_min_draws_to_fit_times_is_fit_tested():
    # 100 generations: token 1 first in exactly 50 (min_draws_to_fit), token 0 in the others.
    draw = lambda context, settings, seed, n, length: [[1, 0], [0, 2]] * (n // 2)
    verdict = sampling.judge_plan(hand_plan(length=2, n=100), logprobs_at, draw)
    tested = {r.context: (r.n_draws, r.tested) for r in verdict.results}
    assert tested["'p' + [1]"] == (50, True) and tested["'p' + [0]"] == (50, True)


def test_an_unstable_sequence_prompt_names_its_text():
    plan = hand_plan(length=2, top_p=0.8 + 1e-4)
    with pytest.raises(CatalogueError) as raised:
        sampling.judge_plan(plan, logprobs_at, exact_draw)
    assert "at 'p' a token lies within 1e-3" in str(raised.value)


def test_the_rules_that_exclude_a_token_are_named():
    assert sampling._excluded_by(["top_k"]) == "excluded by top_k"
    assert sampling._excluded_by(["top_p", "min_p"]) == "excluded by top_p and min_p"
    assert sampling._excluded_by([]) == "excluded by the combined filters"


def test_judge_plan_passes_the_seed_set_on_for_both_lengths():
    for length in (1, 2):
        seeds = []

        def draw(context, settings, seed, n, k, seeds=seeds):
            seeds.append(seed)
            return exact_draw(context, settings, seed, n, k)

        plan = hand_plan(length=length, n=20)
        sampling.judge_plan(plan, logprobs_at, draw, seed_set=2)
        sampling.judge_plan(plan, logprobs_at, draw)
        assert seeds == [sampling.case_seed("hand", 2, 0), sampling.case_seed("hand", 0, 0)]


def test_top_k_of_one_is_described():
    assert sampling.describe_settings(SamplerSettings(temp=1.0, top_k=1)) == "temp 1, top_k 1"


def test_draws_keep_the_cases_other_settings(oracle):
    engine = Recording()
    case = distribution_case(draws=4, top_k=5)
    case = replace(
        case, request={**case.request, "draft": {"model": "self", "num_draft_tokens": 2}}
    )
    run(case, engine)
    drafted = [r for r in engine.sent if r.sampler.temp == 1.0]
    assert len(drafted) == 4
    assert all(r.draft is not None and r.draft.num_draft_tokens == 2 for r in drafted)


def test_logprob_mismatches_are_recorded_one_by_one():
    from conformance.sampling.paths import LogprobMismatch as Mismatch

    first = Mismatch(generation=0, step=1, token=3, reported=-1.0, expected=-2.0, tolerance=0.01)
    second = Mismatch(generation=4, step=0, token=5, reported=-0.5, expected=-0.25, tolerance=0.01)
    paths = [
        sampling.PathLogprobs("'p'", compared=6, largest_difference=1.0, mismatches=[first]),
        sampling.PathLogprobs("'q'", compared=4, largest_difference=0.25, mismatches=[second]),
    ]
    ctx = Recorder()
    sampling.record_path_logprobs(ctx, paths)
    [(check, verdict, text, details)] = ctx.findings
    line_1 = first.describe("'p'", "<3>")
    line_2 = second.describe("'q'", "<5>")
    assert line_1.startswith("'p', generation 0 step 1: token 3 '<3>' reported logprob -1.0000")
    assert (check, verdict) == ("sampled logprobs", FAIL)
    assert text == (
        f"FAIL: 2 of 10 sampled tokens' logprobs, profile fp32 differ from the reference's: {line_1}"
    )
    assert details.splitlines() == [
        text,
        "the first mismatches (logprob: before temperature and filters, S2):",
        f"  {line_1}",
        f"  {line_2}",
    ]
    none = Recorder()
    sampling.record_path_logprobs(none, [sampling.PathLogprobs("'p'")])
    assert none.findings[0][:2] == ("sampled logprobs", PASS)


def test_a_failed_fit_and_several_stray_tokens_are_recorded():
    plan = hand_plan(top_k=2, n=100)
    draw = lambda context, settings, seed, n: [0] * 97 + [2, 3, 3]
    verdict = sampling.judge_next_token(plan, logprobs_at, draw, lambda t: f"<{t}>")
    ctx = Recorder()
    sampling.record_verdict(ctx, plan, verdict)
    (_, _, support, _), (check, fit_verdict, fit_text, details) = ctx.findings
    assert support == (
        "FAIL: temp 1, top_k 2 allows 2 tokens, but the engine drew '<2>'(2) x1 (excluded by "
        "top_k), '<3>'(3) x2 (excluded by top_k) at 'p'"
    )
    # 97 of token 0 against 5/8 of 97 = 60.6 expected: the fit fails too.
    assert (check, fit_verdict) == ("frequencies", FAIL)
    assert fit_text.startswith("FAIL: worst context 'p': chi-square ")
    assert details.splitlines()[0] == fit_text and "every fit test:" in details


def test_a_sampled_answer_is_judged_on_its_own_path(control, oracle):
    ctx = context(control)
    request = ctx.request(sampler={"temp": 1.0, "top_k": 3, "seed": 5}, max_tokens=6)
    trace = ctx.run(request)
    ctx.judge_sampled("path", request, trace, "the answer")
    passed = (
        "pass: 6 sampled tokens of the answer on its own path: each allowed by the "
        "settings, logprobs agree"
    )
    assert [(f.check, f.verdict, f.summary) for f in ctx.findings] == [("path", PASS, passed)]
    # Every logprob off by SHIFT: six problems, the first in the summary, five shown.
    wrong = Trace([shifted(e) for e in trace.events])
    ctx.judge_sampled("shifted", request, wrong, "the answer")
    finding = ctx.findings[-1]
    assert (finding.check, finding.verdict) == ("shifted", FAIL)
    assert finding.summary.startswith(
        "FAIL: 6 of 6 sampled tokens of the answer on its own path: step 0: logprob of "
    )
    lines = finding.details.splitlines()
    assert lines[0] == finding.summary and len(lines) == 1 + 5
    assert [line.split(":")[0] for line in lines[1:]] == [f"  step {i}" for i in range(5)]
    # A token the settings exclude at its prefix (the least likely one there).
    at_2 = oracle.answer(
        replace(
            request,
            prompt=request.prompt + trace.tokens[:2],
            max_tokens=1,
            sampler=SamplerSettings(),
        ),
        oracle.vocab_size,
    )
    worst = at_2.events[0].top_logprobs[-1][0]
    # (the path ends there: later steps would follow another prefix)
    events = list(trace.events)[:3]
    events[2] = replace(events[2], token=worst, logprob=None, top_logprobs=None)
    ctx.judge_sampled("excluded", request, Trace(events), "the answer")
    summary_ = ctx.findings[-1].summary
    assert summary_.startswith(
        "FAIL: 1 of 3 sampled tokens of the answer on its own path: step 2: "
    )
    assert "is not among the 3 tokens the settings allow" in summary_
    assert f"{oracle.token_text(worst)!r}({worst})" in summary_


def test_a_sampled_path_from_embeddings_is_refused(control):
    ctx = context(control)
    request = replace(ctx.request(), prompt_embeddings=np.zeros((1, 8)))
    with pytest.raises(CatalogueError) as raised:
        ctx.judge_sampled("path", request, Trace([]), "x")
    assert str(raised.value) == "greedy/hello: a sampled path is judged on token ids"


def test_judge_sequences_defaults_to_seed_set_zero():
    seeds = []

    def draw(context, settings, seed, n, length):
        seeds.append(seed)
        return exact_draw(context, settings, seed, n, length)

    sampling.judge_sequences(hand_plan(length=2, n=20), logprobs_at, draw)
    assert seeds == [sampling.case_seed("hand", 0, 0)]


# -- CaseContext: sampled answers, expectations, text and top lists ---------------------------


def scripted_events(tokens_and_tops):
    """Events of a sampled answer: each (token, top list); the token's logprob is its entry."""
    events = []
    for i, (token, tops) in enumerate(tokens_and_tops):
        last = i == len(tokens_and_tops) - 1
        logprob = dict(tops)[token]
        events.append(TokenEvent(token, logprob, tops, finish_reason="length" if last else None))
    return events


# Step 1 is a near-tie (0.0001 < epsilon 0.01) between tokens 66 and 67; five entries a step.
TAIL = [(71, -3.5), (72, -4.0), (73, -4.5)]
STEP_0 = [(65, -0.1), (70, -2.5), *TAIL]
STEP_1 = [(66, -0.8), (67, -0.8001), *TAIL]
NEAR = [(65, STEP_0), (66, STEP_1)]
OTHER = [(65, STEP_0), (67, STEP_1)]


class Scripted(Control):
    name = "scripted"

    def generate(self, request):
        return iter(scripted_events(NEAR))

    def generate_batch(self, batch):
        return [scripted_events(NEAR) for _ in batch.rows]


def test_two_sampled_answers_may_not_part_at_a_near_tie():
    ctx = context(Scripted(SOURCE))
    request = ctx.request(sampler={"temp": 1.0, "seed": 3}, max_tokens=2)
    first = ctx.run(request)
    other = Trace(scripted_events(OTHER))
    result = ctx.compare("same seed", first, other, "first", "second")
    assert result.verdict == FAIL
    assert result.summary.startswith("FAIL: the same seed gave other tokens (near-tie")
    assert ctx.findings[-1].summary == result.summary and ctx.findings[-1].verdict == FAIL
    # The same traces, the expected one not a sampled answer of the engine: a near-tie.
    plain = ctx.compare("plain", Trace(scripted_events(NEAR)), other)
    assert plain.verdict == "near-tie"
    # A step after the near-tie that nothing judges (no resumption here) is counted.
    after = (68, [(68, -0.2), *TAIL, (70, -5.0)])
    ctx.compare(
        "longer", Trace(scripted_events([*NEAR, after])), Trace(scripted_events([*OTHER, after]))
    )
    assert (ctx.findings[-1].near_tie_steps, ctx.findings[-1].unjudged_steps) == ([1], 1)
    [batch] = ctx.run_batch(BatchRequest([BatchRow(request)]))
    assert ctx.compare("batch", batch, other).verdict == FAIL
    greedy_batch = ctx.run_batch(BatchRequest([BatchRow(ctx.request(max_tokens=2))]))
    assert ctx.compare("greedy batch", greedy_batch[0], other).verdict == "near-tie"


def test_a_sampled_reference_answer_is_judged_on_the_engines_path(control):
    ctx = context(control)
    request = ctx.request(sampler={"temp": 1.0, "top_k": 3, "seed": 5}, max_tokens=4)
    expected = ctx.reference(request)
    actual = ctx.run(request)
    assert ctx.compare("sampled", expected, actual, "reference", "mine") is None
    [finding] = ctx.findings
    assert (finding.check, finding.verdict) == ("sampled", PASS)
    assert finding.summary.startswith("pass: 4 sampled tokens of mine on its own path")
    ctx.compare("default label", expected, actual)
    assert ctx.findings[-1].summary.startswith("pass: 4 sampled tokens of control on its own")
    # The engine's path is what is judged: a shifted logprob on it fails.
    ctx.compare("shifted", expected, Trace([shifted(e) for e in actual.events]))
    assert ctx.findings[-1].verdict == FAIL


def test_the_primary_reference_checks_the_decoded_text_and_the_margin(control):
    # text/utf8_pieces expects multi-byte text: the decoded answer (end tokens left out) has it.
    ctx = context(control, "text/utf8_pieces")
    ctx.primary_reference(ctx.request())
    margin = context(control)
    margin.primary_reference(margin.request())
    smallest = margin.conditioning.min_margin
    for bound, ok in ((smallest * 1.01, True), (smallest, False)):
        case = replace(dummy_case("greedy/hello"), expect={"smallest_margin_below": bound})
        strict = CaseContext(case, control, dummy_oracle(), dummy_oracle().default_profile())
        if ok:
            strict.primary_reference(strict.request())
        else:
            with pytest.raises(CatalogueError):
                strict.primary_reference(strict.request())


def test_a_stop_tokens_text_is_not_expected_in_the_pieces(control):
    assert findings(run("text/stop_token_silent", control)) == [("engine vs reference", PASS)]


class TwoWrongTexts(Control):
    name = "two-wrong"

    def __init__(self):
        super().__init__(SOURCE)
        self.calls = 0

    def generate(self, request):
        self.calls += 1
        mark = "?" if self.calls == 1 else "!"
        for i, event in enumerate(super().generate(request)):
            yield replace(event, text=mark) if i == 0 else event


def test_two_different_text_problems_are_two_findings():
    ctx = context(TwoWrongTexts(), check_text=True)
    ctx.run(ctx.request(), "first")
    ctx.run(ctx.request(), "second")
    assert [f.check for f in ctx.findings] == ["text", "text"]


def test_top_lists_of_batch_rows_and_scores_are_validated():
    class ShortTops(Control):
        name = "short-tops"

        def generate_batch(self, batch):
            return [
                [replace(e, top_logprobs=e.top_logprobs[:2]) for e in events]
                for events in super().generate_batch(batch)
            ]

        def score(self, request):
            for event in super().score(request):
                yield replace(event, top_logprobs=event.top_logprobs[:2])

        def generate(self, request):
            for event in super().generate(request):
                yield replace(event, top_logprobs=event.top_logprobs[:2])

    ctx = context(ShortTops(SOURCE))
    with pytest.raises(ProtocolError) as single:
        ctx.run(ctx.request(max_tokens=2))
    assert str(single.value) == "short-tops: 2 top logprobs at step 0; 5 were requested"
    with pytest.raises(ProtocolError) as batch:
        ctx.run_batch(BatchRequest([BatchRow(ctx.request(max_tokens=2))]))
    assert str(batch.value).startswith("short-tops, batch row 0: ")
    with pytest.raises(ProtocolError) as scored:
        ctx.run_score(ScoreRequest(prompt=[1, 2], continuation=[3, 4]))
    assert str(scored.value).startswith("short-tops scoring: ")


def test_a_failed_comparison_names_tokens_by_their_token_text(control, oracle):
    ctx = context(control, "embeddings/from_tokens")
    expected = ctx.reference(ctx.request())
    first = expected.tokens[0]
    assert oracle.token_text(first) != oracle.decode([first])  # '<d1>' against a byte
    actual = Trace([shifted(expected.events[0]), *expected.events[1:]])
    ctx.compare("mine", expected, actual)
    assert ctx.findings[-1].summary.startswith(
        f"FAIL: logprob of {oracle.token_text(first)!r} at step 0"
    )
