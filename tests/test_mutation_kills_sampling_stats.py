"""conformance/sampling/stats.py pinned down: each filter and stability nudge at its
boundary, the Monte Carlo p-value's counting rule, pooling and the fit's cells, and the
verdict's texts word for word (the diagnostic is what an engine author reads). Inputs are
small hand-made distributions whose expected values follow from the definitions."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from conformance.sampling import stats
from conformance.sampling.stats import (
    Aggregate,
    ContextDraws,
    FitResult,
    SupportViolation,
    chi_square_fit,
    implied_distribution,
    judge,
    monte_carlo_p_value,
    support_is_stable,
)
from engines.protocol import SamplerSettings


def sampled(**settings) -> SamplerSettings:
    return SamplerSettings(temp=1.0, **settings)


def support(logprobs, **settings) -> set[int]:
    return set(implied_distribution(np.asarray(logprobs), sampled(**settings)).support)


# -- implied distribution -------------------------------------------------------------------


def test_a_temperature_of_zero_or_below_is_refused_and_a_tiny_one_is_not():
    for temp in (0.0, -1.0):
        with pytest.raises(ValueError) as raised:
            implied_distribution(np.log([0.5, 0.5]), SamplerSettings(temp=temp))
        assert str(raised.value) == f"settings.temp must be > 0 for a sampling case, got {temp}"
    implied_distribution(np.log([0.5, 0.5]), SamplerSettings(temp=1e-9))


def test_temperature_divides_the_logprobs():
    # At temp 2, p' ~ p^(1/2): sqrt(0.64) : sqrt(0.36) = 0.8 : 0.6 -> 4/7, 3/7.
    implied = implied_distribution(np.log([0.64, 0.36]), SamplerSettings(temp=2.0))
    assert implied.probabilities == pytest.approx([4 / 7, 3 / 7], abs=1e-12)


def test_a_low_temperature_stays_finite():
    # logprobs / 0.001 reach -2000: exp only works after subtracting the maximum (0 there).
    implied = implied_distribution(np.array([-1.0, -2.0]), SamplerSettings(temp=1e-3))
    assert implied.probabilities.tolist() == [1.0, 0.0]


def test_each_rule_records_what_it_alone_keeps_from_the_untempered_logprobs():
    # top_p 0.5 keeps token 0 alone; top_k 2 alone keeps tokens 0 and 1, although after
    # top_p only token 0 is left: the rule's own set is judged on the whole vocabulary.
    implied = implied_distribution(np.log([0.7, 0.2, 0.1]), sampled(top_p=0.5, top_k=2))
    assert implied.support == {0}
    assert {name: keep.tolist() for name, keep in implied.allowed_by_rule.items()} == {
        "top_p": [True, False, False],
        "top_k": [True, True, False],
    }
    assert list(implied.allowed_by_rule) == ["top_p", "top_k"]


@pytest.mark.parametrize(
    "settings, rules",
    [
        (sampled(), []),
        (sampled(top_p=1.0), []),  # 1 disables top_p
        (sampled(top_p=0.999, min_p=0.01, top_k=3), ["top_p", "min_p", "top_k"]),
        (sampled(min_p=0.01), ["min_p"]),
        (sampled(top_k=1), ["top_k"]),
    ],
)
def test_only_active_filters_are_rules(settings, rules):
    implied = implied_distribution(np.log([0.5, 0.3, 0.2]), settings)
    assert list(implied.allowed_by_rule) == rules


def test_min_p_uses_min_tokens_to_keep():
    # min_p 0.9 keeps only the top token; min_tokens_to_keep 2 keeps the top two.
    assert support(np.log([0.5, 0.3, 0.2]), min_p=0.9, min_tokens_to_keep=2) == {0, 1}
    assert support(np.log([0.5, 0.3, 0.2]), min_p=0.9) == {0}


# -- the filters at their boundaries ---------------------------------------------------------


def test_top_p_drops_a_token_whose_mass_above_is_exactly_top_p():
    # Mass above token 1 is 0.5 = top_p exactly (powers of two: no rounding): dropped.
    logprobs = np.log([0.5, 0.25, 0.25])
    assert np.exp(logprobs).tolist() == [0.5, 0.25, 0.25]
    assert stats._top_p(logprobs, 0.5).tolist() == [logprobs[0], -np.inf, -np.inf]
    # Just above: token 1 crosses the mass and stays, its tie at the threshold too.
    assert np.isfinite(stats._top_p(logprobs, 0.5 + 1e-9)).tolist() == [True, True, True]


def test_top_p_is_relative_to_the_total_mass():
    # Unnormalised logprobs (mass 2): token 1 has 1.0 above it; top_p 0.55 of 2 = 1.1
    # keeps it, 0.45 of 2 = 0.9 does not.
    logprobs = np.log([1.0, 0.6, 0.4])
    assert np.isfinite(stats._top_p(logprobs, 0.55)).tolist() == [True, True, False]
    assert np.isfinite(stats._top_p(logprobs, 0.45)).tolist() == [True, False, False]


def test_top_k_breaks_ties_at_the_kth_place_by_the_later_token_ids():
    # Tokens 10..29 tie; top_k 15 keeps 0..9 and five of the tie: the highest ids (stable
    # sort, reversed), so the same logprobs always give the same support.
    logprobs = -np.log(np.arange(1.0, 41.0))
    logprobs[10:30] = logprobs[10]
    kept = np.flatnonzero(np.isfinite(stats._top_k(logprobs, 15))).tolist()
    assert kept == [*range(10), 25, 26, 27, 28, 29]


# -- support stability -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_p, stable", [(0.4985, True), (0.4995, False), (0.5005, False), (0.5015, True)]
)
def test_top_p_is_nudged_by_the_tolerance_both_ways(top_p, stable):
    # Token 1 has mass 0.5 above it: top_p within 1e-3 of 0.5 (either side) is unstable.
    assert support_is_stable(np.log([0.5, 0.3, 0.2]), sampled(top_p=top_p)) is stable


def test_top_p_nudges_stay_inside_the_open_interval():
    # 0.0005 - 1e-3 would switch top_p off (everything kept); it is clamped to 1e-3 (token
    # 0 alone, as at 0.0005). 0.9993 + 1e-3 would too; it is clamped to 0.999, which like
    # 0.9993 drops token 2 (0.9995 above it).
    logprobs = np.log([0.6, 0.3995, 0.0005])
    assert support(logprobs, top_p=0.0005) == {0}
    assert support_is_stable(logprobs, sampled(top_p=0.0005))
    assert support(logprobs, top_p=0.9993) == {0, 1}
    assert support_is_stable(logprobs, sampled(top_p=0.9993))
    # With a tolerance of 0.01 the clamp is 0.99: token 1 (0.6 above it) still kept.
    assert support_is_stable(logprobs, sampled(top_p=0.9993), tolerance=0.01)
    # ... and with 0.5 the clamp moves top_p to 0.5, which drops token 1.
    assert not support_is_stable(logprobs, sampled(top_p=0.9993), tolerance=0.5)


@pytest.mark.parametrize(
    "shift, stable", [(0.0015, True), (0.0005, False), (-0.0005, False), (-0.0015, True)]
)
def test_min_p_is_nudged_by_a_factor_e_to_the_tolerance(shift, stable):
    # Token 1 has 0.6 times the top's probability: min_p within a factor e^1e-3 of 0.6 is
    # unstable, on either side.
    settings = sampled(min_p=0.6 * math.exp(shift))
    assert support_is_stable(np.log([0.5, 0.3, 0.2]), settings) is stable


def test_min_p_of_one_is_not_nudged_past_one():
    # Two tied top tokens both survive min_p 1; min_p above 1 would keep neither (then
    # only min_tokens_to_keep's one): the nudge is capped at 1.
    logprobs = np.log([0.4, 0.4, 0.2])
    assert support(logprobs, min_p=1.0) == {0, 1}
    assert support_is_stable(logprobs, sampled(min_p=1.0))


def test_a_gap_of_exactly_the_tolerance_at_the_kth_place_is_stable():
    logprobs = np.array([1.0, 1e-3, 0.0, -3.0])
    assert logprobs[1] - logprobs[2] == stats.SUPPORT_TOLERANCE
    assert support_is_stable(logprobs, sampled(top_k=2))
    assert not support_is_stable(logprobs, sampled(top_k=2), tolerance=2e-3)


def test_a_near_tie_at_k_is_tried_with_one_token_more():
    # Tokens 1 and 2 nearly tie at k = 2, but top_p 0.6 drops token 2 anyway: top_k 3
    # gives the same support, so the context is stable (top_k 1 would not be).
    logprobs = np.log([0.5, 0.2, 0.2 - 1e-5, 0.1 + 1e-5])
    assert not support_is_stable(logprobs, sampled(top_k=2))
    assert support_is_stable(logprobs, sampled(top_p=0.6, top_k=2))


def test_top_k_of_the_whole_vocabulary_and_no_filter_are_stable():
    logprobs = np.array([0.0, -1e-4, -2e-4])  # every gap below the tolerance
    assert support_is_stable(logprobs, sampled(top_k=3))
    assert support_is_stable(logprobs, sampled())
    assert not support_is_stable(logprobs, sampled(top_k=2))


# -- support violations ---------------------------------------------------------------------


def test_a_violation_is_described_with_its_rules_or_the_combined_filters():
    one = SupportViolation("ctx", 7, "<7>", 3, ["top_k"])
    assert one.describe() == "ctx: token 7 '<7>' was drawn 3x but top_k excludes it"
    two = SupportViolation("ctx", 7, "<7>", 1, ["top_p", "min_p"])
    assert two.describe() == "ctx: token 7 '<7>' was drawn 1x but top_p and min_p excludes it"
    none = SupportViolation("ctx", 7, "<7>", 1, [])
    assert none.describe() == "ctx: token 7 '<7>' was drawn 1x but the combined filters excludes it"


def test_tokens_outside_the_vocabulary_on_both_sides_are_violations():
    context = ContextDraws("ctx", np.array([0.5, 0.5]), [-1, 0, 1, 2, 2])
    found = [(v.token, v.token_text, v.count, v.rules) for v in stats.support_violations(context)]
    assert found == [
        (-1, "<outside vocabulary>", 1, ["the vocabulary [0, 2)"]),
        (2, "<outside vocabulary>", 2, ["the vocabulary [0, 2)"]),
    ]


def test_a_violation_names_its_token_with_describe_token():
    context = ContextDraws("ctx", np.array([1.0, 0.0]), [0, 1], {"min_p": np.array([True, False])})
    [violation] = stats.support_violations(context, describe_token=lambda t: f"<{t}>")
    assert (violation.token_text, violation.rules, violation.count) == ("<1>", ["min_p"], 1)


# -- pooling and the fit ------------------------------------------------------------------------


def test_a_rest_too_small_joins_the_smallest_big_cell():
    # n = 10: tokens 0, 1 expect 6 and 3.5 -> token 1 and 2 (0.5) pool; 4 < 5 joins token 0.
    assert stats.pooled_cells(np.array([0.6, 0.35, 0.05]), 10) == [[0, 1, 2]]
    # n = 20: 12, 7, 1: token 2 alone is too small; joins token 1 (the smaller big cell).
    assert stats.pooled_cells(np.array([0.6, 0.35, 0.05]), 20) == [[0], [1, 2]]
    # n = 100: 60, 35, 5: every token its own cell.
    assert stats.pooled_cells(np.array([0.6, 0.35, 0.05]), 100) == [[0], [1], [2]]
    # No big cell at all: everything is the rest; tokens outside the support are left out.
    assert stats.pooled_cells(np.array([0.5, 0.0, 0.5]), 4) == [[0, 2]]


def test_inside_support_drops_draws_outside_the_vocabulary_and_the_support():
    kept = stats.inside_support(np.array([0.5, 0.0, 0.5]), [-1, 0, 1, 2, 3])
    assert kept.tolist() == [0, 2]


def test_the_fit_cells_carry_labels_counts_and_residuals():
    probabilities = np.array([0.5, 0.3, 0.1, 0.1, 0.0])
    draws = [0] * 12 + [1] * 5 + [2] * 2 + [3] * 1 + [4] * 3  # token 4 is outside
    fit = chi_square_fit([(probabilities, draws)], describe_token=lambda t: f"<{t}>")
    # 20 draws count: expected 10, 6, 2, 2 -> tokens 2 and 3 pool (4 < 5) into token 1's cell.
    cells = [(c.tokens, c.label, c.observed, c.expected) for c in fit.cells]
    assert cells == [([0], "token 0 '<0>'", 12, 10.0), ([1, 2, 3], "3 pooled tokens", 8, 10.0)]
    assert [c.residual for c in fit.cells] == pytest.approx([2 / math.sqrt(10), -2 / math.sqrt(10)])
    assert (fit.statistic, fit.dof) == (pytest.approx(0.8), 1)
    assert [(size, p.tolist()) for size, p in fit.parts] == [(20, [0.5, 0.5])]


def test_unnormalised_probabilities_are_normalised():
    fit = chi_square_fit([(np.array([2.0, 2.0]), [0] * 6 + [1] * 4)])
    assert [c.expected for c in fit.cells] == [5.0, 5.0]


def test_nothing_to_test_is_statistic_zero_on_zero_df_with_p_one():
    nothing = (0.0, 0, 1.0, [])
    fits = [
        chi_square_fit([(np.array([0.5, 0.5]), [])]),  # no draws
        chi_square_fit([(np.array([0.5, 0.5]), [5, 6])]),  # none inside the support
        chi_square_fit([(np.array([1.0, 0.0]), [0, 0, 0])]),  # a single cell
    ]
    for fit in fits:
        assert (fit.statistic, fit.dof, fit.p_value, fit.cells) == nothing


def test_a_part_without_draws_adds_nothing_to_the_simulation():
    both = [(np.array([0.5, 0.5]), [0, 1] * 10), (np.array([0.9, 0.1]), [])]
    fit = chi_square_fit(both)
    assert [(size, p.tolist()) for size, p in fit.parts] == [(20, [0.5, 0.5])]


# -- the Monte Carlo p-value -----------------------------------------------------------------


def coin_fit(heads: int, n: int = 10) -> FitResult:
    return chi_square_fit([(np.array([0.5, 0.5]), [0] * heads + [1] * (n - heads))])


def test_simulated_values_equal_to_the_observed_one_count_as_extreme():
    # 6 heads of 10: X² = 0.4; a simulated X² >= 0.4 iff heads != 5, which has probability
    # 1 - C(10, 5) / 2^10 = 772 / 1024 = 0.754. Counting only X² > 0.4 would give
    # 1 - (252 + 2 x 210) / 1024 = 0.344.
    fit = coin_fit(6)
    assert fit.statistic == pytest.approx(0.4)
    p = monte_carlo_p_value(fit, 20_000)
    assert p == pytest.approx(772 / 1024, abs=0.015)
    # Stated to the last bit so that rounding in the observed X² cannot move it.
    fit.statistic *= 1 + 1e-12
    assert monte_carlo_p_value(fit, 20_000) == pytest.approx(772 / 1024, abs=0.015)


def test_the_monte_carlo_p_value_counts_the_observed_sample_itself():
    # X² = 0 (5 heads of 10) is reached by every simulated sample: p = (1 + B) / (1 + B).
    # X² = 10 (10 heads of 10) only by 0 or 10 heads, probability 2 / 1024: p is a multiple
    # of 1 / (B + 1), at least 1 / (B + 1) (the observed sample counts) and near 2 / 1024.
    fit = coin_fit(5)
    assert fit.statistic == 0.0
    assert monte_carlo_p_value(fit, 999) == 1.0
    extreme = coin_fit(10, 10)
    p = monte_carlo_p_value(extreme, 9_999)
    assert p * 10_000 == pytest.approx(round(p * 10_000))  # a multiple of 1 / (B + 1)
    assert 1 / 10_000 <= p < 2 * 2 / 1024


def test_the_monte_carlo_p_value_is_the_same_for_the_same_draws():
    fit = coin_fit(7, 20)
    assert monte_carlo_p_value(fit, 50_000) == monte_carlo_p_value(coin_fit(7, 20), 50_000)


def test_no_degrees_of_freedom_gives_p_one_without_simulating():
    assert monte_carlo_p_value(FitResult(5.0, 0, 0.01, []), 100) == 1.0


def test_a_cell_probability_rounded_above_one_is_clamped():
    # Float sums can give 1 + 1e-16 for a cell holding all the mass; multinomial refuses it.
    cells = [
        stats.CellDeviation([0], "a", 10, 10.0, 0.0),
        stats.CellDeviation([1], "b", 0, 1e-9, 0.0),
    ]
    fit = FitResult(0.0, 1, 1.0, cells, [(10, np.array([1.0 + 2.3e-16, 0.0]))])
    assert monte_carlo_p_value(fit, 100) == 1.0


# -- the verdict ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_zero_one_is_refused(alpha):
    context = ContextDraws("ctx", np.array([0.5, 0.5]), [0, 1])
    with pytest.raises(ValueError) as raised:
        judge([context], alpha=alpha)
    assert str(raised.value) == f"alpha must be in (0, 1), got {alpha}"


def test_no_contexts_is_refused():
    with pytest.raises(ValueError) as raised:
        judge([])
    assert str(raised.value) == "contexts must not be empty"


def fail_context(label: str = "ctx") -> ContextDraws:
    # 1000 draws against 0.5/0.3/0.2: X² = 100²/500 + 50²/300 + 50²/200 = 40.83 on 2 df.
    return ContextDraws(label, np.array([0.5, 0.3, 0.2]), [0] * 600 + [1] * 250 + [2] * 150)


def test_a_failed_fit_is_diagnosed_with_its_three_largest_cells():
    verdict = judge([fail_context()])
    [result] = verdict.results
    b = stats.simulations_needed(stats.DEFAULT_ALPHA, 1)
    # No simulated sample reaches X² = 40.8 (asymptotic p ~ 1e-9): p = 1 / (B + 1).
    assert result.p_value == 1 / (b + 1) == result.adjusted_p_value
    assert result.statistic == pytest.approx(20 + 25 / 3 + 12.5)
    assert (result.n_draws, result.dof, result.support_size, result.tested) == (1000, 2, 3, True)
    assert not verdict.passed and verdict.support_passed and not verdict.fit_passed
    head = (
        "FAIL: worst context ctx: chi-square 40.8 on 2 df over 1000 draws, "
        f"p = {1 / (b + 1):.3g} by simulation (chi-square approximation: "
        f"{result.asymptotic_p_value:.3g}); Holm-adjusted over 1 tests: {1 / (b + 1):.3g}, "
        "against the family-wise significance threshold 0.001"
    )
    # Residuals: 100 / sqrt(500) = 4.47, -50 / sqrt(200) = -3.54, -50 / sqrt(300) = -2.89.
    cells = [
        "  token 0 '0': observed 600, expected 500.0 (residual +4.5)",
        "  token 2 '2': observed 150, expected 200.0 (residual -3.5)",
        "  token 1 '1': observed 250, expected 300.0 (residual -2.9)",
    ]
    assert verdict.diagnostic == verdict.fit_diagnostic == "\n".join([head, *cells])


def test_only_the_three_largest_deviations_are_kept():
    probabilities = np.full(4, 0.25)
    draws = [0] * 140 + [1] * 80 + [2] * 100 + [3] * 80  # residuals +4, -2, 0, -2
    [result] = judge([ContextDraws("ctx", probabilities, draws)]).results
    assert [c.tokens for c in result.largest_deviations] == [[0], [1], [3]]


def test_a_passing_fit_is_one_line_with_the_asymptotic_p_value():
    context = ContextDraws("flat", np.array([0.5, 0.5]), [0] * 10 + [1] * 10)
    verdict = judge([context])
    assert verdict.passed and verdict.worst_context == "flat"
    assert verdict.diagnostic == (
        "pass: worst context flat: chi-square 0.0 on 1 df over 20 draws, p = 1; Holm-adjusted "
        "over 1 tests: 1, against the family-wise significance threshold 0.001"
    )


def test_a_simulated_p_value_above_alpha_passes_and_shows_both():
    # 1066 heads of 2000: X² = 8.71, asymptotic p = 0.00316 < 10 alpha: simulated.
    context = ContextDraws("coin", np.array([0.5, 0.5]), [0] * 1066 + [1] * 934)
    verdict = judge([context])
    [result] = verdict.results
    assert result.asymptotic_p_value == pytest.approx(0.003161, rel=1e-3)
    assert result.p_value != result.asymptotic_p_value and result.p_value > 0.001
    assert verdict.passed
    # The fit's own diagnostic says pass too, and lists no cells (they are for failures).
    assert (
        verdict.fit_diagnostic
        == verdict.diagnostic
        == (
            f"pass: worst context coin: chi-square 8.7 on 1 df over 2000 draws, p = "
            f"{result.p_value:.3g} by simulation (chi-square approximation: 0.00316); "
            f"Holm-adjusted over 1 tests: {result.p_value:.3g}, against the family-wise "
            "significance threshold 0.001"
        )
    )


def test_support_violations_lead_the_diagnostic_and_the_fit_has_its_own():
    bad = fail_context("bad")
    stray = ContextDraws("stray", np.array([0.5, 0.5, 0.0]), [0, 1] * 50 + [2, 2, 2])
    lone = ContextDraws("lone", np.array([0.5, 0.5, 0.0]), [0, 1] * 50 + [2])
    verdict = judge([lone, bad, stray], describe_token=lambda t: f"<{t}>")
    # The context with the most stray draws is the worst, whatever the fits say.
    assert verdict.worst_context == "stray"
    assert verdict.diagnostic == (
        "support violation (a correct sampler never draws these):\n"
        "  stray: token 2 '<2>' was drawn 3x but the combined filters excludes it"
    )
    assert verdict.fit_diagnostic.startswith("FAIL: worst context bad: chi-square 40.8 on 2 df")
    assert "token 2 '<2>': observed 150" in verdict.fit_diagnostic
    assert [len(r.violations) for r in verdict.results] == [1, 0, 1]


def test_at_most_five_violations_are_listed():
    probabilities = np.array([1.0] + [0.0] * 9)
    context = ContextDraws("ctx", probabilities, list(range(10)))
    verdict = judge([context])
    assert len(verdict.violations) == 9
    assert len(verdict.diagnostic.splitlines()) == 1 + 5


def test_contexts_without_a_fit_only_get_the_support_check():
    skipped = ContextDraws("few", np.array([0.5, 0.5]), [0] * 30, fit=False)
    verdict = judge([skipped])
    [result] = verdict.results
    assert (result.tested, result.statistic, result.dof, result.p_value) == (False, 0.0, 0, 1.0)
    assert (result.asymptotic_p_value, result.adjusted_p_value) == (1.0, 1.0)
    assert verdict.passed and verdict.p_values == {} and verdict.adjusted_p_values == {}


def test_an_aggregate_is_fit_over_its_contexts_and_checks_no_support():
    # Two contexts of 10 draws each, both all token 0: alone they have too few draws to
    # reject; pooled, 20 draws of token 0 against 0.5/0.5 give X² = 20.
    first = ContextDraws("a", np.array([0.5, 0.5, 0.0]), [0] * 10 + [2], fit=False)
    second = ContextDraws("b", np.array([0.5, 0.5, 0.0]), [0] * 10, fit=False)
    verdict = judge([first, second], aggregates=[Aggregate("both", [first, second])])
    pooled = verdict.results[2]
    assert (pooled.context, pooled.n_draws, pooled.tested) == ("both", 21, True)
    assert pooled.statistic == pytest.approx(20.0) and pooled.dof == 1
    # The stray token 2 is the first context's violation, not the aggregate's.
    assert pooled.violations == [] and pooled.support_size == 0
    assert [v.context for v in verdict.violations] == ["a"]
    assert verdict.results[0].support_size == 2
    assert verdict.adjusted_p_values == {"both": pooled.p_value}


def test_the_family_size_sets_the_simulations_and_the_holm_factor():
    # Two failing contexts: B is sized for two tests, and each p-value is doubled.
    verdict = judge([fail_context("x"), fail_context("y")])
    b = stats.simulations_needed(stats.DEFAULT_ALPHA, 2)
    assert b == 20_000
    assert verdict.p_values == {"x": 1 / (b + 1), "y": 1 / (b + 1)}
    assert verdict.adjusted_p_values == {"x": 2 / (b + 1), "y": 2 / (b + 1)}
    assert "Holm-adjusted over 2 tests" in verdict.diagnostic


def test_the_fit_diagnostic_leaves_out_the_support_violations_of_its_context():
    # One context with stray draws whose fit also fails: the diagnostic is about the
    # stray draws, the fit diagnostic about the fit of the very same context.
    context = fail_context()
    context.probabilities = np.array([0.5, 0.3, 0.2, 0.0])
    context.draws = [*context.draws, 3]
    verdict = judge([context])
    assert verdict.diagnostic.startswith("support violation (a correct sampler never draws")
    assert verdict.fit_diagnostic.startswith("FAIL: worst context ctx: chi-square 40.8 on 2 df")


def test_a_disabled_top_p_is_not_nudged():
    # top_p 1 keeps everything; nudged to 0.999 it would drop token 2 (0.9995 above it).
    logprobs = np.log([0.6, 0.3995, 0.0005])
    assert support_is_stable(logprobs, sampled(top_p=1.0))
    assert support(logprobs, top_p=1.0) == {0, 1, 2}
    assert support(logprobs, top_p=0.999) == {0, 1}


def test_every_active_filter_is_nudged():
    # top_p at a threshold (unstable) with a stable min_p: still unstable.
    settings = sampled(top_p=0.4995, min_p=0.01)
    assert not support_is_stable(np.log([0.5, 0.3, 0.2]), settings)
    assert support_is_stable(np.log([0.5, 0.3, 0.2]), replace(settings, top_p=0.4985))


def test_a_near_tie_for_the_top_token_makes_top_k_1_unstable():
    logprobs = np.array([-0.5, -0.5 - 1e-4, -3.0])
    assert not support_is_stable(logprobs, sampled(top_k=1))
    assert support_is_stable(np.array([-0.5, -0.6, -3.0]), sampled(top_k=1))


def test_a_logprob_row_of_shape_one_by_vocabulary_is_flattened():
    logprobs = np.array([[-0.5, -1.0, -1.0 - 1e-4, -4.0]])
    assert not support_is_stable(logprobs, sampled(top_k=2))
    assert support_is_stable(logprobs, sampled(top_k=3))


def test_float32_probabilities_are_normalised_in_float64():
    p32 = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    fit = chi_square_fit([(p32, [0] * 10 + [1] * 20 + [2] * 30)])
    expected = 60 * (p32.astype(np.float64) / np.sum(p32))
    assert [c.expected for c in fit.cells] == expected[::-1].tolist()
    assert expected.tolist() != (60 * (p32 / np.sum(p32))).astype(np.float64).tolist()


def test_a_logprob_row_is_flattened_and_taken_in_float64():
    implied = implied_distribution(np.log([[0.5, 0.5]]).astype(np.float32), sampled())
    assert implied.probabilities.shape == (2,)
    assert implied.probabilities.dtype == np.float64


def test_cells_of_equal_probability_keep_token_order():
    # 1000 tokens of three probabilities (ties everywhere): cells run from the most likely
    # down, ties in token order, so the same distribution always pools the same way.
    p = np.random.default_rng(1).choice([1.0, 2.0, 3.0], 1000)
    p /= p.sum()
    cells = stats.pooled_cells(p, 10**6)
    assert cells == [[t] for t in sorted(range(1000), key=lambda t: (-p[t], t))]


def test_the_fit_pools_by_the_given_min_expected():
    # 20 draws against 0.6/0.35/0.05: expected 12, 7, 1. At min_expected 1 each token is a
    # cell; at the default 5 token 2 joins token 1.
    draws = [0] * 12 + [1] * 7 + [2]
    probabilities = np.array([0.6, 0.35, 0.05])
    assert len(chi_square_fit([(probabilities, draws)], min_expected=1.0).cells) == 3
    assert len(chi_square_fit([(probabilities, draws)]).cells) == 2
