"""Kinds ``seed`` and ``distribution``: sampling that is repeatable and draws what it should.

``seed``: the same seed twice gives identical tokens; at least one of
``params.other_seeds`` gives different ones (else the seed, or sampling
itself, is ignored).

``distribution``: the engine answers the case's request many times, each time
with its own seed, and its draws are judged against the distribution that the
reference's log-probabilities and the sampler settings imply
(``conformance/sampling/stats.py``). Params:

- ``contexts``: the prompts (text) to sample at; default: the request's prompt;
- ``draws``: requests per context;
- ``alpha``: the case's family-wise significance (default 0.001);
- ``min_draws_to_fit`` (``max_tokens`` above 1 only): how many generations must
  reach a prefix for it to get a fit test of its own (default 100).

Two findings:

- ``support``: a draw that the settings exclude fails at once, naming the token
  and the filter (top_p, min_p, top_k) that excludes it; a correct engine never
  draws one;
- ``frequencies``: Pearson's chi-square at each context (Monte Carlo p-values
  where the chi-square limit is not accurate enough), Holm-corrected over all of
  the case's tests: a correct engine fails the case with probability at most
  ``alpha``.

With ``max_tokens`` 1 the draws are next tokens. Above 1 (plain or speculative
sampling over whole generations) every emitted token is judged against the reference's
distribution at the prefix it followed (the prompt plus the tokens emitted
before it). A generation's distribution is the product of these conditionals,
so an engine that keeps the target's distribution passes every one of them, and
one that does not fails some. A prefix reached by ``min_draws_to_fit``
generations is fit-tested on its own (that choice looks only at earlier tokens,
so each test keeps its size); all tokens emitted at one position are also tested
together, each against its own prefix's conditional, so that prefixes reached
too rarely to be tested alone still count. Every prefix gets the support check.

A third finding, ``sampled logprobs``: the logprob the engine reported with every
token it sampled must agree, within the precision profile's tolerance, with the
reference's log-probability of that token at the same prefix (the reference
teacher-forced on the engine's own tokens; ``conformance/sampling/paths.py``).
PROTOCOL.md S2 defines it before temperature and filters, so an engine reporting the
tempered or filtered distribution it drew from fails here while drawing correctly.
It is not statistical: a correct engine never fails it.

Each context's support must be *stable*: if nudging a filter's threshold by 1e-3
changed which tokens survive, a different but correct engine could disagree,
so such a case is reported as no longer testing what it says. (Speculative
prefixes, chosen by the engine's draws, are not screened: the chance that a
random one puts a token within float32 rounding of a threshold is of the order
of 1e-5.)

Seeds derive from the case id: verdicts are repeatable, and the false alarms
of different cases are independent. The same functions run with any way of
drawing (``conformance/sampling/draws.py``): the tests judge the catalogue's cases on fast
batched draws of the reference and of broken samplers.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from conformance.catalogue import Case, CatalogueError, build_request
from conformance.checks.context import CaseContext
from conformance.comparator import PASS
from conformance.profiles import PrecisionProfile
from conformance.sampling.draws import (
    Generation,
    GenerationDraw,
    NextTokenDraw,
    SequenceDraw,
    first_tokens,
    request_generation_draw,
)
from conformance.sampling.paths import SHOWN_MISMATCHES, PathLogprobs, compare_path_logprobs
from conformance.sampling.stats import (
    DEFAULT_ALPHA,
    Aggregate,
    ContextDraws,
    ImpliedDistribution,
    SamplerVerdict,
    implied_distribution,
    judge,
    support_is_stable,
)
from engines.protocol import GenerateRequest, SamplerSettings, Trace

DEFAULT_MIN_DRAWS_TO_FIT = 100
SHOWN_VIOLATIONS = 5

# The reference's full next-token log-probability vector after a token sequence.
LogprobsAt = Callable[[list[int]], np.ndarray]


# -- the seed check ---------------------------------------------------------------------------


def run_seed(ctx: CaseContext) -> None:
    request = ctx.request()
    ctx.require(request.capabilities_needed())
    first = ctx.run(request, "seeded")
    again = ctx.run(request, "same seed again")
    if first.tokens != again.tokens:
        pairs = zip(first.tokens, again.tokens)
        step = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(first), len(again)))
        ctx.fail(
            "same seed, same tokens",
            f"FAIL: seed {request.sampler.seed} gave different tokens on a second run, "
            f"from step {step}: {first.tokens} vs {again.tokens}",
        )
    else:
        ctx.add(
            "same seed, same tokens",
            PASS,
            f"pass: seed {request.sampler.seed} repeats {len(first)} tokens",
        )
    others = {}
    for seed in ctx.params["other_seeds"]:
        others[seed] = ctx.run(
            replace(request, sampler=replace(request.sampler, seed=seed)), f"seed {seed}"
        )
    if all(o.tokens == first.tokens for o in others.values()):
        ctx.fail(
            "other seeds, other tokens",
            f"FAIL: seeds {[request.sampler.seed, *others]} all gave the same tokens "
            f"{first.tokens}: the seed (or sampling itself) is ignored",
        )
    else:
        differ = sum(o.tokens != first.tokens for o in others.values())
        ctx.add(
            "other seeds, other tokens",
            PASS,
            f"pass: {differ} of {len(others)} other seeds gave other tokens",
        )


# -- a distribution case, made concrete -------------------------------------------------------


@dataclass(frozen=True)
class SamplingPlan:
    """What a distribution case draws where, and how it is judged."""

    name: str  # the case id: seeds derive from it
    # The request as the catalogue gives it: sampler settings, draft, processors, and
    # max_tokens, the length of each generation (1: next-token draws).
    request: GenerateRequest
    contexts: tuple[tuple[str, tuple[int, ...]], ...]  # (prompt text, its token ids)
    n_draws: int
    alpha: float = DEFAULT_ALPHA
    min_draws_to_fit: int = DEFAULT_MIN_DRAWS_TO_FIT

    @property
    def settings(self) -> SamplerSettings:
        return self.request.sampler

    @property
    def length(self) -> int:
        return self.request.max_tokens


def sampling_plan(case: Case, oracle) -> SamplingPlan:
    """The plan of a ``distribution`` case; ``oracle`` encodes its prompts."""
    request = build_request(case.request, oracle)
    params = case.params
    if request.sampler.greedy:
        raise CatalogueError(f"case {case.id}: a distribution case needs a temperature above 0")
    if "draws" not in params:
        raise CatalogueError(f"case {case.id}: params.draws (draws per context) is missing")
    texts = params.get("contexts")
    if texts:
        contexts = tuple((text, tuple(oracle.encode(text))) for text in texts)
    else:
        contexts = ((case.request.get("prompt", "the prompt"), tuple(request.prompt)),)
    return SamplingPlan(
        name=case.id,
        request=request,
        contexts=contexts,
        n_draws=int(params["draws"]),
        alpha=float(params.get("alpha", DEFAULT_ALPHA)),
        min_draws_to_fit=int(params.get("min_draws_to_fit", DEFAULT_MIN_DRAWS_TO_FIT)),
    )


def reference_logprobs(
    answer: Callable[[GenerateRequest, int], Trace], vocab_size: int, template: GenerateRequest
) -> LogprobsAt:
    """The reference's next-token log-probabilities, from its answers to greedy requests.

    The request is ``template`` (so the same logit bias and penalties apply) made
    greedy, one token long, without a draft; ``answer`` is the oracle's (or the
    case context's ``reference``), asked for every log-probability.
    """
    base = replace(
        template, sampler=SamplerSettings(), max_tokens=1, draft=None, prompt_embeddings=None
    )

    def at(tokens: list[int]) -> np.ndarray:
        trace = answer(replace(base, prompt=list(tokens)), vocab_size)
        vector = np.full(vocab_size, -np.inf)
        for token, logprob in trace.events[0].top_logprobs or []:
            vector[token] = logprob
        return vector

    return at


def case_seed(case_name: str, seed_set: int, index: int) -> int:
    """The seed for one context of one case: different per case, seed set and context."""
    entropy = [zlib.crc32(case_name.encode()), seed_set, index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


# -- judging draws ----------------------------------------------------------------------------


def judge_plan(
    plan: SamplingPlan,
    logprobs_at: LogprobsAt,
    draw: SequenceDraw,
    describe_token: Callable[[int], str] = str,
    decode: Callable[[list[int]], str] | None = None,
    seed_set: int = 0,
) -> SamplerVerdict:
    """Next-token or whole-generation draws, as the plan's ``max_tokens`` says."""
    if plan.length == 1:
        return judge_next_token(plan, logprobs_at, first_tokens(draw), describe_token, seed_set)
    return judge_sequences(plan, logprobs_at, draw, describe_token, decode, seed_set)


