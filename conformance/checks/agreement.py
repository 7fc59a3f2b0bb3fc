"""Kind ``agreement``: next-token distributions over a shipped text agree with the reference's.

The case's request is the text as its prompt; its first ``params.positions`` + 1
tokens are teacher-forced through ``score`` on both sides (the reference through
the oracle, so golden snapshots replay it) with the top ``REFERENCE_TOP``
logprobs per position, and compared position by position with the agreement
metrics of ``conformance/agreement.py`` (KL lower bound, top-1, |dp|). The
profile's agreement limits (PROTOCOL.md, J6) judge the whole: one finding,
which on failure names each limit broken and the worst position for the first.

A case judges one short generation step by step; this judges many positions of
text no greedy path reaches, at a tolerance per-step comparisons cannot have
(fp32 allows a mean KL of 1e-6, about a logprob error of 1e-3 at *every*
position, where one step may differ by 2e-3).
"""

from __future__ import annotations

from conformance.agreement import (
    Breach,
    Position,
    breaches,
    position,
    summarize,
    worst_position,
)
from conformance.checks.context import CaseContext, Finding
from conformance.comparator import FAIL, PASS, Diagnostic, RankedToken, render_diagnostic
from conformance.oracle import REFERENCE_TOP
from engines.protocol import ScoreRequest, TokenEvent

CONTEXT_TOKENS = 12  # tokens of text shown before the worst position
TOP_SHOWN = 5


def run(ctx: CaseContext) -> None:
    ctx.require({"score", "logprobs"})
    tokens = ctx.request().prompt[: ctx.params["positions"] + 1]
    request = ScoreRequest(prompt=tokens[:1], continuation=tokens[1:])
    expected = ctx.oracle.answer_score(request).events
    actual = ctx.run_score(request, top=REFERENCE_TOP).events
    text = ctx.params["text"]
    epsilon = ctx.profile.tie_epsilon
    measured = [
        position(text, i + 1, e.top_logprobs, a.top_logprobs, epsilon)
        for i, (e, a) in enumerate(zip(expected, actual, strict=True))
    ]
    summary = summarize(measured)
    figures = (
        f"{summary.positions} positions of {text} (top {REFERENCE_TOP} per side): "
        f"KL mean {summary.kl_mean:.3g}, p99 {summary.kl_p99:.3g}, max {summary.kl_max:.3g}; "
        f"top-1 {summary.top1:.1%}, at {summary.clear_positions} clear positions "
        f"{summary.clear_top1:.1%}; |dp| p99 {summary.dp_p99:.3g}, max {summary.dp_max:.3g}"
    )
    broken = breaches(summary, ctx.profile.agreement)
    check = "agreement vs reference"
    if not broken:
        ctx.add(check, PASS, f"pass: {figures}")
        return
    first = broken[0]
    worst = worst_position(measured, first.metric)
    diagnostic = _diagnostic(ctx, tokens, worst, first, expected, actual)
    summary_line = (
        f"FAIL: {'; '.join(str(b) for b in broken)} (profile {ctx.profile.name}); "
        f"worst position {worst.index}"
    )
    details = "\n".join(
        [summary_line, f"  {figures}", *render_diagnostic(diagnostic, "reference", ctx.engine_name)]
    )
    ctx.findings.append(Finding(check, FAIL, summary_line, details, diagnostic))


def _diagnostic(
    ctx: CaseContext,
    tokens: list[int],
    worst: Position,
    breach: Breach,
    expected: list[TokenEvent],
    actual: list[TokenEvent],
) -> Diagnostic:
    """The worst position as a comparison diagnostic: the text before it and both top lists.
    ``worst.index`` counts the token predicted, so its events are at ``index - 1``."""
    show = ctx.oracle.token_text
    index = worst.index
    ref, eng = expected[index - 1], actual[index - 1]
    ref_top, eng_top = ref.top_logprobs[0][0], eng.top_logprobs[0][0]
    return Diagnostic(
        kind="agreement",
        step=index,
        context=ctx.oracle.decode(tokens[max(0, index - CONTEXT_TOKENS) : index]),
        expected_token=ref_top,
        expected_text=show(ref_top),
        actual_token=eng_top,
        actual_text=show(eng_top),
        detail=(
            f"{breach.metric} is worst here ({_value_at(worst, breach.metric)}); "
            f"the text goes on with {show(tokens[index])!r}; "
            f"top token: reference {show(ref_top)!r}, engine {show(eng_top)!r}"
        ),
        expected_top=_ranked(ref, show),
        actual_top=_ranked(eng, show),
    )


def _ranked(event: TokenEvent, show) -> list[RankedToken]:
    return [RankedToken(t, show(t), lp) for t, lp in event.top_logprobs[:TOP_SHOWN]]


def _value_at(worst: Position, metric: str) -> str:
    if metric.startswith("KL"):
        return f"KL {worst.kl:.3g}"
    if metric.startswith("|dp|"):
        return f"dp {worst.dp:+.3g}"
    # A broken top-1 figure has a disagreement, so the worst position is one.
    return f"the reference ranks the engine's top token {worst.crossed:.3g} nats below its own"
