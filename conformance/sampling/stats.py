"""Statistics for sampler conformance: does an engine draw from the distribution it should?

At a fixed context the reference's log-probabilities and the sampler settings say
which tokens may be drawn (the *support*: what survives top-p, min-p and top-k) and
with what probability each is drawn (the *implied distribution*: softmax of the
surviving log-probabilities divided by the temperature). ``implied_distribution``
states mlx-lm's semantics, which the reference follows: the filters act on the
*untempered* log-probabilities, in the order top-p, min-p, top-k, each on what the
previous one left; the temperature applies only to the survivors. Given N seeded
draws of an engine at that context, two checks:

1. **Support (hard).** A correct engine never draws a token outside the support, so a
   single such draw fails the case at once, naming the token and the rule that excludes
   it. No statistics are needed: under a correct engine this has probability zero.

2. **Goodness of fit.** Pearson's chi-square test of the observed counts against the
   implied distribution. Why this test:

   - an exact multinomial test enumerates every way of splitting N draws over the
     cells: hopeless for N in the thousands;
   - the G-test (likelihood ratio) has the same large-sample chi-square limit, but its
     null distribution approaches the limit more slowly when expected counts are small
     and it is then too liberal; Pearson's X² stays closer to its nominal size
     (Koehler and Larntz 1980; Cressie and Read 1984);
   - cells whose expected count is below ``MIN_EXPECTED`` (Cochran's rule of five) are
     pooled into one "rest" cell before testing. The pooling looks at the *expected*
     counts only, never at what was drawn, so it cannot bias the test.

   The chi-square distribution is only the large-sample limit of X². Simulated at
   N = 2000 on this suite's distributions, its tail probabilities near 1e-4 (where the
   decisions are made) are too small by up to a factor of 2: relying on it would raise
   more false alarms than stated. So wherever the asymptotic p-value is small enough to
   matter (below ten times alpha), the decision uses a Monte Carlo p-value instead: X²
   of B samples drawn from the implied distribution itself,
   p = (1 + #{simulated X² >= observed X²}) / (1 + B). That p-value is valid for any B
   (under the null, P(p <= u) <= u), so the stated false-alarm rate holds. Above ten
   times alpha the asymptotic value stands: Holm never compares a p-value with more
   than alpha, so it cannot change a decision there, and it spares the simulation in
   the common case.

A fit may also pool several contexts (``Aggregate``): every token a speculative engine
emitted at its third position, say, each following its own prefix. The expected count
of a token is then the sum over the contexts of draws x probability, and the simulation
draws each context's share from that context's distribution.

Several contexts (and aggregates) make one case, and each gives one p-value. Holm's
step-down procedure turns them into adjusted p-values that control the family-wise
error rate: a correct engine fails a case through the fit tests with probability at
most ``alpha``, default 0.001. Holm rejects everything Bonferroni does and sometimes
more, with the same guarantee, and needs no independence between the tests.

Everything here is plain NumPy/SciPy on plain data (no MLX: snapshot checks run
without it): the model, the engine and the draws live elsewhere (``checks/sampling.py``
runs the catalogue's cases, ``draws.py`` holds ways to draw).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import stats

from engines.protocol import SamplerSettings

DEFAULT_ALPHA = 0.001
MIN_EXPECTED = 5.0
# Asymptotic p-values below this many times alpha are replaced by Monte Carlo ones.
SIMULATE_BELOW_ALPHA_TIMES = 10
# Monte Carlo resolution: the smallest possible p-value, 1 / (B + 1), stays at least
# this many times below the smallest threshold Holm uses (alpha / family size).
RESOLUTION_FACTOR = 10
MIN_SIMULATIONS = 10_000
# How far (probability mass for top_p, log-probability otherwise) a filter's threshold may
# move without changing a context's support; well above float32 rounding (~1e-7).
SUPPORT_TOLERANCE = 1e-3


# -- what the settings imply ------------------------------------------------------------------


@dataclass(eq=False)
class ImpliedDistribution:
    """The distribution a sampler should draw from at one context.

    ``probabilities``: float64 over the vocabulary, zero outside the support.
    ``allowed_by_rule``: for each active filter ("top_p", "min_p", "top_k"), the tokens
    that filter alone keeps, so that a draw outside the support can be blamed on a rule.
    """

    probabilities: np.ndarray
    allowed_by_rule: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def support(self) -> frozenset[int]:
        return frozenset(np.flatnonzero(self.probabilities).tolist())


def implied_distribution(logprobs: np.ndarray, settings: SamplerSettings) -> ImpliedDistribution:
    """What ``settings`` imply, given the full next-token log-probability vector."""
    if settings.temp <= 0:
        raise ValueError(f"settings.temp must be > 0 for a sampling case, got {settings.temp}")
    untempered = np.asarray(logprobs, dtype=np.float64).reshape(-1)
    kept = untempered
    allowed_by_rule = {}
    for name, keep in active_filters(settings):
        allowed_by_rule[name] = np.isfinite(keep(untempered))
        kept = keep(kept)
    scaled = kept / settings.temp
    weights = np.exp(scaled - scaled.max())
    return ImpliedDistribution(weights / weights.sum(), allowed_by_rule)


def active_filters(settings: SamplerSettings):
    """(rule name, filter on a logprob vector) for each active filter, in mlx-lm's order."""
    filters = []
    if 0 < settings.top_p < 1:
        filters.append(("top_p", lambda x: _top_p(x, settings.top_p)))
    if settings.min_p > 0:
        filters.append(("min_p", lambda x: _min_p(x, settings.min_p, settings.min_tokens_to_keep)))
    if settings.top_k > 0:
        filters.append(("top_k", lambda x: _top_k(x, settings.top_k)))
    return filters


