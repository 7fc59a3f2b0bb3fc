"""Sampler conformance cases, and how one is run against an engine's draws.

A case is data: a model, sampler settings, a few fixed contexts (text, encoded with
the reference tokenizer) and the number of draws per context. Running it:

1. the reference gives its next-token logprobs at each context, and
   ``implied_distribution`` turns them into the distribution the settings imply:
   the reference's own filters (top-p, min-p, top-k, in mlx-lm's order, on the
   untempered logprobs), then softmax(surviving logprobs / temperature);
2. the engine's ``draw`` callable (``sampler_draws.py``) gives N seeded draws there;
3. ``sampler_stats.judge`` runs the support checks and the Holm-corrected fit tests.

Speculative cases draw whole generations of ``length`` tokens. Each emitted token is
judged against the target's distribution at the context it actually followed (prompt
plus the tokens emitted before it). A generation's joint distribution is the product
of these conditionals, so a speculative engine that keeps the target's distribution
passes every one of them, and one that does not fails some. A prefix is fit-tested
when at least ``min_draws_to_fit`` generations reach it: that choice looks only at
earlier tokens, and given those, the next tokens are independent draws from the
target's conditional, so each test keeps its size. All tokens emitted at one position
are also tested together, each against its own prefix's conditional, so that prefixes
reached too rarely to be tested alone still count. Every prefix gets the support check.
(Unlike the catalogued prompts, these prefixes are not screened with
``support_is_stable``: the chance that a random one puts a token within float32
rounding of a filter's threshold is of the order of 1e-5.)

Significance: each case fails a correct engine with probability at most ``alpha``
(0.001, family-wise over its contexts; the support check never fails a correct engine
on the stable supports the cases use); a run of k cases, at most k x alpha.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from reference.sampler import apply_min_p, apply_top_k, apply_top_p

from .protocol import DraftSettings, SamplerSettings
from .sampler_draws import NextTokenDraw, SequenceDraw, next_token_logprobs
from .sampler_stats import DEFAULT_ALPHA, Aggregate, ContextDraws, SamplerVerdict, judge

# Contexts on dummy whose next-token distributions are spread over several tokens (the
# top token has 0.3-0.7 of the mass), so that every filter below removes something and
# keeps more than one token, and no token sits near a filter's threshold (see
# ``support_is_stable``; ``test_sampler_stats.py`` checks both).
DUMMY_CONTEXTS = ("hello world", "so", "yes or no?", "abc")
# On smollm2 a batched draw over its 49,152-token vocabulary costs about 1 s per 2000
# draws, and each filter about as much again: one context per case.
SMOLLM_SPREAD_CONTEXT = "I like to eat"  # top token 0.18; min-p 0.05 keeps 18 tokens
SMOLLM_PEAKED_CONTEXT = "The capital of France is"  # top token 0.77

# Draws per context. At N = 2000 every mutant in tests/sampler_mutants.py is caught
# with an asymptotic p-value below 1e-30 (or by 200+ draws outside the support); at
# 500 still below 1e-8; at 250 one seed set in five lets "top-p one token too few" pass.
# Batched on the reference a dummy case takes about 0.1 s. An engine drawing one
# request at a time (5-13 ms each for the reference on dummy here) needs 40-100 s for
# 4 contexts x 2000: such engines can run the cases with n_draws=500.
N_DRAWS = 2000
# Speculative generations are drawn one run at a time (7-10 ms each on dummy).
N_SEQUENCES = 500
# How far (probability mass for top_p, log-probability otherwise) a filter's threshold may
# move without changing a case's support; well above float32 rounding (~1e-7).
SUPPORT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SamplerCase:
    name: str
    model: str
    settings: SamplerSettings
    contexts: tuple[str, ...]
    n_draws: int = N_DRAWS
    draft: DraftSettings | None = None  # speculative cases only
    length: int = 1  # tokens per generation; above 1 for speculative cases
    min_draws_to_fit: int = 100  # a speculative prefix needs this many to be fit-tested
    about: str = ""

    @property
    def speculative(self) -> bool:
        return self.draft is not None


SAMPLER_CASES = (
    SamplerCase("temp-0.7", "dummy", SamplerSettings(temp=0.7), DUMMY_CONTEXTS),
    SamplerCase("temp-1.0", "dummy", SamplerSettings(temp=1.0), DUMMY_CONTEXTS),
    SamplerCase("top-k-5", "dummy", SamplerSettings(temp=1.0, top_k=5), DUMMY_CONTEXTS),
    SamplerCase("top-p-0.9", "dummy", SamplerSettings(temp=1.0, top_p=0.9), DUMMY_CONTEXTS),
    SamplerCase("min-p-0.1", "dummy", SamplerSettings(temp=1.0, min_p=0.1), DUMMY_CONTEXTS),
    SamplerCase(
        "combined",
        "dummy",
        SamplerSettings(temp=0.7, top_p=0.9, min_p=0.1, top_k=5),
        DUMMY_CONTEXTS,
        about="all filters at once, with a temperature: filters see untempered logprobs",
    ),
    # The cheap subset on the real model: one forward pass per context, batched draws.
    SamplerCase(
        "smollm-temp-1.0", "smollm2-135m", SamplerSettings(temp=1.0), (SMOLLM_PEAKED_CONTEXT,)
    ),
    SamplerCase(
        "smollm-combined",
        "smollm2-135m",
        SamplerSettings(temp=0.7, top_p=0.9, min_p=0.05, top_k=20),
        (SMOLLM_SPREAD_CONTEXT,),
    ),
)

SPECULATIVE_CASES = (
    SamplerCase(
        "speculative-self",
        "dummy",
        SamplerSettings(temp=0.7),
        ("so",),
        n_draws=N_SEQUENCES,
        draft=DraftSettings("self", num_draft_tokens=2),
        length=3,
        about="the target as its own draft: most proposals accepted",
    ),
    SamplerCase(
        "speculative-dummy-draft",
        "dummy",
        SamplerSettings(temp=1.0, top_p=0.9),
        ("hello world",),
        n_draws=N_SEQUENCES,
        draft=DraftSettings("dummy-draft", num_draft_tokens=2),
        length=3,
        about="a draft that disagrees with the target: many rejections",
    ),
)


# -- what the reference implies ---------------------------------------------------------------


@dataclass(eq=False)
class ImpliedDistribution:
    probabilities: np.ndarray  # float64 over the vocabulary; zero outside the support
    allowed_by_rule: dict[str, np.ndarray] = field(default_factory=dict)


def active_filters(settings: SamplerSettings):
    """(rule name, filter on a 1 x vocab logprob array) in mlx-lm's order, active ones only."""
    filters = []
    if 0 < settings.top_p < 1:
        filters.append(("top_p", lambda x: apply_top_p(x, settings.top_p)))
    if settings.min_p != 0:
        filters.append(
            ("min_p", lambda x: apply_min_p(x, settings.min_p, settings.min_tokens_to_keep))
        )
    if settings.top_k > 0:
        filters.append(("top_k", lambda x: apply_top_k(x, settings.top_k)))
    return filters


