"""The tie-aware comparison of two token traces.

``compare_traces(expected, actual, profile, decode)`` judges ``actual`` (an
engine's answer) against ``expected`` (the reference's answer to the same
request, or the engine's own baseline in a self-consistency check):

1. Tokens must match exactly up to the first divergence.
2. At a divergence the *expected* side's log-probability margin between the
   two tokens decides. Below the profile's ``tie_epsilon`` it is a near-tie;
   anything else fails, with a diagnostic: step, both tokens decoded, both
   logprobs, top-5 of each side.
3. Over the matched prefix, chosen-token logprobs must agree within the
   profile's tolerance (where both sides reported them).
4. With no divergence, lengths and finish reasons must agree.
5. After a near-tie the two traces share nothing more, so the comparison
   *resumes on the engine's path* when the caller can say what the reference
   makes of that path (``resume``: the reference teacher-forced on the
   engine's tokens, see ``ReferenceOracle.continuation``). Every later step is
   judged there: the engine's token must be the reference's top token or
   within ``tie_epsilon`` of it (another near-tie, counted), and its logprob
   must agree with the reference's logprob of that token. Finish reason and
   length need no comparison on the engine's path: ``validation.py`` already
   holds them to the request (an end token ends it, "length" means exactly
   ``max_tokens``), and the last token is judged like any other. More than
   ``profile.max_near_ties`` near-ties make the comparison *near-tie-limited*
   (a near-tie verdict, not a fail: the case is too ill-conditioned for the
   engine to say more). Without ``resume`` (a self-consistency check, or
   snapshots that cannot score new continuations) the comparison stops at the
   first near-tie and says how many steps it left unjudged.

When the expected side did not list the engine's token among its top
logprobs, the margin is at least (its own logprob - the smallest listed
one); that bound is used, and it can only make a divergence *less* tie-like.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from conformance.profiles import PrecisionProfile
from engines.protocol import TokenEvent, Trace

Decode = Callable[[list[int]], str]
TokenText = Callable[[int], str]

PASS, NEAR_TIE, FAIL = "pass", "near-tie", "fail"

# What the reference makes of the engine's tokens: the reference's events along
# them (token = the engine's token, logprob and top list = the reference's).
Resume = Callable[[list[int]], Trace]


class ResumptionUnavailable(Exception):
    """The oracle cannot score an engine's own continuation (e.g. replayed snapshots)."""

TOP_SHOWN = 5  # top entries shown on each side in a diagnostic
CONTEXT_CHARS = 60  # decoded text shown before the step of a diagnostic


@dataclass
class RankedToken:
    token: int
    text: str
    logprob: float


@dataclass
class Diagnostic:
    """Where and how two traces differ, with everything a human needs to judge it."""

    # "token", "logprob", "length", "finish_reason", or "agreement" (``checks/agreement.py``:
    # the worst position of a text, ``step`` counting the token predicted)
    kind: str
    step: int
    context: str  # decoded text of the matched tokens just before ``step``
    expected_token: int | None = None
    expected_text: str | None = None
    actual_token: int | None = None
    actual_text: str | None = None
    # Expected side's logprobs of its own token and of the actual side's token.
    expected_logprob: float | None = None
    expected_logprob_of_actual: float | None = None
    actual_logprob: float | None = None
    actual_logprob_of_expected: float | None = None
    margin: float | None = None
    margin_is_lower_bound: bool = False
    tolerance: float | None = None
    expected_top: list[RankedToken] = field(default_factory=list)
    actual_top: list[RankedToken] = field(default_factory=list)
    detail: str = ""


