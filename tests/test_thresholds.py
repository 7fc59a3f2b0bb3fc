"""Every threshold that decides a verdict, pinned from both sides.

For each tolerance, epsilon and statistical level the judge uses, a synthetic input
sits at 0.9x and at 1.1x the bound (and exactly at it where the rule says which side
wins), and the verdict must flip there. The bounds are read from the profile objects
and module constants, so a recalibrated profile keeps these tests valid;
``test_profile_constants_are_the_documented_ones`` pins the numbers themselves once,
so that "tolerance x2" or "epsilon x10" cannot slip in unnoticed.

Exact-boundary inputs are built so that the float arithmetic is exact: ``-e - (-2e)``
is exactly ``e`` (Sterbenz: the operands are within a factor of two), and a logprob
of 0 makes a tolerance ``atol + rtol * 0`` exactly ``atol``.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conformance_helpers import decode_bytes, make_trace

from conformance.comparator import FAIL, NEAR_TIE, PASS, compare_traces
from conformance.conditioning import conditioning_of
from conformance.profiles import DEFAULT_PROFILE, PROFILES, PrecisionProfile, profile_for_model
from conformance.sampling import stats
from conformance.sampling.stats import ContextDraws, implied_distribution, judge
from engines.protocol import SamplerSettings

README = Path(__file__).resolve().parents[1] / "README.md"
ALL_PROFILES = pytest.mark.parametrize("profile", list(PROFILES.values()), ids=list(PROFILES))

# A token id for each role in the synthetic traces (bytes, so decode_bytes shows them).
A, B, C = 65, 66, 67


# -- the numbers themselves ----------------------------------------------------------------

# (tie_epsilon, logprob_atol, logprob_rtol) as documented; fp32 and q4 are the profiles
# of the two built-in models and are also checked against the README's own sentence below.
DOCUMENTED = {
    "fp32": (1e-2, 2e-3, 1e-4),
    "fp16": (0.1, 0.05, 5e-3),
    "bf16": (0.3, 0.15, 1e-2),
    "q8": (0.1, 0.05, 5e-3),
    "q4": (0.1, 0.05, 1e-2),
    "q4q8": (0.7, 0.15, 2e-2),
}


def test_profile_constants_are_the_documented_ones():
    found = {name: (p.tie_epsilon, p.logprob_atol, p.logprob_rtol) for name, p in PROFILES.items()}
    assert found == DOCUMENTED
    assert DEFAULT_PROFILE["dummy"] == "fp32" and DEFAULT_PROFILE["smollm2-135m"] == "q4"


def test_a_model_without_a_default_profile_is_judged_as_fp32_unless_overridden():
    assert profile_for_model("some-unknown-model") is PROFILES["fp32"]
    assert profile_for_model("smollm2-135m") is PROFILES["q4"]
    assert profile_for_model("smollm2-135m", "q4q8") is PROFILES["q4q8"]


def test_the_readme_states_the_default_profiles_numbers():
    # "`dummy` fp32 (near-tie below 0.01 nats, logprobs within 0.002 + 0.0001·|logprob|)"
    pattern = (
        r"`[\w-]+`\s+(\w+)\s+\(near-tie\s+below\s+([\d.]+)\s+nats,\s+logprobs\s+within\s+"
        r"([\d.]+)\s+\+\s+([\d.]+)·\|logprob\|\)"
    )
    stated = {m[0]: tuple(float(x) for x in m[1:]) for m in re.findall(pattern, README.read_text())}
    assert {"fp32", "q4"} <= set(stated)
    for name, numbers in stated.items():
        p = PROFILES[name]
        assert numbers == (p.tie_epsilon, p.logprob_atol, p.logprob_rtol), name


def test_statistical_constants_are_the_documented_ones():
    # README: "Holm-corrected across contexts at a family-wise 0.001"; Cochran's rule of
    # five for pooling; Monte Carlo p-values below ten times alpha (stats.py docstring).
    assert stats.DEFAULT_ALPHA == 0.001
    assert stats.MIN_EXPECTED == 5.0
    assert stats.SIMULATE_BELOW_ALPHA_TIMES == 10
    assert stats.simulations_needed(0.001, 1) == 10_000  # the floor, MIN_SIMULATIONS
    # 1 / (B + 1) at least RESOLUTION_FACTOR = 10 times below alpha / m = 2e-4.
    assert stats.simulations_needed(0.001, 5) == 50_000
    assert stats.SUPPORT_TOLERANCE == 1e-3


# -- the comparator: near-tie epsilon -------------------------------------------------------


def divergence_with_margin(margin_factor: float, epsilon: float):
    """Reference says A then B (B leading C by ``margin_factor * epsilon``); the engine says
    A then C. The reference's own logprob is -epsilon, C's is -(1 + factor) * epsilon."""
    own = -epsilon
    other = -epsilon - margin_factor * epsilon if margin_factor != 1 else -2 * epsilon
    expected = make_trace([A, B], [-0.1, own], [[(A, -0.1)], [(B, own), (C, other)]])
    actual = make_trace([A, C], [-0.1, own], [[(A, -0.1)], [(C, own), (B, other)]])
    return expected, actual


def judged(expected, actual, profile, **kwargs):
    return compare_traces(expected, actual, profile, decode_bytes, **kwargs)


@ALL_PROFILES
def test_a_divergence_just_inside_epsilon_is_a_near_tie(profile: PrecisionProfile):
    # Kills "epsilon x0.5" (0.9 epsilon would then fail).
    result = judged(*divergence_with_margin(0.9, profile.tie_epsilon), profile)
    assert result.verdict == NEAR_TIE
    assert result.diagnostic.margin == pytest.approx(0.9 * profile.tie_epsilon)


@ALL_PROFILES
def test_a_divergence_just_outside_epsilon_fails(profile: PrecisionProfile):
    # Kills "epsilon x1.5" and "epsilon x10" (1.1 epsilon would then be a near-tie).
    result = judged(*divergence_with_margin(1.1, profile.tie_epsilon), profile)
    assert result.verdict == FAIL and result.diagnostic.kind == "token"


@ALL_PROFILES
def test_a_margin_of_exactly_epsilon_fails(profile: PrecisionProfile):
    # The rule: a near-tie is a margin *below* epsilon (kills "<" -> "<=").
    expected, actual = divergence_with_margin(1, profile.tie_epsilon)
    assert expected.events[1].logprob - expected.events[1].top_logprobs[1][1] == (
        profile.tie_epsilon
    )
    assert judged(expected, actual, profile).verdict == FAIL


def resumed_case(margin_factor: float, profile: PrecisionProfile):
    """A near-tie at step 1 (the engine takes C), then on the engine's own path at step 2
    the engine takes B, ``margin_factor * epsilon`` below the reference's top token C there."""
    eps = profile.tie_epsilon
    expected, _ = divergence_with_margin(0.5, eps)
    top = -eps
    chosen = -2 * eps if margin_factor == 1 else -eps - margin_factor * eps
    # The engine reports the reference's own logprob of B, so only the token rule can fail.
    actual = make_trace([A, C, B], [-0.1, -eps, chosen], None)

    def resume(tokens):
        assert tokens == [A, C, B]
        tops = [[(A, -0.1)], [(C, -eps)], [(C, top), (B, chosen)]]
        return make_trace(tokens, [-0.1, -eps, chosen], tops)

    return expected, actual, resume