def _top_p(logprobs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep a token iff the tokens ranked above it hold less than ``top_p`` of the mass
    (so the token that crosses the threshold is kept; ties at the threshold all are)."""
    order = np.sort(logprobs)[::-1]
    probs = np.exp(order)
    mass_above = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    threshold = order[mass_above < top_p * probs.sum()].min()
    return np.where(logprobs < threshold, -np.inf, logprobs)


def _min_p(logprobs: np.ndarray, min_p: float, min_tokens_to_keep: int) -> np.ndarray:
    """Keep tokens with probability at least ``min_p`` times the top token's, and at
    least the ``min_tokens_to_keep`` most likely."""
    keep = logprobs >= logprobs.max() + np.log(min_p)
    keep[np.argsort(logprobs)[::-1][:min_tokens_to_keep]] = True
    return np.where(keep, logprobs, -np.inf)


def _top_k(logprobs: np.ndarray, top_k: int) -> np.ndarray:
    keep = np.zeros(logprobs.shape, dtype=bool)
    keep[np.argsort(logprobs, kind="stable")[::-1][:top_k]] = True
    return np.where(keep, logprobs, -np.inf)


def support_is_stable(
    logprobs: np.ndarray, settings: SamplerSettings, tolerance: float = SUPPORT_TOLERANCE
) -> bool:
    """Whether nudging each active threshold by ``tolerance`` leaves the support unchanged.

    top_p moves by ``tolerance`` in probability mass, min_p by a factor e^tolerance, and
    top_k must not separate two tokens whose logprobs are within ``tolerance`` (a near
    tie at the k-th place). An unstable support could legitimately differ in an engine
    whose arithmetic differs by that much, so cases use contexts where it is stable.
    """
    base = implied_distribution(logprobs, settings).support
    nudged = []
    if 0 < settings.top_p < 1:
        nudged += [
            replace(settings, top_p=min(max(settings.top_p + step, tolerance), 1 - tolerance))
            for step in (-tolerance, tolerance)
        ]
    if settings.min_p > 0:
        nudged += [
            replace(settings, min_p=min(settings.min_p * math.exp(step), 1.0))
            for step in (-tolerance, tolerance)
        ]
    ordered = np.sort(np.asarray(logprobs, dtype=np.float64).reshape(-1))[::-1]
    k = settings.top_k
    if 0 < k < len(ordered) and ordered[k - 1] - ordered[k] < tolerance:
        nudged.append(replace(settings, top_k=k + 1))
    return all(implied_distribution(logprobs, other).support == base for other in nudged)


@dataclass(eq=False)
class ContextDraws:
    """One context of a case: what the reference implies there, and what the engine drew.

    ``probabilities`` is the implied distribution over the whole vocabulary (zero
    outside the support). ``allowed_by_rule`` maps each active filter ("top_p",
    "min_p", "top_k") to the tokens that filter alone lets through, so that a
    draw outside the support can be blamed on the right rule. ``fit`` is False for
    contexts that only get the support check (too few draws to test the fit alone).
    """

    label: str
    probabilities: np.ndarray
    draws: Sequence[int]
    allowed_by_rule: dict[str, np.ndarray] = field(default_factory=dict)
    fit: bool = True


@dataclass(eq=False)
class Aggregate:
    """Several contexts whose draws are fit-tested together (their support is checked each)."""

    label: str
    contexts: list[ContextDraws]


@dataclass
class SupportViolation:
    context: str
    token: int
    token_text: str
    count: int  # how many of the draws were this token
    rules: list[str]  # the filters that exclude it ("top_p", ...); empty: none excluded it alone

    def describe(self) -> str:
        why = " and ".join(self.rules) if self.rules else "the combined filters"
        return (
            f"{self.context}: token {self.token} {self.token_text!r} was drawn {self.count}x "
            f"but {why} excludes it"
        )


@dataclass
class CellDeviation:
    """One pooled cell: observed against expected count, and the standardized residual."""

    tokens: list[int]  # one token, or the several tokens of the pooled "rest" cell
    label: str
    observed: int
    expected: float
    residual: float  # (observed - expected) / sqrt(expected)


@dataclass
class FitResult:
    statistic: float
    dof: int
    p_value: float  # from the chi-square limit
    cells: list[CellDeviation]
    # What a simulation needs: per context, its number of draws and its cell probabilities.
    parts: list[tuple[int, np.ndarray]] = field(default_factory=list)


@dataclass
class ContextResult:
    context: str
    n_draws: int
    tested: bool  # whether a fit test ran (it joins the Holm family)
    statistic: float
    dof: int
    p_value: float  # the one decisions use: Monte Carlo where small, else asymptotic
    asymptotic_p_value: float  # from the chi-square limit, for scale (may be far below 1e-5)
    adjusted_p_value: float  # Holm-adjusted p_value; 1.0 when not tested
    violations: list[SupportViolation]
    largest_deviations: list[CellDeviation]
    support_size: int = 0  # tokens the settings allow here; 0 for a pooled aggregate


@dataclass
class SamplerVerdict:
    """The outcome of one sampler case: plain data, JSON-serialisable via ``dataclasses.asdict``."""

    passed: bool
    alpha: float
    results: list[ContextResult]
    worst_context: str
    diagnostic: str  # about the worst context: its support violations, else its fit
    fit_diagnostic: str = ""  # about the worst fit test, whatever the support checks found

    @property
    def support_passed(self) -> bool:
        return not self.violations

    @property
    def fit_passed(self) -> bool:
        return all(r.adjusted_p_value > self.alpha for r in self.results)

    @property
    def p_values(self) -> dict[str, float]:
        return {r.context: r.p_value for r in self.results if r.tested}

    @property
    def adjusted_p_values(self) -> dict[str, float]:
        return {r.context: r.adjusted_p_value for r in self.results if r.tested}

    @property
    def violations(self) -> list[SupportViolation]:
        return [v for r in self.results for v in r.violations]


# -- support ----------------------------------------------------------------------------------


def support_violations(
    context: ContextDraws, describe_token: Callable[[int], str] = str
) -> list[SupportViolation]:
    """Every distinct drawn token that the implied distribution gives probability zero."""
    vocab_size = len(context.probabilities)
    tokens, counts = np.unique(np.asarray(context.draws, dtype=np.int64), return_counts=True)
    violations = []
    for token, count in zip(tokens.tolist(), counts.tolist(), strict=True):
        outside_vocab = not 0 <= token < vocab_size
        if outside_vocab or context.probabilities[token] == 0:
            rules = (
                [f"the vocabulary [0, {vocab_size})"]
                if outside_vocab
                else [name for name, keep in context.allowed_by_rule.items() if not keep[token]]
            )
            text = "<outside vocabulary>" if outside_vocab else describe_token(token)
            violations.append(SupportViolation(context.label, token, text, count, rules))
    return violations


# -- goodness of fit --------------------------------------------------------------------------


def pooled_cells(probabilities: np.ndarray, n_draws: int, min_expected: float = MIN_EXPECTED):
    """Group the supported tokens into cells whose expected counts are all >= ``min_expected``.

    Tokens expected at least ``min_expected`` times keep a cell of their own; the
    others are pooled into one "rest" cell. If the rest is still too small it joins
    the smallest of the other cells. Depends on the expected counts only.
    """
    supported = np.flatnonzero(probabilities > 0)
    order = supported[np.argsort(-probabilities[supported], kind="stable")]
    big = [[int(t)] for t in order if probabilities[t] * n_draws >= min_expected]
    rest = [int(t) for t in order if probabilities[t] * n_draws < min_expected]
    if not rest:
        return big
    if not big or probabilities[rest].sum() * n_draws >= min_expected:
        return [*big, rest]
    return [*big[:-1], big[-1] + rest]  # the last big cell is the smallest


def inside_support(probabilities: np.ndarray, draws: Sequence[int]) -> np.ndarray:
    """The draws that the support check did not already reject."""
    draws = np.asarray(draws, dtype=np.int64)
    draws = draws[(draws >= 0) & (draws < len(probabilities))]
    return draws[probabilities[draws] > 0]


def chi_square_fit(
    parts: Sequence[tuple[np.ndarray, Sequence[int]]],
    min_expected: float = MIN_EXPECTED,
    describe_token: Callable[[int], str] = str,
) -> FitResult:
    """Pearson's X² of the draws against their implied distributions, small cells pooled.

    ``parts`` holds (probabilities, draws) for each context judged together (usually
    one). Draws outside a context's support are not counted here (the support check
    reports them). With fewer than two cells there is nothing to test: statistic 0,
    0 degrees of freedom, p-value 1.
    """
    normalized = [np.asarray(p, dtype=np.float64) / np.sum(p) for p, _ in parts]
    kept = [inside_support(p, draws) for p, (_, draws) in zip(normalized, parts, strict=True)]
    sizes = [len(k) for k in kept]
    n = sum(sizes)
    if n == 0:
        return FitResult(0.0, 0, 1.0, [])
    expected_per_token = sum(size * p for size, p in zip(sizes, normalized, strict=True))
    cells = pooled_cells(expected_per_token / n, n, min_expected)
    if len(cells) < 2:
        return FitResult(0.0, 0, 1.0, [])
    counts = np.bincount(np.concatenate(kept), minlength=len(expected_per_token))
    observed = np.array([counts[c].sum() for c in cells], dtype=np.float64)
    expected = np.array([expected_per_token[c].sum() for c in cells])
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(cells) - 1
    deviations = [
        CellDeviation(
            tokens=c,
            label=f"token {c[0]} {describe_token(c[0])!r}"
            if len(c) == 1
            else f"{len(c)} pooled tokens",
            observed=int(o),
            expected=float(e),
            residual=float((o - e) / np.sqrt(e)),
        )
        for c, o, e in zip(cells, observed, expected, strict=True)
    ]
    cell_probabilities = [
        (size, np.array([p[c].sum() for c in cells]))
        for size, p in zip(sizes, normalized, strict=True)
        if size
    ]
    p_value = float(stats.chi2.sf(statistic, dof))
    return FitResult(statistic, dof, p_value, deviations, cell_probabilities)


def monte_carlo_p_value(fit: FitResult, n_simulations: int) -> float:
    """P(X² >= observed) under the implied distributions, by simulation: valid for any B.

    Each simulated sample draws, for every context in the fit, as many tokens as were
    observed there, from that context's cell probabilities (same pooling). Simulated
    values equal to the observed one count as "at least as extreme" (a relative 1e-9
    absorbs rounding), which keeps the p-value conservative.

    The simulation is seeded with the observed counts: the same draws always get the
    same p-value, while the simulated samples stay (pseudo-)independent of the draws,
    which the validity argument needs. A fixed seed would not do: the test's size would
    then be stuck at one random realisation, off by a relative 1/sqrt(alpha * B) or so.
    """
    if fit.dof == 0:
        return 1.0
    observed = np.array([cell.observed for cell in fit.cells])
    expected = np.array([cell.expected for cell in fit.cells])
    rng = np.random.default_rng(observed.tolist())
    simulated_counts = np.zeros((n_simulations, len(expected)))
    for size, cell_probabilities in fit.parts:
        # A cell holding nearly all the mass may sum to 1 + 1e-16, which multinomial refuses.
        cell_probabilities = np.minimum(cell_probabilities, 1.0)
        simulated_counts += rng.multinomial(size, cell_probabilities, n_simulations)
    simulated = ((simulated_counts - expected) ** 2 / expected).sum(axis=1)
    extreme = int((simulated >= fit.statistic * (1 - 1e-9)).sum())
    return (1 + extreme) / (1 + n_simulations)


def simulations_needed(alpha: float, family_size: int) -> int:
    """B such that 1 / (B + 1) is ``RESOLUTION_FACTOR`` times below alpha / family size."""
    return max(MIN_SIMULATIONS, math.ceil(RESOLUTION_FACTOR * family_size / alpha))


# -- multiple testing ---------------------------------------------------------------------------


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: reject hypothesis i at FWER alpha iff adjusted <= alpha.

    Sort the m p-values ascending; the i-th smallest (i from 0) is multiplied by m - i,
    and a running maximum keeps the adjusted values in the same order as the raw ones.
    """
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