@dataclass
class Comparison:
    verdict: str  # PASS, NEAR_TIE or FAIL
    summary: str
    matched_steps: int  # steps whose tokens equal the expected side's
    max_logprob_error: float | None = None
    diagnostic: Diagnostic | None = None
    # Resumption after near-ties (rule 5 of the module docstring):
    near_tie_steps: list[int] = field(default_factory=list)  # where the engine took a near-tie
    judged_steps: int | None = None  # steps judged in all (None: no near-tie, all of them)
    unjudged_steps: int = 0  # engine steps after a near-tie that nothing could judge
    near_tie_limited: bool = False  # more near-ties than the profile's cap

    def render(self, expected_label: str = "reference", actual_label: str = "engine") -> str:
        """A multi-line, human-readable account of the comparison."""
        lines = [self.summary]
        if self.diagnostic is not None:
            lines += render_diagnostic(self.diagnostic, expected_label, actual_label)
        return "\n".join(lines)


def compare_traces(
    expected: Trace,
    actual: Trace,
    profile: PrecisionProfile,
    decode: Decode,
    *,
    expected_label: str = "reference",
    actual_label: str = "engine",
    token_text: TokenText | None = None,
    resume: Resume | None = None,
) -> Comparison:
    """Judge ``actual`` against ``expected`` (see the module docstring).

    ``decode`` turns token lists into text (for context); ``token_text`` shows one
    token (default: ``decode`` of it alone); ``resume`` gives the reference's events
    along the engine's tokens, to go on judging after a near-tie (rule 5).
    """
    show = token_text or (lambda t: decode([t]))
    exp_tokens, act_tokens = expected.tokens, actual.tokens
    shared = min(len(exp_tokens), len(act_tokens))
    diverged_at = next((i for i in range(shared) if exp_tokens[i] != act_tokens[i]), None)
    matched = shared if diverged_at is None else diverged_at

    logprob_problem, max_error = _check_logprobs(expected, actual, matched, profile, decode, show)
    if logprob_problem is not None:
        d = logprob_problem
        summary = (
            f"FAIL: logprob of {d.expected_text!r} at step {d.step} differs: "
            f"{expected_label} {d.expected_logprob:.6g}, {actual_label} {d.actual_logprob:.6g} "
            f"(|diff| {abs(d.expected_logprob - d.actual_logprob):.3g} > tolerance "
            f"{d.tolerance:.3g}, profile {profile.name})"
        )
        # A token divergence before the bad logprob would be the more telling failure,
        # but logprobs are only checked over the matched prefix, so it cannot come first.
        return Comparison(FAIL, summary, matched, max_error, logprob_problem)

    if diverged_at is not None:
        first = _judge_divergence(
            expected,
            actual,
            diverged_at,
            profile,
            decode,
            show,
            max_error,
            expected_label,
            actual_label,
        )
        if first.verdict != NEAR_TIE:
            return first
        if resume is None:
            return _stopped_at_near_tie(first, len(actual), "no reference for the engine's path")
        try:
            path = resume(actual.tokens)
        except ResumptionUnavailable as why:
            return _stopped_at_near_tie(first, len(actual), str(why))
        return _resume_on_engine_path(
            first, path, actual, profile, decode, show, expected_label, actual_label
        )

    if len(exp_tokens) != len(act_tokens):
        longer, longer_label = (
            (actual, actual_label) if len(act_tokens) > shared else (expected, expected_label)
        )
        shorter_label = expected_label if longer is actual else actual_label
        shorter = expected if longer is actual else actual
        extra = longer.events[shared]
        d = Diagnostic(
            kind="length",
            step=shared,
            context=_context(exp_tokens[:shared], decode),
            expected_token=extra.token if longer is expected else None,
            actual_token=extra.token if longer is actual else None,
            detail=(
                f"{shorter_label} ended after {shared} tokens (finish_reason "
                f"{shorter.finish_reason!r}); {longer_label} went on with "
                f"{show(extra.token)!r} (id {extra.token}) to {len(longer)} tokens "
                f"(finish_reason {longer.finish_reason!r})"
            ),
        )
        summary = (
            f"FAIL: lengths differ: {expected_label} {len(exp_tokens)} tokens, "
            f"{actual_label} {len(act_tokens)} tokens, identical over the first {shared}"
        )
        return Comparison(FAIL, summary, shared, max_error, d)

    if expected.finish_reason != actual.finish_reason:
        d = Diagnostic(
            kind="finish_reason",
            step=max(shared - 1, 0),
            context=_context(exp_tokens, decode),
            detail=(
                f"{expected_label} finish_reason {expected.finish_reason!r}, "
                f"{actual_label} {actual.finish_reason!r}"
            ),
        )
        summary = (
            f"FAIL: finish reasons differ after identical {shared} tokens: "
            f"{expected_label} {expected.finish_reason!r}, {actual_label} {actual.finish_reason!r}"
        )
        return Comparison(FAIL, summary, shared, max_error, d)

    error = f", max logprob |diff| {max_error:.2g}" if max_error is not None else ""
    summary = f"pass: {shared} identical tokens, finish_reason {expected.finish_reason!r}{error}"
    return Comparison(PASS, summary, shared, max_error)