@ALL_PROFILES
@pytest.mark.parametrize("factor, verdict", [(0.9, NEAR_TIE), (1.1, FAIL), (1, FAIL)])
def test_on_the_engines_path_the_same_epsilon_decides(profile, factor, verdict):
    expected, actual, resume = resumed_case(factor, profile)
    result = judged(expected, actual, profile, resume=resume)
    assert result.verdict == verdict, result.summary
    if verdict == NEAR_TIE:
        assert result.near_tie_steps == [2]  # step 1 is C, the path's own top token


def trace_of_ties(n_ties: int, eps: float):
    """The engine's path crossing ``n_ties`` near-ties after the first (each at 0.5 eps)."""
    tokens = [A, C] + [B] * n_ties
    own = -eps
    actual = make_trace(tokens, [-0.1] + [own] * (1 + n_ties), None)
    expected, _ = divergence_with_margin(0.5, eps)

    def resume(seen):
        tops = [[(A, -0.1)], [(C, own)]] + [[(C, own + 0.5 * eps), (B, own)]] * n_ties
        return make_trace(seen, [-0.1] + [own] * (1 + n_ties), tops)

    return expected, actual, resume


def test_the_near_tie_cap_is_exactly_max_near_ties():
    profile = PROFILES["fp32"]
    cap = profile.max_near_ties
    # Counted are the near-ties crossed on the engine's path (where the path's top token
    # is not the engine's); step 1 is not one of them (C is the path's top there).
    expected, actual, resume = trace_of_ties(cap, profile.tie_epsilon)
    at_cap = judged(expected, actual, profile, resume=resume)
    assert at_cap.verdict == NEAR_TIE and not at_cap.near_tie_limited
    expected, actual, resume = trace_of_ties(cap + 1, profile.tie_epsilon)
    over = judged(expected, actual, profile, resume=resume)
    assert over.verdict == NEAR_TIE and over.near_tie_limited
    assert profile.max_near_ties == 8


