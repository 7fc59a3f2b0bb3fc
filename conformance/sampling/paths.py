"""The logprobs an engine reports along its own sampled generations.

PROTOCOL.md S2: a sampled token's ``logprob`` is the log-softmax of the model (after
logit bias and penalties) at the prefix the token followed, before temperature and
the sampling filters. The reference, teacher-forced on the engine's own tokens, gives
that value at every step of every generation; the engine's must agree with it within
the precision profile's tolerance (J3's rule, here on the engine's path).

There is no statistics here: a correct engine's logprobs differ from the reference's
by its numeric noise only, which the profile bounds, so a correct engine never fails
this (false-alarm rate zero, as for J3). An engine reporting the tempered or filtered
distribution it drew from is off by ``(1/temp - 1)`` times the logprob plus the log of
the filtered mass, tenths of a nat on ordinary steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from conformance.sampling.draws import Generation

SHOWN_MISMATCHES = 5


@dataclass(frozen=True)
class LogprobMismatch:
    generation: int  # its index among the draws at one context
    step: int
    token: int
    reported: float
    expected: float  # the reference's, teacher-forced on the engine's tokens
    tolerance: float

    def describe(self, context: str, token_text: str) -> str:
        return (
            f"{context}, generation {self.generation} step {self.step}: token {self.token} "
            f"{token_text!r} reported logprob {self.reported:.4f}, reference {self.expected:.4f} "
            f"(difference {self.reported - self.expected:+.4f}, tolerance {self.tolerance:.4f})"
        )


@dataclass
class PathLogprobs:
    """Every reported logprob of one context's generations, against the reference's."""

    context: str
    compared: int = 0
    missing: int = 0  # steps without a reported logprob (an engine without the capability)
    largest_difference: float = 0.0
    mismatches: list[LogprobMismatch] = field(default_factory=list)


def compare_path_logprobs(
    context: str,
    prompt: Sequence[int],
    generations: Sequence[Generation],
    logprobs_at: Callable[[list[int]], np.ndarray],
    agree: Callable[[float, float], bool],
    tolerance: Callable[[float], float],
) -> PathLogprobs:
    """Each generation's reported logprobs against the reference's at the same prefixes.

    ``logprobs_at(tokens)`` is the reference's full next-token log-probability vector
    after ``tokens``; ``agree(expected, actual)`` and ``tolerance(expected)`` are the
    precision profile's.
    """
    result = PathLogprobs(context)
    for index, generation in enumerate(generations):
        for step, (token, reported) in enumerate(
            zip(generation.tokens, generation.logprobs, strict=True)
        ):
            if reported is None:
                result.missing += 1
                continue
            vector = logprobs_at(list(prompt) + list(generation.tokens[:step]))
            expected = float(vector[token]) if 0 <= token < len(vector) else -np.inf
            result.compared += 1
            if np.isfinite(expected) and np.isfinite(reported):
                result.largest_difference = max(result.largest_difference, abs(reported - expected))
            if not agree(expected, reported):
                result.mismatches.append(
                    LogprobMismatch(index, step, token, reported, expected, tolerance(expected))
                )
    return result
