"""Comparing two snapshots of a case group: what changed, judged like any comparison.

Used by the syrupy extension to decide whether the reference still matches
its golden snapshot. Answers are compared with the tie-aware comparator
(``comparator.py``) under the snapshot's precision profile, so a last-digit
float change on another machine passes, a near-tie taken the other way
passes with a note, and a changed token fails with the step, both tokens and
their logprobs. Everything that is not a float must be equal: token ids of
the prompts, the requests, the text pieces and ``from_draft`` flags of the
steps both sides share, finish reasons, and the engine's verdicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from conformance.comparator import FAIL, NEAR_TIE, compare_traces
from conformance.profiles import PrecisionProfile, get_profile
from conformance.snapshots.store import Answer, CaseSnapshot, GroupSnapshot

# Embedding vectors are float32 computations (a dequantized row, say) that another machine
# may round differently in the last bit; a real change is orders of magnitude larger.
EMBEDDING_RTOL = 1e-5
EMBEDDING_ATOL = 1e-6


@dataclass
class Difference:
    case_id: str
    what: str  # one line: where and what changed
    details: str = ""  # further lines (a comparison's diagnostic)

    def render(self) -> str:
        head = f"{self.case_id}: {self.what}"
        return head if not self.details else head + "\n" + _indent(self.details)


@dataclass
class GroupComparison:
    differences: list[Difference] = field(default_factory=list)
    near_ties: list[Difference] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return not self.differences

    def render(self) -> str:
        lines = []
        for difference in self.differences:
            lines.append(difference.render())
        for note in self.near_ties:
            lines.append("near-tie (accepted): " + note.render())
        return "\n".join(lines)


def compare_groups(
    expected: GroupSnapshot,
    actual: GroupSnapshot,
    decode: Callable[[list[int]], str],
    token_text: Callable[[int], str] | None = None,
) -> GroupComparison:
    """Everything in which ``actual`` (just recorded) departs from ``expected`` (stored)."""
    result = GroupComparison()
    profile = get_profile(expected.profile)
    for name in ("model", "group", "engine", "profile"):
        old, new = getattr(expected, name), getattr(actual, name)
        if old != new:
            result.differences.append(Difference("(group)", f"{name} {old!r} -> {new!r}"))
    for case_id in sorted(set(expected.cases) - set(actual.cases)):
        result.differences.append(Difference(case_id, "in the snapshot, but no longer recorded"))
    for case_id in sorted(set(actual.cases) - set(expected.cases)):
        result.differences.append(Difference(case_id, "new case, not in the snapshot"))
    for case_id in sorted(set(expected.cases) & set(actual.cases)):
        _compare_cases(
            expected.cases[case_id],
            actual.cases[case_id],
            profile,
            decode,
            token_text,
            result,
        )
    return result


def _compare_cases(
    old: CaseSnapshot,
    new: CaseSnapshot,
    profile: PrecisionProfile,
    decode,
    token_text,
    result: GroupComparison,
) -> None:
    def differ(what: str, details: str = "") -> None:
        result.differences.append(Difference(old.case_id, what, details))

    if old.definition != new.definition:
        differ(f"the case definition changed (hash {old.definition} -> {new.definition})")
    if old.not_replayable != new.not_replayable:
        differ(f"replayable: {old.not_replayable!r} -> {new.not_replayable!r}")
    if old.verdict != new.verdict:
        differ(f"verdict of the engine on its own case: {old.verdict} -> {new.verdict}")
    for name in ("encode", "encode_chat"):
        before, now = getattr(old.inputs, name), getattr(new.inputs, name)
        for text in sorted(set(before) | set(now)):
            if before.get(text) != now.get(text):
                differ(f"{name}({text!r}): {before.get(text)} -> {now.get(text)}")
    _compare_embeddings(old, new, differ)
    _compare_conditioning(old, new, profile, differ)

    if len(old.answers) != len(new.answers):
        differ(f"{len(old.answers)} answers in the snapshot, {len(new.answers)} now")
    for index, (a, b) in enumerate(zip(old.answers, new.answers)):
        where = f"answer {index} ({a.kind} {_short(a.request)})"
        if a.request != b.request or a.top_logprobs != b.top_logprobs:
            differ(f"{where}: the request changed", f"now: {_short(b.request)}")
            continue
        _compare_answers(old.case_id, where, a, b, profile, decode, token_text, result)


def _compare_answers(case_id, where, a: Answer, b: Answer, profile, decode, token_text, result):
    comparison = compare_traces(
        a.trace,
        b.trace,
        profile,
        decode,
        expected_label="snapshot",
        actual_label="now",
        token_text=token_text,
    )
    if comparison.verdict == FAIL:
        result.differences.append(
            Difference(case_id, f"{where}:", comparison.render("snapshot", "now"))
        )
        return
    if comparison.verdict == NEAR_TIE:
        result.near_ties.append(
            Difference(case_id, f"{where}:", comparison.render("snapshot", "now"))
        )
    # Over the steps both sides share, everything that is not a float must be the same.
    for step in range(comparison.matched_steps):
        e, f = a.trace.events[step], b.trace.events[step]
        for name in ("text", "from_draft"):
            if getattr(e, name) != getattr(f, name):
                result.differences.append(
                    Difference(
                        case_id,
                        f"{where}: step {step} (token {e.token}) {name} "
                        f"{getattr(e, name)!r} -> {getattr(f, name)!r}",
                    )
                )
                return


def _compare_embeddings(old: CaseSnapshot, new: CaseSnapshot, differ) -> None:
    before = {tuple(e.tokens): e.vectors for e in old.inputs.embed}
    now = {tuple(e.tokens): e.vectors for e in new.inputs.embed}
    if set(before) != set(now):
        differ(f"embeddings asked for other tokens: {sorted(before)} -> {sorted(now)}")
        return
    for tokens, vectors in before.items():
        a, b = np.asarray(vectors, dtype=np.float64), np.asarray(now[tokens], dtype=np.float64)
        if a.shape != b.shape:
            differ(f"embeddings of {list(tokens)}: shape {a.shape} -> {b.shape}")
        elif not np.allclose(a, b, rtol=EMBEDDING_RTOL, atol=EMBEDDING_ATOL):
            worst = float(np.max(np.abs(a - b)))
            differ(f"embeddings of {list(tokens)} changed (largest |difference| {worst:.3g})")


def _compare_conditioning(old: CaseSnapshot, new: CaseSnapshot, profile, differ) -> None:
    a, b = old.conditioning, new.conditioning
    if (a is None) != (b is None):
        differ(f"conditioning {a} -> {b}")
        return
    if a is None:
        return
    if not profile.logprobs_agree(a["min_margin"], b["min_margin"]):
        differ(
            f"smallest greedy margin {a['min_margin']:.6g} (step {a['step']}) -> "
            f"{b['min_margin']:.6g} (step {b['step']})"
        )


def _short(request: dict, limit: int = 120) -> str:
    text = ", ".join(f"{k}={v}" for k, v in request.items())
    return text if len(text) <= limit else text[:limit] + "..."


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