# -- the comparator: logprob tolerance ------------------------------------------------------


def with_logprob_error(expected_logprob: float, error: float):
    """Same tokens; the engine's chosen-token logprob off by ``error`` at step 1."""
    tops = [[(A, -0.1)], [(B, expected_logprob)]]
    expected = make_trace([A, B], [-0.1, expected_logprob], tops)
    actual = make_trace([A, B], [-0.1, expected_logprob + error], tops)
    return expected, actual


def rtol_dominated_logprob(profile: PrecisionProfile) -> float:
    """A logprob where the relative term is nine times the absolute one."""
    return -9 * profile.logprob_atol / profile.logprob_rtol


def logprob_rule_only(profile: PrecisionProfile) -> PrecisionProfile:
    """``profile`` without its probability tolerance (q4q8's is tested in test_agreement.py):
    at the rtol-dominated logprob a probability barely moves, so it alone would pass."""
    return replace(profile, prob_atol=0.0)


@ALL_PROFILES
@pytest.mark.parametrize("where", ["atol only", "rtol dominated"])
@pytest.mark.parametrize("sign", [1, -1])
def test_a_logprob_error_just_inside_the_tolerance_passes(profile, where, sign):
    # Kills "tolerance x0.5" on either term (at e = 0 the tolerance is atol alone; at the
    # rtol-dominated point halving rtol leaves 0.55 of the tolerance).
    e = 0.0 if where == "atol only" else rtol_dominated_logprob(profile)
    tolerance = profile.logprob_atol + profile.logprob_rtol * abs(e)
    result = judged(*with_logprob_error(e, sign * 0.9 * tolerance), profile)
    assert result.verdict == PASS, result.summary
    assert result.max_logprob_error == pytest.approx(0.9 * tolerance)


@ALL_PROFILES
@pytest.mark.parametrize("where", ["atol only", "rtol dominated"])
@pytest.mark.parametrize("sign", [1, -1])
def test_a_logprob_error_just_outside_the_tolerance_fails(profile, where, sign):
    # Kills "tolerance x1.5" and "x2" on either term, and a lost abs() or a "-" for "+".
    profile = logprob_rule_only(profile)
    e = 0.0 if where == "atol only" else rtol_dominated_logprob(profile)
    tolerance = profile.logprob_atol + profile.logprob_rtol * abs(e)
    result = judged(*with_logprob_error(e, sign * 1.1 * tolerance), profile)
    assert result.verdict == FAIL and result.diagnostic.kind == "logprob"
    assert result.diagnostic.tolerance == pytest.approx(tolerance)


