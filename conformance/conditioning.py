"""Conditioning: how decisively the reference chose each token of a greedy path.

At every greedy step the reference's margin is the gap between its best and
second-best log-probabilities. A path whose smallest margin is below the
profile's ``tie_epsilon`` is *ill-conditioned*: a correct engine whose
arithmetic differs by rounding may take the other branch there, after which
the outputs share nothing. Such a case is flagged in every report, and the
comparator treats a divergence at a near-tie as a note rather than a failure.

Example from this project: on SmolLM2's chat prompt "What is the capital of
France?" the reference's first-step margin between "The" and "L" is about
0.08 nats, and llama.cpp (which quantizes activations) picks "L".
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.protocol import Trace


@dataclass
class Conditioning:
    min_margin: float | None  # None: no step had two ranked tokens to compare
    step: int | None  # where the smallest margin occurs
    runner_up: int | None  # the second-best token at that step
    epsilon: float
    ill_conditioned: bool

    def describe(self, token_text=None) -> str:
        if self.min_margin is None:
            return "conditioning unknown (reference reported no top-2 logprobs)"
        runner_up = (
            f" (runner-up {_show(self.runner_up, token_text)})"
            if self.runner_up is not None
            else ""
        )
        state = "ILL-CONDITIONED" if self.ill_conditioned else "well-conditioned"
        return (
            f"{state}: smallest top-1/top-2 margin {self.min_margin:.4g} at step {self.step}"
            f"{runner_up}, epsilon {self.epsilon:g}"
        )


def step_margins(trace: Trace) -> list[float | None]:
    """Top-1 minus top-2 logprob at each step (None where fewer than two are known)."""
    margins = []
    for event in trace.events:
        top = event.top_logprobs or []
        margins.append(top[0][1] - top[1][1] if len(top) >= 2 else None)
    return margins


def conditioning_of(trace: Trace, epsilon: float) -> Conditioning:
    """The conditioning of a greedy reference trace under a tie epsilon."""
    known = [(m, i) for i, m in enumerate(step_margins(trace)) if m is not None]
    if not known:
        return Conditioning(None, None, None, epsilon, ill_conditioned=False)
    margin, step = min(known)
    runner_up = trace.events[step].top_logprobs[1][0]
    return Conditioning(margin, step, runner_up, epsilon, ill_conditioned=margin < epsilon)


def _show(token: int, token_text) -> str:
    return f"{token_text(token)!r} (id {token})" if token_text else f"id {token}"
