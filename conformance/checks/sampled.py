"""A seeded, sampled answer judged against the reference (the ``sampling`` combinations).

Another engine's random generator draws other tokens than the reference's, so a sampled
answer cannot be compared token by token with the reference's. Instead every token is
judged at the prefix the engine itself had produced (PROTOCOL.md S4, S2): it must be one
the sampler settings allow there, given the reference's log-probabilities at that prefix,
and the logprob reported with it must be the reference's (before temperature and filters).
A token within the profile's near-tie epsilon of the weakest allowed one is allowed too:
which side of a filter's threshold such a token falls on is rounding.

The other half of a sampled combination, "same seed, same tokens", compares the engine's
answers with each other (``CaseContext.compare``); nothing here is statistical, so a
correct engine never fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from conformance.profiles import PrecisionProfile
from conformance.sampling.stats import implied_distribution
from engines.protocol import SamplerSettings, Trace

SHOWN_PROBLEMS = 5

# The reference's full next-token log-probability vector after the engine's first tokens.
LogprobsAfter = Callable[[list[int]], np.ndarray]


@dataclass(frozen=True)
class SampledStep:
    step: int
    token: int
    problem: str  # what is wrong with this token, for people


def judge_sampled_path(
    trace: Trace,
    settings: SamplerSettings,
    logprobs_after: LogprobsAfter,
    profile: PrecisionProfile,
    token_text: Callable[[int], str] = str,
) -> list[SampledStep]:
    """Every step of ``trace`` whose token the settings exclude, or whose reported logprob
    is not the reference's (empty: the path is one the settings allow)."""
    problems = []
    tokens = trace.tokens
    for step, event in enumerate(trace.events):
        logprobs = logprobs_after(tokens[:step])
        kept = implied_distribution(logprobs, settings).probabilities > 0
        weakest = float(logprobs[kept].min())
        expected = float(logprobs[event.token])
        shown = f"{token_text(event.token)!r}({event.token})"
        if expected < weakest - profile.tie_epsilon:
            problems.append(
                SampledStep(
                    step,
                    event.token,
                    f"step {step}: {shown} (logprob {expected:.4g}) is not among the "
                    f"{int(kept.sum())} tokens the settings allow (the weakest {weakest:.4g})",
                )
            )
        elif event.logprob is not None and not profile.logprobs_agree(expected, event.logprob):
            problems.append(
                SampledStep(
                    step,
                    event.token,
                    f"step {step}: logprob of {shown} {event.logprob:.6g}, the reference's "
                    f"{expected:.6g} (tolerance {profile.logprob_tolerance(expected):.2g})",
                )
            )
    return problems