def margin_at(
    event: TokenEvent, other_token: int
) -> tuple[float | None, bool, float | None, float | None]:
    """The event's logprob margin between its own token and ``other_token``.

    Returns (margin, is_lower_bound, own logprob, logprob of other_token).
    """
    top = dict(event.top_logprobs or [])
    own = event.logprob if event.logprob is not None else top.get(event.token)
    if own is None or not top:
        return None, False, own, None
    if other_token in top:
        other = top[other_token]
        return own - other, False, own, other
    # Not listed: its logprob is at most the smallest listed one.
    return own - min(top.values()), True, own, None


def _judge_divergence(
    expected, actual, step, profile, decode, show, max_error, expected_label, actual_label
) -> Comparison:
    exp_event, act_event = expected.events[step], actual.events[step]
    margin, bound, exp_lp, exp_lp_of_act = margin_at(exp_event, act_event.token)
    _, _, act_lp, act_lp_of_exp = margin_at(act_event, exp_event.token)
    d = Diagnostic(
        kind="token",
        step=step,
        context=_context(expected.tokens[:step], decode),
        expected_token=exp_event.token,
        expected_text=show(exp_event.token),
        actual_token=act_event.token,
        actual_text=show(act_event.token),
        expected_logprob=exp_lp,
        expected_logprob_of_actual=exp_lp_of_act,
        actual_logprob=act_lp,
        actual_logprob_of_expected=act_lp_of_exp,
        margin=margin,
        margin_is_lower_bound=bound,
        expected_top=_ranked(exp_event, show),
        actual_top=_ranked(act_event, show),
    )
    choice = (
        f"at step {step} {expected_label} chose {d.expected_text!r} (id {d.expected_token}), "
        f"{actual_label} chose {d.actual_text!r} (id {d.actual_token})"
    )
    if margin is not None and not bound and margin < profile.tie_epsilon:
        summary = (
            f"near-tie: {choice}; {expected_label} margin {margin:.3g} < epsilon "
            f"{profile.tie_epsilon:g} (profile {profile.name}); compared {step} tokens before it"
        )
        return Comparison(NEAR_TIE, summary, step, max_error, d)
    if margin is None:
        why = f"{expected_label} reported no logprobs, so no near-tie can be recognised"
    else:
        at_least = ">= " if bound else ""
        why = f"{expected_label} margin {at_least}{margin:.3g} >= epsilon {profile.tie_epsilon:g}"
    summary = f"FAIL: tokens diverge: {choice}; {why} (profile {profile.name})"
    return Comparison(FAIL, summary, step, max_error, d)


def _stopped_at_near_tie(first: Comparison, length: int, why: str) -> Comparison:
    """A near-tie after which nothing can be judged: say so, and count what was left."""
    step = first.diagnostic.step
    unjudged = length - step - 1
    first.near_tie_steps = [step]
    first.judged_steps = step + 1
    first.unjudged_steps = unjudged
    if unjudged:
        first.summary += f"; {unjudged} later steps unjudged ({why})"
    return first