@ALL_PROFILES
def test_a_logprob_error_of_exactly_the_tolerance_passes(profile):
    # The rule: within tolerance means |diff| <= tolerance (kills "<=" -> "<").
    expected, actual = with_logprob_error(0.0, profile.logprob_atol)
    assert abs(actual.events[1].logprob - expected.events[1].logprob) == profile.logprob_atol
    assert judged(expected, actual, profile).verdict == PASS


@ALL_PROFILES
def test_the_tolerance_formula(profile):
    for e in (0.0, -1.0, -7.5, rtol_dominated_logprob(profile)):
        assert profile.logprob_tolerance(e) == pytest.approx(
            profile.logprob_atol + profile.logprob_rtol * abs(e)
        )


def test_infinite_logprobs_agree_only_with_themselves():
    p = PROFILES["q4q8"]  # the widest tolerance: a relative one would swallow anything
    assert p.logprobs_agree(-math.inf, -math.inf)
    assert not p.logprobs_agree(-math.inf, -1e9) and not p.logprobs_agree(-1e9, -math.inf)


@ALL_PROFILES
def test_on_the_engines_path_the_same_tolerance_decides(profile):
    profile = logprob_rule_only(profile)
    eps = profile.tie_epsilon
    expected, _ = divergence_with_margin(0.5, eps)
    e = rtol_dominated_logprob(profile)
    tolerance = profile.logprob_tolerance(e)
    for factor, verdict in ((0.9, NEAR_TIE), (1.1, FAIL)):
        actual = make_trace([A, C, B], [-0.1, -eps, e + factor * tolerance], None)

        def resume(tokens):
            return make_trace(tokens, [-0.1, -eps, e], [[(A, -0.1)], [(C, -eps)], [(B, e)]])

        result = judged(expected, actual, profile, resume=resume)
        assert result.verdict == verdict, (factor, result.summary)


# -- conditioning ---------------------------------------------------------------------------


@ALL_PROFILES
@pytest.mark.parametrize("factor, ill", [(0.9, True), (1.1, False), (1, False)])
def test_ill_conditioned_means_a_margin_below_epsilon(profile, factor, ill):
    eps = profile.tie_epsilon
    second = -2 * eps if factor == 1 else -eps - factor * eps
    trace = make_trace([A, B], [-0.01, -eps], [[(A, -0.01), (C, -5.0)], [(B, -eps), (C, second)]])
    conditioning = conditioning_of(trace, eps)
    assert conditioning.ill_conditioned is ill
    assert conditioning.step == 1 and conditioning.runner_up == C


# -- sampler statistics: support rules ------------------------------------------------------


def support(logprobs, **settings) -> set[int]:
    return set(
        implied_distribution(np.log(logprobs), SamplerSettings(temp=1.0, **settings)).support
    )


PROBS = [0.5, 0.25, 0.15, 0.1]  # cumulative mass above each token: 0, 0.5, 0.75, 0.9


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.5 * 0.9, {0}), (0.5 * 1.1, {0, 1}), (0.75 * 0.9, {0, 1}), (0.75 * 1.1, {0, 1, 2})],
)
def test_top_p_keeps_the_token_that_crosses_the_mass(top_p, kept):
    # A token survives iff the mass above it is below top_p: the token crossing it stays.
    assert support(PROBS, top_p=top_p) == kept


@pytest.mark.parametrize("factor, kept", [(0.9, {0, 1}), (1.1, {0})])
def test_min_p_keeps_tokens_at_least_min_p_times_the_top(factor, kept):
    # Token 1 has half the top's probability: min_p just under 0.5 keeps it, just over drops it.
    assert support(PROBS, min_p=0.5 * factor) == kept


