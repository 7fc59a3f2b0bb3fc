"""Kinds ``seed`` and ``distribution``: sampling that is repeatable and draws what it should.

``seed``: the same seed twice gives identical tokens; at least one of
``params.other_seeds`` gives different ones (else the seed, or sampling
itself, is ignored).

``distribution``: ``params.draws`` one-token samples with seeds 0, 1, ...
are judged against the distribution that the reference's logprobs and the
sampler settings imply (``sampling_stats.py``): a draw outside the allowed
set fails at once; the frequencies must pass a chi-square test at
``params.alpha``. Seeds are fixed, so a verdict is repeatable.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..comparator import PASS
from ..protocol import SamplerSettings
from ..sampling_stats import goodness_of_fit, implied_distribution
from .context import CaseContext

SHOWN_BINS = 5


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


def run_distribution(ctx: CaseContext) -> None:
    request = ctx.request()
    ctx.require(request.capabilities_needed())
    settings = request.sampler
    # The reference's full logprob vector at this context (greedy: logprobs do not
    # depend on the sampler, and a greedy request has no randomness to cache).
    greedy = replace(request, sampler=SamplerSettings(), max_tokens=1)
    vector = [float("-inf")] * ctx.oracle.vocab_size
    for token, logprob in ctx.reference(greedy, top=ctx.oracle.vocab_size).events[0].top_logprobs:
        vector[token] = logprob
    probs = implied_distribution(np.array(vector), settings)
    draws = int(ctx.params["draws"])
    alpha = float(ctx.params["alpha"])
    samples = []
    for seed in range(draws):
        trace = ctx.run(
            replace(request, max_tokens=1, sampler=replace(settings, seed=seed)), f"draw {seed}"
        )
        samples.append(trace.tokens[0])
    fit = goodness_of_fit(samples, probs)
    show = ctx.oracle.token_text
    settings_text = _settings(settings)
    if fit.outside_support:
        shown = ", ".join(f"{show(t)!r}({t}) x{c}" for t, c in sorted(fit.outside_support.items()))
        allowed = int((probs > 0).sum())
        ctx.fail(
            "support", f"FAIL: {settings_text} allows {allowed} tokens, but the engine drew {shown}"
        )
    else:
        ctx.add(
            "support",
            PASS,
            f"pass: all {draws} draws inside the {int((probs > 0).sum())} allowed tokens",
        )
    table = "; ".join(
        f"{_label(b, show)}: {obs} drawn, {exp:.1f} expected"
        for b, obs, exp in fit.bins[:SHOWN_BINS]
    )
    summary = (
        f"chi-square {fit.chi2:.1f}, df {fit.df}, p = {fit.p_value:.3g} "
        f"({draws} draws, {settings_text}, alpha {alpha:g})"
    )
    if fit.p_value < alpha:
        ctx.fail(
            "frequencies",
            f"FAIL: draws do not fit the implied distribution: {summary}",
            f"FAIL: {summary}\n  largest deviations: {table}",
        )
    else:
        ctx.add(
            "frequencies",
            PASS,
            f"pass: {summary}",
            f"pass: {summary}\n  largest deviations: {table}",
        )


def _settings(s: SamplerSettings) -> str:
    parts = [f"temp {s.temp:g}"]
    if 0 < s.top_p < 1:
        parts.append(f"top_p {s.top_p:g}")
    if s.min_p > 0:
        parts.append(f"min_p {s.min_p:g}")
    if s.top_k > 0:
        parts.append(f"top_k {s.top_k}")
    return ", ".join(parts)


def _label(tokens: list[int], show) -> str:
    if len(tokens) == 1:
        return f"{show(tokens[0])!r}({tokens[0]})"
    return f"{len(tokens)} rarer tokens"