def implied_distribution(logprobs: np.ndarray, settings: SamplerSettings) -> ImpliedDistribution:
    """The distribution the reference samples from, given its logprobs and ``settings``.

    Each rule's own allowed set is kept too, to name the rule a stray draw breaks.
    """
    if settings.temp <= 0:
        raise ValueError(f"settings.temp must be > 0 for a sampling case, got {settings.temp}")
    logprobs = np.asarray(logprobs, dtype=np.float64).reshape(-1)
    row = mx.array(logprobs[None].astype(np.float32))
    chained = row
    allowed_by_rule = {}
    for name, keep in active_filters(settings):
        allowed_by_rule[name] = np.isfinite(np.array(keep(row)[0]))
        chained = keep(chained)
    allowed = np.isfinite(np.array(chained[0]))
    scaled = np.where(allowed, logprobs / settings.temp, -np.inf)
    weights = np.exp(scaled - scaled.max())
    return ImpliedDistribution(weights / weights.sum(), allowed_by_rule)


def support(logprobs: np.ndarray, settings: SamplerSettings) -> frozenset[int]:
    return frozenset(
        np.flatnonzero(implied_distribution(logprobs, settings).probabilities).tolist()
    )


def support_is_stable(
    logprobs: np.ndarray, settings: SamplerSettings, tolerance: float = SUPPORT_TOLERANCE
) -> bool:
    """Whether nudging each active threshold by ``tolerance`` leaves the support unchanged.

    top_p moves by ``tolerance`` in probability mass, min_p by a factor e^tolerance, and
    top_k must not separate two tokens whose logprobs are within ``tolerance`` (a near
    tie at the k-th place). An unstable support could legitimately differ in an engine
    whose arithmetic differs by that much, so cases use contexts where it is stable.
    """
    base = support(logprobs, settings)
    nudged = []
    if 0 < settings.top_p < 1:
        nudged += [
            replace(settings, top_p=min(max(settings.top_p + step, tolerance), 1 - tolerance))
            for step in (-tolerance, tolerance)
        ]
    if settings.min_p != 0:
        nudged += [
            replace(settings, min_p=min(settings.min_p * math.exp(step), 1.0))
            for step in (-tolerance, tolerance)
        ]
    if settings.top_k > 0:
        ordered = np.sort(np.asarray(logprobs, dtype=np.float64).reshape(-1))[::-1]
        if ordered[settings.top_k - 1] - ordered[settings.top_k] < tolerance:
            nudged.append(replace(settings, top_k=settings.top_k + 1))
    return all(support(logprobs, other) == base for other in nudged)