def test_min_p_keeps_a_token_exactly_at_the_threshold():
    # logprob(token 1) = log 0.5 = max + log(min_p) exactly: ">=" keeps it.
    logprobs = np.array([0.0, math.log(0.5), -3.0])
    kept = implied_distribution(logprobs, SamplerSettings(temp=1.0, min_p=0.5)).support
    assert kept == {0, 1}


def test_min_tokens_to_keep_overrides_min_p():
    assert support(PROBS, min_p=0.9, min_tokens_to_keep=3) == {0, 1, 2}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_keeps_exactly_k(k):
    assert support(PROBS, top_k=k) == set(range(k))


def test_support_violations_name_the_rule():
    settings = SamplerSettings(temp=1.0, top_k=2, min_p=0.4)
    implied = implied_distribution(np.log(PROBS), settings)
    context = ContextDraws("ctx", implied.probabilities, [0, 1, 2, 3, 3], implied.allowed_by_rule)
    violations = {v.token: v for v in stats.support_violations(context)}
    # Token 2 (0.15 < 0.4 * 0.5) and token 3 are excluded by both rules; counts as drawn.
    assert set(violations) == {2, 3}
    assert violations[3].count == 2 and violations[2].count == 1
    assert set(violations[2].rules) == {"min_p", "top_k"}
    only_k = implied_distribution(np.log(PROBS), SamplerSettings(temp=1.0, top_k=1))
    ctx = ContextDraws("ctx", only_k.probabilities, [1], only_k.allowed_by_rule)
    assert stats.support_violations(ctx)[0].rules == ["top_k"]


@pytest.mark.parametrize("factor, stable", [(0.9, False), (1.1, True)])
def test_a_top_k_near_tie_within_the_support_tolerance_is_unstable(factor, stable):
    gap = factor * stats.SUPPORT_TOLERANCE
    logprobs = np.array([-0.5, -1.0, -1.0 - gap, -4.0])
    assert stats.support_is_stable(logprobs, SamplerSettings(temp=1.0, top_k=2)) is stable


# -- sampler statistics: pooling, level, Monte Carlo, Holm ----------------------------------


def test_a_cell_expected_exactly_min_expected_times_stands_alone():
    # 0.25 x 20 = 5 exactly: its own cell (">="); the two 0.125 tokens (2.5 each) pool.
    cells = stats.pooled_cells(np.array([0.5, 0.25, 0.125, 0.125]), 20)
    assert cells == [[0], [1], [2, 3]]
    # At 19 draws token 1 is expected 4.75 times: pooled with the rest.
    assert stats.pooled_cells(np.array([0.5, 0.25, 0.125, 0.125]), 19) == [[0], [1, 2, 3]]


def fair_coin_context(heads: int, n: int = 2000) -> ContextDraws:
    return ContextDraws("coin", np.array([0.5, 0.5]), [0] * heads + [1] * (n - heads))


def test_the_level_decides_between_just_above_and_just_below_the_p_value():
    context = fair_coin_context(1066)  # X² = 2 x 66² / 1000 = 8.71, asymptotic p ~ 3e-3
    p = judge([context]).results[0].p_value
    assert 1.1e-3 < p < 1e-2  # simulated (p < 10 alpha), and alpha = p / 1.1 stays >= 0.001
    # Every alpha below keeps B at its floor (alpha >= 0.001, one test), so the draws get
    # the same Monte Carlo p-value each time: only the level moves.
    assert judge([context], alpha=p / 0.9).passed is False
    assert judge([context], alpha=p / 1.1).passed is True
    # Reject iff adjusted p <= alpha: at alpha == p exactly the case fails.
    assert judge([context], alpha=p).passed is False