def _resume_on_engine_path(
    first: Comparison,
    path: Trace,
    actual: Trace,
    profile: PrecisionProfile,
    decode: Decode,
    show: TokenText,
    expected_label: str,
    actual_label: str,
) -> Comparison:
    """Judge every step from the first near-tie on against ``path``, the reference's events
    along the engine's own tokens (rule 5 of the module docstring)."""
    if path.tokens != actual.tokens:
        raise ValueError("resume() must answer along the engine's tokens")
    start = first.diagnostic.step
    ties: list[int] = []
    max_error = first.max_logprob_error
    label = f"{expected_label} on {actual_label}'s path"
    for step in range(start, len(actual)):
        ref, act = path.events[step], actual.events[step]
        best, best_logprob = (ref.top_logprobs or [(ref.token, ref.logprob)])[0]
        if act.token != best:
            margin = best_logprob - ref.logprob
            if margin >= profile.tie_epsilon:
                d = _path_diagnostic("token", step, path, actual, decode, show, best, margin)
                d.detail = _after_ties(ties)
                summary = (
                    f"FAIL: on {actual_label}'s own path, at step {step} {actual_label} chose "
                    f"{d.actual_text!r} (id {act.token}) where {expected_label}'s top token is "
                    f"{d.expected_text!r} (id {best}); margin {margin:.3g} >= epsilon "
                    f"{profile.tie_epsilon:g} (profile {profile.name}); {_after_ties(ties)}"
                )
                return _resumed(FAIL, summary, first, d, ties, step + 1, max_error)
            ties.append(step)
            if len(ties) > profile.max_near_ties:
                summary = (
                    f"near-tie-limited: {len(ties)} near-ties by step {step}, more than the "
                    f"cap of {profile.max_near_ties} (profile {profile.name}); "
                    f"{len(actual) - step - 1} later steps unjudged"
                )
                result = _resumed(NEAR_TIE, summary, first, first.diagnostic, ties, step + 1, None)
                result.near_tie_limited = True
                result.unjudged_steps = len(actual) - step - 1
                result.max_logprob_error = max_error
                return result
        if ref.logprob is None or act.logprob is None:
            continue
        error = abs(ref.logprob - act.logprob) if ref.logprob != act.logprob else 0.0
        max_error = error if max_error is None else max(max_error, error)
        if not profile.logprobs_agree(ref.logprob, act.logprob):
            d = _path_diagnostic("logprob", step, path, actual, decode, show, act.token, None)
            d.tolerance = profile.logprob_tolerance(ref.logprob)
            d.detail = _after_ties(ties)
            summary = (
                f"FAIL: on {actual_label}'s own path, logprob of {d.actual_text!r} at step "
                f"{step} differs: {label} {ref.logprob:.6g}, {actual_label} {act.logprob:.6g} "
                f"(|diff| {error:.3g} > tolerance {d.tolerance:.3g}, profile {profile.name}); "
                f"{_after_ties(ties)}"
            )
            return _resumed(FAIL, summary, first, d, ties, step + 1, max_error)
    error = f", max logprob |diff| {max_error:.2g}" if max_error is not None else ""
    summary = (
        f"near-tie: {len(ties)} near-tie{'s' if len(ties) != 1 else ''} crossed (steps "
        f"{', '.join(map(str, ties))}); all {len(actual)} steps judged, "
        f"{len(actual) - start} of them on {actual_label}'s own path{error}. First: "
        + first.summary.removeprefix("near-tie: ")
    )
    return _resumed(NEAR_TIE, summary, first, first.diagnostic, ties, len(actual), max_error)


def _resumed(verdict, summary, first, diagnostic, ties, judged, max_error) -> Comparison:
    return Comparison(
        verdict,
        summary,
        first.matched_steps,
        max_error,
        diagnostic,
        near_tie_steps=list(ties),
        judged_steps=judged,
    )