class ReferenceOracle:
    """The reference's answers for sampler cases: logprobs (cached) and implied distributions."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._logprobs: dict[tuple[int, ...], np.ndarray] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def describe_token(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs(self, context: list[int]) -> np.ndarray:
        key = tuple(context)
        if key not in self._logprobs:
            vector = next_token_logprobs(self.model, list(context))[0]
            self._logprobs[key] = np.array(vector.astype(mx.float32), dtype=np.float64)
        return self._logprobs[key]

    def implied(self, context: list[int], settings: SamplerSettings) -> ImpliedDistribution:
        return implied_distribution(self.logprobs(context), settings)


# -- running a case ---------------------------------------------------------------------------


def case_seed(case_name: str, seed_set: int, index: int) -> int:
    """The seed for one context of one case: different per case, seed set and context.

    Mixing the case's name in keeps different cases' draws independent, so their
    false alarms are too.
    """
    entropy = [zlib.crc32(case_name.encode()), seed_set, index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def context_draws(label: str, implied: ImpliedDistribution, draws, fit: bool = True):
    return ContextDraws(label, implied.probabilities, list(draws), implied.allowed_by_rule, fit)


def run_next_token_case(
    case: SamplerCase,
    oracle: ReferenceOracle,
    draw: NextTokenDraw,
    seed_set: int = 0,
    alpha: float = DEFAULT_ALPHA,
) -> SamplerVerdict:
    """N draws of the next token at each context of ``case``, judged against the reference."""
    if case.speculative:
        raise ValueError(f"case {case.name!r} is speculative: use run_speculative_case")
    contexts = []
    for index, text in enumerate(case.contexts):
        tokens = oracle.encode(text)
        draws = draw(tokens, case.settings, case_seed(case.name, seed_set, index), case.n_draws)
        implied = oracle.implied(tokens, case.settings)
        contexts.append(context_draws(f"{case.name} {text!r}", implied, draws))
    return judge(contexts, alpha, oracle.describe_token)


def group_by_prefix(sequences: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    """Each emitted token, filed under the tokens emitted before it in its generation."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for sequence in sequences:
        for position, token in enumerate(sequence):
            groups[tuple(sequence[:position])].append(token)
    return dict(groups)


def run_speculative_case(
    case: SamplerCase,
    oracle: ReferenceOracle,
    draw: SequenceDraw,
    seed_set: int = 0,
    alpha: float = DEFAULT_ALPHA,
) -> SamplerVerdict:
    """N generations per prompt; every emitted token judged at the prefix it followed.

    Tests: each prefix reached by at least ``min_draws_to_fit`` generations on its own,
    and, for each position after the first, all tokens emitted there together (each
    against its own prefix's distribution), so rarely reached prefixes count too.
    """
    contexts, aggregates = [], []
    for index, text in enumerate(case.contexts):
        prompt = oracle.encode(text)
        seed = case_seed(case.name, seed_set, index)
        sequences = draw(prompt, case.settings, seed, case.n_draws, case.length)
        by_position: dict[int, list[ContextDraws]] = defaultdict(list)
        for prefix, tokens in sorted(group_by_prefix(sequences).items()):
            implied = oracle.implied(prompt + list(prefix), case.settings)
            fit = len(tokens) >= case.min_draws_to_fit
            context = context_draws(prefix_label(case, text, prefix, oracle), implied, tokens, fit)
            contexts.append(context)
            by_position[len(prefix)].append(context)
        aggregates += [
            Aggregate(f"{case.name} {text!r} position {position + 1}, all prefixes", members)
            for position, members in sorted(by_position.items())
            if position > 0
        ]
    return judge(contexts, alpha, oracle.describe_token, aggregates)


def prefix_label(case: SamplerCase, text: str, prefix: tuple[int, ...], oracle) -> str:
    if not prefix:
        return f"{case.name} {text!r}"
    return f"{case.name} {text!r} + {list(prefix)} {oracle.tokenizer.decode(list(prefix))!r}"