def test_monte_carlo_replaces_the_chi_square_limit_below_ten_alpha():
    context = fair_coin_context(1060)
    asymptotic = judge([context]).results[0].asymptotic_p_value
    below = judge([context], alpha=asymptotic / (0.9 * stats.SIMULATE_BELOW_ALPHA_TIMES))
    above = judge([context], alpha=asymptotic / (1.1 * stats.SIMULATE_BELOW_ALPHA_TIMES))
    assert above.results[0].p_value == asymptotic
    simulated = below.results[0].p_value
    assert simulated != asymptotic
    # A Monte Carlo p-value is (1 + extreme) / (1 + B): a multiple of 1 / (B + 1).
    b = stats.simulations_needed(below.alpha, 1)
    assert round(simulated * (b + 1)) == pytest.approx(simulated * (b + 1))


def test_holm_adjusts_in_step_down_order():
    # Sorted: 0.0003 x 3 = 0.0009, 0.0004 x 2 = 0.0008 -> running max 0.0009, 0.01 x 1.
    adjusted = stats.holm_adjusted([0.0004, 0.0003, 0.01])
    assert adjusted == pytest.approx([0.0009, 0.0009, 0.01])
    # Bonferroni (x3 for all) would not reject 0.0004 at 0.001; Holm does.
    assert adjusted[0] <= stats.DEFAULT_ALPHA
    assert stats.holm_adjusted([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_the_holm_family_is_the_tested_contexts():
    # Two contexts: one that fits perfectly and one whose p-value alone is below alpha
    # but above alpha / 2: alone it fails, in a family of two it passes.
    bad = fair_coin_context(1074)
    p = judge([bad]).results[0].p_value
    good = fair_coin_context(1000)
    good.label = "good"
    alpha = p * 1.5  # p < alpha < 2p
    assert judge([bad], alpha=alpha).passed is False
    pair = judge([bad, good], alpha=alpha)
    assert pair.results[0].adjusted_p_value == pytest.approx(2 * pair.results[0].p_value)
    assert pair.passed is True


def test_a_step_without_logprobs_does_not_end_the_tolerance_check():
    # Step 1: the engine reports no logprob (nothing to compare); step 2 is off by 1.1x the
    # tolerance and must still fail. Either side missing skips only that step.
    p = PROFILES["fp32"]
    tops = [[(A, -0.1)], [(B, -0.2)], [(C, -0.3)]]
    expected = make_trace([A, B, C], [-0.1, -0.2, -0.3], tops)
    for missing_side in ("actual", "expected"):
        logprobs = [-0.1, None, -0.3 + 1.1 * p.logprob_tolerance(-0.3)]
        if missing_side == "expected":
            expected = make_trace([A, B, C], [-0.1, None, -0.3], tops)
            logprobs[1] = -0.2
        result = judged(expected, make_trace([A, B, C], logprobs, tops), p)
        assert result.verdict == FAIL and result.diagnostic.step == 2, missing_side


def test_equal_infinite_logprobs_are_an_error_of_zero():
    tops = [[(A, -math.inf)]]
    same = make_trace([A], [-math.inf], tops)
    result = judged(same, make_trace([A], [-math.inf], tops), PROFILES["fp32"])
    assert result.verdict == PASS and result.max_logprob_error == 0.0


def test_on_the_engines_path_a_step_without_logprobs_does_not_end_the_check():
    p = PROFILES["fp32"]
    eps = p.tie_epsilon
    expected, _ = divergence_with_margin(0.5, eps)
    bad = -0.3 + 1.1 * p.logprob_tolerance(-0.3)
    actual = make_trace([A, C, B, B], [-0.1, -eps, None, bad], None)

    def resume(tokens):
        tops = [[(A, -0.1)], [(C, -eps)], [(B, -0.2)], [(B, -0.3)]]
        return make_trace(tokens, [-0.1, -eps, -0.2, -0.3], tops)

    result = judged(expected, actual, p, resume=resume)
    assert result.verdict == FAIL and result.diagnostic.step == 3