def judge_generations(
    plan: SamplingPlan,
    logprobs_at: LogprobsAt,
    draw: GenerationDraw,
    profile: PrecisionProfile,
    describe_token: Callable[[int], str] = str,
    decode: Callable[[list[int]], str] | None = None,
    seed_set: int = 0,
) -> tuple[SamplerVerdict, list[PathLogprobs]]:
    """``judge_plan`` on the generations' tokens, and their reported logprobs against the
    reference's on the same paths (one ``PathLogprobs`` per context)."""
    drawn: list[tuple[list[int], list[Generation]]] = []

    def tokens_draw(context, settings, seed, n, length):
        generations = draw(context, settings, seed, n, length)
        drawn.append((list(context), generations))
        return [g.tokens for g in generations]

    verdict = judge_plan(plan, logprobs_at, tokens_draw, describe_token, decode, seed_set)
    texts = {tokens: text for text, tokens in plan.contexts}
    paths = [
        compare_path_logprobs(
            repr(texts[tuple(context)]),
            context,
            generations,
            logprobs_at,
            profile.logprobs_agree,
            profile.logprob_tolerance,
        )
        for context, generations in drawn
    ]
    return verdict, paths


def judge_next_token(
    plan: SamplingPlan,
    logprobs_at: LogprobsAt,
    draw: NextTokenDraw,
    describe_token: Callable[[int], str] = str,
    seed_set: int = 0,
) -> SamplerVerdict:
    """``n_draws`` next tokens at each context, judged against the reference."""
    contexts = []
    for index, (text, tokens) in enumerate(plan.contexts):
        implied = stable_implied(plan, text, logprobs_at(list(tokens)))
        seed = case_seed(plan.name, seed_set, index)
        draws = draw(list(tokens), plan.settings, seed, plan.n_draws)
        contexts.append(context_draws(repr(text), implied, draws))
    return judge(contexts, plan.alpha, describe_token)


