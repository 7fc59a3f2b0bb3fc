"""The last mutation survivors pinned down (issue 16): the agreement finding's text and
context, a snapshot answer that does not cover the text, the reference lookup of a
sampled path (its top list and what an unlisted token counts as), and a snapshot
comparison that goes on past a changed request. Dummy model only."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from agreement_engines import NoisyScores, SmallNoise, noisy_logprobs
from conformance_helpers import dummy_case, dummy_oracle
from mutants import Control

from conformance.agreement import breaches, position, summarize, worst_position
from conformance.catalogue import build_request, load_cases, select_cases
from conformance.checks.context import CaseContext
from conformance.comparator import PASS
from conformance.oracle import REFERENCE_TOP
from conformance.profiles import AgreementLimits
from conformance.runner import run_case
from conformance.snapshots.compare import compare_groups
from conformance.snapshots.oracle import SnapshotOracle, SnapshotVocabulary
from conformance.snapshots.recorder import EngineOracle
from conformance.snapshots.store import (
    GOLDEN_DIR,
    VOCABULARY_FILE,
    SnapshotError,
    group_from_json,
    group_to_json,
    read_group,
    read_vocabulary,
)
from engines.adapters.base import event_from_logprobs
from engines.models import ModelSource
from engines.protocol import ScoreRequest, TokenEvent, Trace

SOURCE = ModelSource("dummy", "builtin")


def agreement_case(text: str):
    return next(
        c
        for c in select_cases(load_cases(), "dummy")
        if c.kind == "agreement" and c.params["text"] == text
    )


# -- conformance/checks/agreement.py ----------------------------------------------------------


class NoisyAtOnePosition(NoisyScores):
    """The reference's scores, but the prediction of token ``at`` (the ``at``-th position,
    counted as ``Position.index``) has large noise on its logits: the worst position is there."""

    name = "noisy-at-one-position"
    amplitude = 0.3
    at = 5

    def score(self, request):
        tokens = list(request.prompt) + list(request.continuation)
        logits = np.array(self.model(mx.array(tokens)[None])[0].astype(mx.float32), np.float64)
        logprobs = noisy_logprobs(logits, 0.0)
        start = len(request.prompt) - 1
        row = start + self.at - 1
        logprobs[row] = noisy_logprobs(logits, self.amplitude)[row]
        return [
            event_from_logprobs(t, logprobs[start + i], self.vocab_size, request.top_logprobs)
            for i, t in enumerate(request.continuation)
        ]


def test_a_worst_position_near_the_start_shows_the_text_from_its_first_token():
    oracle = dummy_oracle()
    case = agreement_case("code")
    result = run_case(case, NoisyAtOnePosition(SOURCE), oracle, oracle.default_profile())
    (finding,) = result.failures()
    assert finding.summary.startswith("FAIL: KL mean "), finding.summary
    d = finding.diagnostic
    assert d.step == NoisyAtOnePosition.at
    tokens = build_request(case.request, oracle).prompt
    # Fewer than CONTEXT_TOKENS (12) tokens precede it: all of them, the first included.
    assert d.context == oracle.decode(tokens[: NoisyAtOnePosition.at]) == "def m"
    assert f"step {d.step}, after 'def m'" in finding.details


def test_a_broken_dp_limit_names_the_worst_dp_in_the_diagnostic():
    """KL and top-1 limits that hold and a |dp| limit that breaks: the first breach is
    |dp| p99, and the diagnostic gives the worst position's signed dp."""
    oracle = dummy_oracle()
    case = agreement_case("prose")
    base = oracle.default_profile()
    profile = replace(
        base,
        agreement=AgreementLimits(
            kl_mean=1.0, kl_p99=1.0, dp_p99=1e-9, top1_min=0.0, clear_top1_min=0.0
        ),
    )
    engine = SmallNoise(SOURCE)
    (finding,) = run_case(case, engine, oracle, profile).failures()
    assert finding.summary.startswith("FAIL: |dp| p99 "), finding.summary

    tokens = build_request(case.request, oracle).prompt[: case.params["positions"] + 1]
    request = ScoreRequest(prompt=tokens[:1], continuation=tokens[1:], top_logprobs=REFERENCE_TOP)
    expected = oracle.answer_score(request).events
    actual = engine.score(request)
    measured = [
        position("prose", i + 1, e.top_logprobs, a.top_logprobs, profile.tie_epsilon)
        for i, (e, a) in enumerate(zip(expected, actual, strict=True))
    ]
    (broken,) = breaches(summarize(measured), profile.agreement)
    assert broken.metric == "|dp| p99"
    worst = worst_position(measured, broken.metric)
    assert finding.diagnostic.step == worst.index
    assert finding.diagnostic.detail.startswith(f"|dp| p99 is worst here (dp {worst.dp:+.3g}); ")