# -- the verdict ------------------------------------------------------------------------------


def judge(
    contexts: Sequence[ContextDraws],
    alpha: float = DEFAULT_ALPHA,
    describe_token: Callable[[int], str] = str,
    aggregates: Sequence[Aggregate] = (),
    min_expected: float = MIN_EXPECTED,
) -> SamplerVerdict:
    """Support checks, and Holm-corrected fit tests over the contexts and aggregates of one case."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not contexts:
        raise ValueError("contexts must not be empty")
    # (label, contexts fit together, whether to fit, whether to check the support)
    units = [(c.label, [c], c.fit, True) for c in contexts] + [
        (a.label, a.contexts, True, False) for a in aggregates
    ]
    no_fit = FitResult(0.0, 0, 1.0, [])
    fits = [
        chi_square_fit([(c.probabilities, c.draws) for c in members], min_expected, describe_token)
        if fit
        else no_fit
        for _, members, fit, _ in units
    ]
    tested = [f.dof > 0 for f in fits]
    n_simulations = simulations_needed(alpha, max(1, sum(tested)))
    p_values = [
        monte_carlo_p_value(f, n_simulations)
        if f.dof > 0 and f.p_value < SIMULATE_BELOW_ALPHA_TIMES * alpha
        else f.p_value
        for f in fits
    ]
    adjusted = iter(holm_adjusted([p for p, t in zip(p_values, tested, strict=True) if t]))
    results = []
    for (label, members, _, check_support), fit, p_value, is_tested in zip(
        units, fits, p_values, tested, strict=True
    ):
        results.append(
            ContextResult(
                context=label,
                n_draws=sum(len(c.draws) for c in members),
                tested=is_tested,
                statistic=fit.statistic,
                dof=fit.dof,
                p_value=p_value,
                asymptotic_p_value=fit.p_value,
                adjusted_p_value=next(adjusted) if is_tested else 1.0,
                violations=support_violations(members[0], describe_token) if check_support else [],
                largest_deviations=sorted(fit.cells, key=lambda cell: -abs(cell.residual))[:3],
                support_size=int(np.count_nonzero(members[0].probabilities))
                if check_support
                else 0,
            )
        )
    worst = worst_result(results)
    fit_passed = all(r.adjusted_p_value > alpha for r in results)
    passed = not any(r.violations for r in results) and fit_passed
    worst_fit = min(results, key=lambda r: (r.adjusted_p_value, r.asymptotic_p_value))
    return SamplerVerdict(
        passed=passed,
        alpha=alpha,
        results=results,
        worst_context=worst.context,
        diagnostic=diagnose(worst, passed, alpha, sum(tested)),
        fit_diagnostic=diagnose(replace(worst_fit, violations=[]), fit_passed, alpha, sum(tested)),
    )


def worst_result(results: Sequence[ContextResult]) -> ContextResult:
    """The context with the most out-of-support draws, else the smallest adjusted p-value."""
    with_violations = [r for r in results if r.violations]
    if with_violations:
        return max(with_violations, key=lambda r: sum(v.count for v in r.violations))
    return min(results, key=lambda r: (r.adjusted_p_value, r.asymptotic_p_value))


def diagnose(worst: ContextResult, passed: bool, alpha: float, family_size: int) -> str:
    """A few lines a person can act on: what failed where, and by how much."""
    if worst.violations:
        lines = ["support violation (a correct sampler never draws these):"]
        lines += [f"  {v.describe()}" for v in worst.violations[:5]]
        return "\n".join(lines)
    verdict = "pass" if passed else "FAIL"
    # p_value is simulated where it is small (the chi-square distribution is only the
    # large-sample approximation); the approximation's value is shown beside it for scale.
    approximate = (
        ""
        if worst.p_value == worst.asymptotic_p_value
        else f" by simulation (chi-square approximation: {worst.asymptotic_p_value:.3g})"
    )
    head = (
        f"{verdict}: worst context {worst.context}: chi-square {worst.statistic:.1f} on "
        f"{worst.dof} df over {worst.n_draws} draws, p = {worst.p_value:.3g}{approximate}; "
        f"Holm-adjusted over {family_size} tests: {worst.adjusted_p_value:.3g}, against the "
        f"family-wise significance threshold {alpha:g}"
    )
    cells = [
        f"  {cell.label}: observed {cell.observed}, expected {cell.expected:.1f} "
        f"(residual {cell.residual:+.1f})"
        for cell in worst.largest_deviations
    ]
    return "\n".join([head, *cells]) if cells and not passed else head