def _after_ties(ties: list[int]) -> str:
    steps = ", ".join(map(str, ties))
    return f"after {len(ties)} near-tie{'s' if len(ties) != 1 else ''} crossed (steps {steps})"


def _path_diagnostic(kind, step, path, actual, decode, show, expected_token, margin):
    """A diagnostic on the engine's path: the reference's view is ``path.events[step]``."""
    ref, act = path.events[step], actual.events[step]
    ref_top = dict(ref.top_logprobs or [])
    act_top = dict(act.top_logprobs or [])
    return Diagnostic(
        kind=kind,
        step=step,
        context=_context(actual.tokens[:step], decode),
        expected_token=expected_token,
        expected_text=show(expected_token),
        actual_token=act.token,
        actual_text=show(act.token),
        expected_logprob=ref_top.get(expected_token, ref.logprob),
        expected_logprob_of_actual=ref.logprob,
        actual_logprob=act.logprob,
        actual_logprob_of_expected=act_top.get(expected_token),
        margin=margin,
        expected_top=_ranked(ref, show),
        actual_top=_ranked(act, show),
    )


def _check_logprobs(expected, actual, matched, profile, decode, show):
    """First chosen-token logprob outside tolerance over the matched prefix, and the max error."""
    max_error = None
    for step in range(matched):
        e, a = expected.events[step].logprob, actual.events[step].logprob
        if e is None or a is None:
            continue
        error = abs(e - a) if e != a else 0.0  # equal infinities compare equal
        max_error = error if max_error is None else max(max_error, error)
        if not profile.logprobs_agree(e, a):
            event = expected.events[step]
            return (
                Diagnostic(
                    kind="logprob",
                    step=step,
                    context=_context(expected.tokens[:step], decode),
                    expected_token=event.token,
                    expected_text=show(event.token),
                    actual_token=event.token,
                    actual_text=show(event.token),
                    expected_logprob=e,
                    actual_logprob=a,
                    tolerance=profile.logprob_tolerance(e),
                    expected_top=_ranked(expected.events[step], show),
                    actual_top=_ranked(actual.events[step], show),
                ),
                max_error,
            )
    return None, max_error


def _ranked(event: TokenEvent, show: TokenText) -> list[RankedToken]:
    return [RankedToken(t, show(t), lp) for t, lp in (event.top_logprobs or [])[:TOP_SHOWN]]


def _context(tokens: list[int], decode: Decode) -> str:
    text = decode(tokens)
    return text if len(text) <= CONTEXT_CHARS else "..." + text[-CONTEXT_CHARS:]


def render_diagnostic(d: Diagnostic, expected_label: str, actual_label: str) -> list[str]:
    """The diagnostic as indented lines of text."""
    lines = [f"  step {d.step}, after {d.context!r}"]
    if d.detail:
        lines.append(f"  {d.detail}")
    if d.kind == "token":
        lines.append(
            f"  {expected_label}: logprob({d.expected_text!r}) = {_num(d.expected_logprob)}, "
            f"logprob({d.actual_text!r}) = "
            + (
                f"{_num(d.expected_logprob_of_actual)}"
                if not d.margin_is_lower_bound
                else "not in its top list"
            )
        )
        lines.append(
            f"  {actual_label}: logprob({d.actual_text!r}) = {_num(d.actual_logprob)}, "
            f"logprob({d.expected_text!r}) = {_num(d.actual_logprob_of_expected)}"
        )
    if d.kind == "logprob":
        lines.append(f"  tolerance {d.tolerance:.3g}")
    for label, top in ((expected_label, d.expected_top), (actual_label, d.actual_top)):
        if top:
            shown = ", ".join(f"{r.text!r}({r.token}) {r.logprob:.4f}" for r in top)
            lines.append(f"  {label} top-{len(top)}: {shown}")
    return lines


def _num(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.6g}"