@pytest.mark.parametrize("damage", ["one step short", "a token changed"])
def test_a_snapshot_score_answer_that_does_not_follow_its_text_is_refused_on_loading(
    tmp_path, damage
):
    """The reference's side of an agreement case is the stored score answer: one whose
    steps are not the scored text (a hand-edited or damaged file) is a broken snapshot,
    refused when read, naming the answer; it must neither pass the case on the positions
    both sides happen to have nor blame the engine for it."""
    folder = tmp_path / "dummy"
    folder.mkdir()
    shutil.copy(GOLDEN_DIR / "dummy" / VOCABULARY_FILE, folder / VOCABULARY_FILE)
    group = json.loads((GOLDEN_DIR / "dummy" / "agreement.json").read_text())
    (answer,) = [a for a in group["cases"]["agreement/code"]["answers"] if a["kind"] == "score"]
    if damage == "one step short":
        answer["steps"] = answer["steps"][:-1]
    else:
        answer["steps"][3]["token"] += 1
    (folder / "agreement.json").write_text(json.dumps(group))

    with pytest.raises(SnapshotError) as error:
        SnapshotOracle("dummy", tmp_path)
    assert str(error.value) == (
        f"{folder / 'agreement.json'}: cases['agreement/code'].answers[0].steps: a score "
        "answer has one step per token of its request's continuation (128 tokens), in "
        f"order; got {127 if damage == 'one step short' else 128} steps that differ"
    )


# -- conformance/checks/context.py: judge_sampled's reference lookup ---------------------------


def passed(tokens: int) -> str:
    return (
        f"pass: {tokens} sampled tokens of the answer on its own path: each allowed by the "
        "settings, logprobs agree"
    )


def sampled_context(oracle) -> CaseContext:
    return CaseContext(
        dummy_case("greedy/hello"), Control(SOURCE), oracle, oracle.default_profile()
    )


def test_a_sampled_token_outside_the_references_top_20_is_judged_on_its_own_logprob():
    """At temperature 1 without filters every token is allowed: a token far down the
    reference's list, reported with its own logprob, passes. The reference must be asked
    for every token's logprob (its default top 20 would leave this one out)."""
    oracle = dummy_oracle()
    ctx = sampled_context(oracle)
    request = ctx.request(sampler={"temp": 1.0, "seed": 5}, max_tokens=2)
    everything = oracle.answer(
        replace(request, max_tokens=1, sampler=type(request.sampler)()), oracle.vocab_size
    )
    ranked = everything.events[0].top_logprobs
    assert len(ranked) == oracle.vocab_size > 2 * REFERENCE_TOP
    token, logprob = ranked[-1]  # the least likely token, far outside the top 20
    path = Trace([TokenEvent(token=token, logprob=logprob, text="", finish_reason="length")])
    ctx.judge_sampled("far token", request, path, "the answer")
    assert [(f.check, f.verdict, f.summary) for f in ctx.findings] == [
        (
            "far token",
            PASS,
            passed(1),
        )
    ]


class TopCappedAt20(Control):
    """The reference, but like OpenAI-compatible servers it lists at most 20 top logprobs
    per step, however many were asked for."""

    name = "top-capped"

    def generate(self, request):
        for event in super().generate(request):
            yield replace(event, top_logprobs=(event.top_logprobs or [])[:20] or None)


def test_tokens_an_oracle_does_not_list_count_as_impossible_on_a_sampled_path():
    """An engine playing the oracle (``EngineOracle``) may list fewer tokens than the
    vocabulary: the unlisted ones are impossible (-inf), so a path through top_k 3 is
    judged on the listed logprobs alone and passes."""
    inputs = dummy_oracle()
    oracle = EngineOracle(inputs, TopCappedAt20(SOURCE))
    ctx = sampled_context(oracle)
    request = ctx.request(sampler={"temp": 1.0, "top_k": 3, "seed": 5}, max_tokens=4)
    trace = ctx.run(request)
    ctx.judge_sampled("capped oracle", request, trace, "the answer")
    assert [(f.check, f.verdict, f.summary) for f in ctx.findings] == [
        (
            "capped oracle",
            PASS,
            passed(4),
        )
    ]


# -- conformance/snapshots/compare.py -----------------------------------------------------------


def test_a_changed_request_does_not_stop_the_comparison_of_the_next_answer():
    old = read_group(GOLDEN_DIR, "dummy", "sampling")
    new = group_from_json(group_to_json(old))
    case = next(c for _, c in sorted(new.cases.items()) if len(c.answers) >= 2)
    first, second = case.answers[0], case.answers[1]
    first.request = {**first.request, "max_tokens": 2}
    second.trace.events[0] = replace(second.trace.events[0], token=3)
    vocabulary = SnapshotVocabulary(read_vocabulary(GOLDEN_DIR, "dummy"))
    whats = [d.what for d in compare_groups(old, new, vocabulary.decode).differences]
    assert len(whats) == 2, whats
    assert whats[0].startswith("answer 0 (") and whats[0].endswith(": the request changed")
    assert whats[1].startswith("answer 1 (") and whats[1].endswith(":")