def judge_sequences(
    plan: SamplingPlan,
    logprobs_at: LogprobsAt,
    draw: SequenceDraw,
    describe_token: Callable[[int], str] = str,
    decode: Callable[[list[int]], str] | None = None,
    seed_set: int = 0,
) -> SamplerVerdict:
    """``n_draws`` generations per context; every emitted token judged at its prefix.

    Tests: each prefix reached by at least ``min_draws_to_fit`` generations on its
    own, and, for each position after the first, all tokens emitted there together
    (each against its own prefix's distribution).
    """
    contexts, aggregates = [], []
    for index, (text, prompt) in enumerate(plan.contexts):
        stable_implied(plan, text, logprobs_at(list(prompt)))
        seed = case_seed(plan.name, seed_set, index)
        sequences = draw(list(prompt), plan.settings, seed, plan.n_draws, plan.length)
        by_position: dict[int, list[ContextDraws]] = defaultdict(list)
        for prefix, tokens in sorted(group_by_prefix(sequences).items()):
            implied = implied_distribution(logprobs_at(list(prompt) + list(prefix)), plan.settings)
            fit = len(tokens) >= plan.min_draws_to_fit
            label = prefix_label(text, prefix, decode)
            context = context_draws(label, implied, tokens, fit)
            contexts.append(context)
            by_position[len(prefix)].append(context)
        aggregates += [
            Aggregate(f"{text!r} position {position + 1}, all prefixes", members)
            for position, members in sorted(by_position.items())
            if position > 0
        ]
    return judge(contexts, plan.alpha, describe_token, aggregates)


def stable_implied(plan: SamplingPlan, text: str, logprobs: np.ndarray) -> ImpliedDistribution:
    if not support_is_stable(logprobs, plan.settings):
        raise CatalogueError(
            f"case {plan.name} no longer tests what it says: at {text!r} a token lies within "
            f"1e-3 of a threshold of {describe_settings(plan.settings)}, so a correct engine "
            "may keep or drop it"
        )
    return implied_distribution(logprobs, plan.settings)


def context_draws(label: str, implied: ImpliedDistribution, draws, fit: bool = True):
    return ContextDraws(label, implied.probabilities, list(draws), implied.allowed_by_rule, fit)


