"""Precision profiles: how close two correct engines can be expected to agree.

Two correct engines never produce bit-identical logits: they sum in different
orders, use different kernels, and may store weights or activations at lower
precision. A profile states, for one precision regime, two numbers:

- ``tie_epsilon``: a reference top-1/top-2 log-probability margin below this
  is a *near-tie*; correct engines may legitimately pick either token there.
- ``logprob_atol`` / ``logprob_rtol``: how far a chosen token's logprob may be
  from the reference's, over the steps where both chose the same token
  (``prob_atol``, where set, also accepts probabilities that close);

and one count, ``max_near_ties``: how many near-ties one comparison may cross
on the engine's own path before it is reported *near-tie-limited* instead of
judged further (see ``comparator.py``). A correct engine crosses a near-tie
rarely (on ``dummy``'s catalogue the reference's smallest margin is far above
epsilon; SmolLM2's France prompt has one); eight in one short generation
means the case says little about the engine, not that the engine is wrong.
Besides, ``agreement`` limits what ``lmconform agree`` measures over many
positions (KL, top-1, |dp|; see ``agreement.py``).

The numbers come from measurement on this project's models: the largest
chosen-token logprob difference between two correct engines over the whole
catalogue was 1.3e-5 on ``dummy`` (transformers float32 vs MLX) and 4.1e-3 on
``smollm2-135m`` (transformers' dequantized float32 vs MLX's 4-bit kernels).
The tolerances leave 10-150 times that as headroom, and stay far below the
effect of the bugs in the mutant tests (a wrong bias, a lost position, a
changed temperature move logprobs by tenths of a nat or more).

``q4q8`` is for engines that also round activations to 8 bits inside their
quantized matmuls, as llama.cpp does on CPU, calibrated on the ``llama-cpp``
engine on SmolLM2's Q4_1 file (measured with ``lmconform agree`` over 512
positions and ``lmconform check``; the same engine on the weights dequantized
to float32 agrees within KL 2e-6, so all of it is activation rounding). That
rounding moves a logit by up to a few tenths of a nat: it flipped a 0.545-nat
margin on the story prompt (0.28 at most over the 512 positions), moved the
reference top token's probability by up to 0.106 (|dp| p99 0.070), and moved
the logprob of a token of probability 0.008 by 0.40 nats. Per-step values
therefore say little here, and the profile judges by what such noise cannot
do: ``tie_epsilon`` 0.7 covers every crossing measured (so a token more than
0.7 nats below the reference's top is a bug), and a chosen-token logprob
passes if it is within the logprob tolerance *or* its probability is within
``prob_atol`` 0.12 of the reference's (a fixed logit error moves a rare
token's logprob a lot and its probability little; 0.15 would let the
``WindowOneTooWide`` mutant through). The tight test is the
distribution over many positions: ``agreement`` (KL mean at most 0.01, where
llama.cpp measures 0.0035).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engines.models import FAMILY_MODELS


@dataclass(frozen=True)
class AgreementLimits:
    """What ``lmconform agree`` allows (``conformance/agreement.py``): upper bounds on the
    mean and 99th percentile of per-position KL(reference || engine) and on the 99th
    percentile of |dp| of the reference's top token; lower bounds on top-1 agreement
    over all positions and over the clear ones (margin at least ``tie_epsilon``)."""

    kl_mean: float
    kl_p99: float
    dp_p99: float
    top1_min: float
    clear_top1_min: float


@dataclass(frozen=True)
class PrecisionProfile:
    name: str
    tie_epsilon: float
    logprob_atol: float
    logprob_rtol: float
    description: str
    agreement: AgreementLimits
    max_near_ties: int = 8
    # Also agree when the probabilities differ by at most this much (0: off).
    prob_atol: float = 0.0

    def logprobs_agree(self, expected: float, actual: float) -> bool:
        if not (math.isfinite(expected) and math.isfinite(actual)):
            return expected == actual  # -inf only matches -inf (a relative tolerance would not)
        if abs(expected - actual) <= self.logprob_tolerance(expected):
            return True
        return abs(math.exp(expected) - math.exp(actual)) <= self.prob_atol

    def logprob_tolerance(self, expected: float) -> float:
        return self.logprob_atol + self.logprob_rtol * abs(expected)


PROFILES: dict[str, PrecisionProfile] = {
    profile.name: profile
    for profile in (
        PrecisionProfile(
            "fp32",
            tie_epsilon=1e-2,
            logprob_atol=2e-3,
            logprob_rtol=1e-4,
            description="float32 weights and activations: differences come from summation order",
            agreement=AgreementLimits(
                kl_mean=1e-6, kl_p99=1e-5, dp_p99=1e-3, top1_min=0.99, clear_top1_min=1.0
            ),
        ),
        PrecisionProfile(
            "fp16",
            tie_epsilon=0.1,
            logprob_atol=0.05,
            logprob_rtol=5e-3,
            description="float16 activations (10-bit mantissa)",
            agreement=AgreementLimits(
                kl_mean=1e-3, kl_p99=1e-2, dp_p99=0.02, top1_min=0.97, clear_top1_min=1.0
            ),
        ),
        PrecisionProfile(
            "bf16",
            tie_epsilon=0.3,
            logprob_atol=0.15,
            logprob_rtol=1e-2,
            description="bfloat16 activations (7-bit mantissa)",
            agreement=AgreementLimits(
                kl_mean=5e-3, kl_p99=0.05, dp_p99=0.05, top1_min=0.95, clear_top1_min=0.995
            ),
        ),
        PrecisionProfile(
            "q8",
            tie_epsilon=0.1,
            logprob_atol=0.05,
            logprob_rtol=5e-3,
            description="8-bit weights; engines may also quantize activations to 8 bits",
            agreement=AgreementLimits(
                kl_mean=1e-3, kl_p99=1e-2, dp_p99=0.02, top1_min=0.97, clear_top1_min=1.0
            ),
        ),
        PrecisionProfile(
            "q4",
            tie_epsilon=0.1,
            logprob_atol=0.05,
            logprob_rtol=1e-2,
            description=(
                "4-bit weights, the same dequantized values in every engine, float activations"
            ),
            agreement=AgreementLimits(
                kl_mean=1e-4, kl_p99=1e-3, dp_p99=0.01, top1_min=0.99, clear_top1_min=1.0
            ),
        ),
        PrecisionProfile(
            "q4q8",
            tie_epsilon=0.7,
            logprob_atol=0.15,
            logprob_rtol=2e-2,
            prob_atol=0.12,
            description="4-bit weights and 8-bit activations (llama.cpp's CPU path)",
            agreement=AgreementLimits(
                kl_mean=0.01, kl_p99=0.06, dp_p99=0.15, top1_min=0.9, clear_top1_min=0.99
            ),
        ),
    )
}

# The profile used for a model when the user does not name one.
DEFAULT_PROFILE = {
    "dummy": "fp32",
    "dummy-draft": "fp32",
    # The tiny models of the other families: float32 like dummy.
    **dict.fromkeys(FAMILY_MODELS, "fp32"),
    "smollm2-135m": "q4",
}


def get_profile(name: str) -> PrecisionProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown precision profile {name!r}; choose from {sorted(PROFILES)}"
        ) from None


def profile_for_model(model: str, override: str | None = None) -> PrecisionProfile:
    return get_profile(override or DEFAULT_PROFILE.get(model, "fp32"))


# What a model's default profile becomes for an engine that declares 8-bit activations
# (``activation_bits = 8``: llama.cpp's CPU path quantizes them inside quantized matmuls);
# float models are multiplied in float by such engines too, so their profiles stay.
WITH_8BIT_ACTIVATIONS = {"q4": "q4q8"}


def profile_for_engine(
    profile: PrecisionProfile, engine: object, override: str | None = None
) -> PrecisionProfile:
    """The profile ``engine`` is judged under: the user's ``override`` if given, else the
    model's default ``profile`` as the engine's declared numerics make it."""
    if override or getattr(engine, "activation_bits", None) != 8:
        return profile
    return get_profile(WITH_8BIT_ACTIVATIONS.get(profile.name, profile.name))