def group_by_prefix(sequences: Sequence[Sequence[int]]) -> dict[tuple[int, ...], list[int]]:
    """Each emitted token, filed under the tokens emitted before it in its generation."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for sequence in sequences:
        for position, token in enumerate(sequence):
            groups[tuple(sequence[:position])].append(int(token))
    return dict(groups)


def prefix_label(text: str, prefix: tuple[int, ...], decode=None) -> str:
    if not prefix:
        return repr(text)
    shown = f" {decode(list(prefix))!r}" if decode is not None else ""
    return f"{text!r} + {list(prefix)}{shown}"


# -- the catalogue's check --------------------------------------------------------------------


def run_distribution(ctx: CaseContext) -> None:
    plan = sampling_plan(ctx.case, ctx.oracle)
    ctx.require(plan.request.capabilities_needed())

    def run(request: GenerateRequest) -> Generation:
        trace = ctx.run(request, f"draw with seed {request.sampler.seed}")
        return Generation(trace.tokens, [event.logprob for event in trace.events])

    verdict, paths = judge_generations(
        plan,
        reference_logprobs(ctx.reference, ctx.oracle.vocab_size, plan.request),
        request_generation_draw(run, plan.request),
        ctx.profile,
        ctx.oracle.token_text,
        ctx.oracle.decode,
    )
    record_verdict(ctx, plan, verdict)
    record_path_logprobs(ctx, paths)


def record_path_logprobs(ctx: CaseContext, paths: list[PathLogprobs]) -> None:
    compared = sum(p.compared for p in paths)
    if not compared:
        ctx.add("sampled logprobs", PASS, "pass: not compared (the engine reports no logprobs)")
        return
    largest = max(p.largest_difference for p in paths)
    scope = f"{compared} sampled tokens' logprobs, profile {ctx.profile.name}"
    wrong = [(p.context, m) for p in paths for m in p.mismatches]
    if not wrong:
        ctx.add(
            "sampled logprobs",
            PASS,
            f"pass: {scope} agree with the reference on the engine's paths "
            f"(largest difference {largest:.2g})",
        )
        return
    lines = [m.describe(context, ctx.oracle.token_text(m.token)) for context, m in wrong]
    summary = f"FAIL: {len(wrong)} of {scope} differ from the reference's: {lines[0]}"
    details = "\n".join(
        [summary, "the first mismatches (logprob: before temperature and filters, S2):"]
        + [f"  {line}" for line in lines[:SHOWN_MISMATCHES]]
    )
    ctx.fail("sampled logprobs", summary, details)


def record_verdict(ctx: CaseContext, plan: SamplingPlan, verdict: SamplerVerdict) -> None:
    settings = describe_settings(plan.settings)
    drawn = f"{plan.n_draws} {'draws' if plan.length == 1 else 'generations'}"
    n = len(plan.contexts)
    where = f"{drawn} at each of {n} contexts" if n > 1 else f"{drawn} at one context"
    violations = [r for r in verdict.results if r.violations]
    if violations:
        worst = next(r for r in violations if r.context == verdict.worst_context)
        drew = ", ".join(
            f"{v.token_text!r}({v.token}) x{v.count} ({_excluded_by(v.rules)})"
            for v in worst.violations[:SHOWN_VIOLATIONS]
        )
        summary = (
            f"FAIL: {settings} allows {worst.support_size} tokens, but the engine drew {drew} "
            f"at {worst.context}"
        )
        ctx.fail(
            "support",
            summary,
            f"{summary}\nevery draw outside the allowed tokens (a correct sampler draws none):\n"
            + "\n".join(f"  {v.describe()}" for r in violations for v in r.violations),
        )
    else:
        sizes = sorted({r.support_size for r in verdict.results if r.support_size})
        ctx.add(
            "support",
            PASS,
            f"pass: {settings}: every draw inside the allowed tokens "
            f"({'/'.join(map(str, sizes))} allowed; {where})",
        )
    tested = [r for r in verdict.results if r.tested]
    table = "\n".join(
        f"  {r.context}: {r.n_draws} tokens, chi-square {r.statistic:.1f} on {r.dof} df, "
        f"p = {r.p_value:.3g}, Holm-adjusted {r.adjusted_p_value:.3g}"
        for r in tested
    )
    head, *rest = verdict.fit_diagnostic.splitlines()
    summary = f"{head} [{settings}; {where}]"
    details = "\n".join([summary, *rest, "every fit test:", table])
    if not tested:
        ctx.add("frequencies", PASS, f"pass: nothing to fit-test [{settings}; {where}]")
    elif verdict.fit_passed:
        ctx.add("frequencies", PASS, summary, details)
    else:
        ctx.fail("frequencies", summary, details)


def describe_settings(s: SamplerSettings) -> str:
    parts = [f"temp {s.temp:g}"]
    if 0 < s.top_p < 1:
        parts.append(f"top_p {s.top_p:g}")
    if s.min_p > 0:
        parts.append(f"min_p {s.min_p:g}")
    if s.top_k > 0:
        parts.append(f"top_k {s.top_k}")
    return ", ".join(parts)


def _excluded_by(rules: list[str]) -> str:
    return f"excluded by {' and '.join(rules)}" if rules else "excluded by the combined filters"
