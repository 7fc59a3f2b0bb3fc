"""Verdicts on two sets of raw samples: how big the change is, how sure, and what it means.

A verdict answers three questions, in this order:

1. *How big is the change?* The Hodges-Lehmann estimate of the shift between the
   two samples, on a log scale so that it reads as a ratio (``head / base - 1``):
   the median of all pairwise log-ratios ``log(head_j / base_i)`` (unpaired), or of
   the Walsh averages of the per-block log-ratios (paired, when base and head ran in
   the same interleaved blocks). One wild outlier moves one pairwise ratio out of
   ``m * n``, not the estimate; a mean would follow it.
2. *How sure?* A distribution-free confidence interval for that shift, from the
   rank statistic the estimate inverts: Mann-Whitney U (unpaired) or the Wilcoxon
   signed-rank statistic (paired) (Hollander & Wolfe, *Nonparametric Statistical
   Methods*, sections 3.2 and 4.3; normal approximation of the rank distribution).
   With it comes the *minimum detectable effect*: the change these sample sizes
   and this noise would detect 80% of the time, so "unchanged" says "unchanged
   above X%" rather than nothing.
3. *Does it matter?* A change is "improved" or "regressed" only when the interval
   excludes zero (significant at ``alpha``) *and* the estimate reaches the minimum
   effect (default 2%): with enough samples an interval excludes a 0.3% drift caused
   by a warmer room, and nobody should be paged for that.

The Mann-Whitney / Wilcoxon p-value is kept next to the interval for readers used to it
(same normal approximation; no SciPy, whose import takes seconds on a busy machine).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace
from itertools import pairwise
from statistics import NormalDist, median

import numpy as np

IMPROVED, UNCHANGED, REGRESSED = "improved", "unchanged", "regressed"

DEFAULT_ALPHA = 0.05
DEFAULT_MIN_EFFECT = 0.02
# The power at which the minimum detectable effect is quoted.
MDE_POWER = 0.8
# Below this many samples per side a two-sided rank test cannot reach p < 0.05 at all.
MIN_SAMPLES = 4


@dataclass(frozen=True)
class Interval:
    """A shift on the log scale with its confidence interval (``low <= estimate <= high``)."""

    estimate: float
    low: float
    high: float

    def relative(self) -> tuple[float, float, float]:
        """(estimate, low, high) as relative changes ``exp(x) - 1``."""
        return tuple(math.expm1(x) for x in (self.estimate, self.low, self.high))


def _rank_quantile(alpha: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2)


def _order_statistic_interval(values: np.ndarray, depth: float) -> tuple[float, float]:
    """The ``depth``-th smallest and largest of ``values`` (1-based; rounded down).

    A depth under 1 means the sample is too small for the confidence asked: the
    interval is unbounded.
    """
    k = math.floor(depth)
    if k < 1:
        return -math.inf, math.inf
    ordered = np.sort(values)
    return float(ordered[k - 1]), float(ordered[len(ordered) - k])


def hodges_lehmann_unpaired(base: np.ndarray, head: np.ndarray, alpha: float) -> Interval:
    """Shift of ``head`` over ``base``: median of all ``head_j - base_i``, with the
    Mann-Whitney interval (the ``C``-th smallest and largest differences, where
    ``C = mn/2 - z * sqrt(mn(m+n+1)/12)``)."""
    differences = (head[None, :] - base[:, None]).ravel()  # (m * n,)
    m, n = len(base), len(head)
    depth = m * n / 2 - _rank_quantile(alpha) * math.sqrt(m * n * (m + n + 1) / 12)
    low, high = _order_statistic_interval(differences, depth)
    return Interval(float(np.median(differences)), low, high)


def hodges_lehmann_paired(differences: np.ndarray, alpha: float) -> Interval:
    """Centre of the per-pair ``differences``: median of the Walsh averages
    ``(d_i + d_j) / 2, i <= j``, with the signed-rank interval (the ``C``-th smallest
    and largest Walsh averages, ``C = N/2 - z * sqrt(n(n+1)(2n+1)/24)``, N = n(n+1)/2)."""
    n = len(differences)
    i, j = np.triu_indices(n)
    walsh = (differences[i] + differences[j]) / 2  # (n(n+1)/2,)
    depth = len(walsh) / 2 - _rank_quantile(alpha) * math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    low, high = _order_statistic_interval(walsh, depth)
    return Interval(float(np.median(walsh)), low, high)


def minimum_detectable_effect(interval: Interval, alpha: float, power: float = MDE_POWER) -> float:
    """The relative change that would be detected with probability ``power``.

    The interval's half-width is ``z_(1-alpha/2)`` standard errors; a true shift of
    ``(z_(1-alpha/2) + z_power)`` standard errors lands outside zero ``power`` of the time.
    """
    if not math.isfinite(interval.high - interval.low):
        return math.inf
    z = _rank_quantile(alpha)
    standard_error = (interval.high - interval.low) / (2 * z)
    return math.expm1((z + NormalDist().inv_cdf(power)) * standard_error)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    base_median: float
    head_median: float
    change: float  # Hodges-Lehmann estimate of head / base - 1 (sign is not "good" or "bad")
    p_value: float | None
    n_base: int
    n_head: int
    note: str = ""
    # The change's confidence interval (relative, like ``change``) and its level.
    low: float = -math.inf
    high: float = math.inf
    confidence: float = 1 - DEFAULT_ALPHA
    # The smallest relative change these samples would detect (80% of the time).
    mde: float = math.inf
    paired: bool = False

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def average_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 1..n of ``values`` (ties share their average rank), and the tie group sizes."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # the highest rank in each tie group
    return (upper - (counts - 1) / 2)[inverse], counts


def _two_sided(z: float) -> float:
    return 2 * (1 - NormalDist().cdf(abs(z)))


def rank_test_p(base: list[float], head: list[float], paired: bool) -> float:
    """Two-sided p-value of the rank test the interval inverts, by the same normal
    approximation (with tie and continuity corrections): Mann-Whitney U unpaired, the
    Wilcoxon signed-rank statistic paired (zero differences dropped)."""
    if paired:
        differences = np.asarray(head, dtype=float) - np.asarray(base, dtype=float)
        differences = differences[differences != 0]
        n = len(differences)
        if n == 0:
            return 1.0
        ranks, ties = average_ranks(np.abs(differences))
        statistic, mean = float(ranks[differences > 0].sum()), n * (n + 1) / 4
        variance = n * (n + 1) * (2 * n + 1) / 24 - float((ties**3 - ties).sum()) / 48
    else:
        m, n = len(base), len(head)
        ranks, ties = average_ranks(np.asarray([*base, *head], dtype=float))
        statistic = float(ranks[m:].sum()) - n * (n + 1) / 2  # U of head over base
        mean, total = m * n / 2, m + n
        variance = m * n / 12 * (total + 1 - float((ties**3 - ties).sum()) / (total * (total - 1)))
    if variance <= 0:
        return 1.0
    distance = max(abs(statistic - mean) - 0.5, 0.0)  # continuity correction
    return _two_sided(distance / math.sqrt(variance))


def shift_interval(base: list[float], head: list[float], alpha: float, paired: bool) -> Interval:
    """The shift of ``head`` over ``base`` as an ``Interval`` on the log scale.

    Timings and rates are positive, and their changes are ratios, so the shift is
    taken between logarithms. A metric that can be zero or negative (an acceptance
    rate of 0) is shifted on its own scale, divided by the base median, and then
    expressed as ``log(1 + relative shift)`` so that ``relative()`` reads the same.
    """
    b, h = np.asarray(base, dtype=float), np.asarray(head, dtype=float)
    if (b > 0).all() and (h > 0).all():
        b, h, scale = np.log(b), np.log(h), 1.0
    else:
        scale = abs(float(np.median(b))) or 1.0
        b, h = b / scale, h / scale
    if paired:
        interval = hodges_lehmann_paired(h - b, alpha)
    else:
        interval = hodges_lehmann_unpaired(b, h, alpha)
    if scale != 1.0:  # back to log form, so that relative() reads the same for both
        interval = Interval(*(math.log1p(max(x, -1 + 1e-12)) if math.isfinite(x) else x
                              for x in (interval.estimate, interval.low, interval.high)))
    return interval


def compare_samples(
    base: list[float],
    head: list[float],
    higher_is_better: bool,
    alpha: float = DEFAULT_ALPHA,
    min_effect: float = DEFAULT_MIN_EFFECT,
    paired: bool = False,
) -> Verdict:
    """Judge ``head`` against ``base`` for one metric.

    ``paired``: ``base[k]`` and ``head[k]`` were measured in the same block (the
    same moment of the machine), so their ratio cancels what the machine did.
    """
    if not base or not head:
        raise ValueError("both sample sets must be non-empty")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if min_effect < 0:
        raise ValueError(f"min_effect must be >= 0, got {min_effect}")
    if paired and len(base) != len(head):
        raise ValueError(f"paired samples need equal counts, got {len(base)} and {len(head)}")
    if not all(map(math.isfinite, [*base, *head])):
        raise ValueError("samples must be finite numbers")
    base_median, head_median = float(median(base)), float(median(head))
    common = {
        "base_median": base_median, "head_median": head_median,
        "n_base": len(base), "n_head": len(head), "confidence": 1 - alpha, "paired": paired,
    }
    median_change = head_median / base_median - 1 if base_median else math.inf
    if min(len(base), len(head)) < MIN_SAMPLES:
        note = f"too few samples (need {MIN_SAMPLES} per side) for a rank test"
        return Verdict(UNCHANGED, change=median_change, p_value=None, note=note, **common)
    if len(set(base) | set(head)) == 1:
        return Verdict(UNCHANGED, change=0.0, p_value=1.0, low=0.0, high=0.0, mde=0.0,
                       note="all samples identical", **common)

    interval = shift_interval(base, head, alpha, paired)
    change, low, high = interval.relative()
    verdict = Verdict(UNCHANGED, change=change, p_value=rank_test_p(base, head, paired), low=low,
                      high=high, mde=minimum_detectable_effect(interval, alpha), **common)
    if math.isinf(verdict.mde):
        return replace(verdict, note=f"too few samples for a {1 - alpha:.4g} interval")
    if not verdict.significant:
        return replace(verdict, note=f"no change detectable above {verdict.mde:.1%}")
    if abs(change) < min_effect:
        note = f"significant shift {change:+.1%} is below the {100 * min_effect:g}% minimum effect"
        return replace(verdict, note=note)
    better = change > 0 if higher_is_better else change < 0
    return replace(verdict, verdict=IMPROVED if better else REGRESSED)


def describe(verdict: Verdict, higher_is_better: bool, speed: bool = True) -> str:
    """One sentence a person reads: "slower by 3.1% (95% CI 1.8-4.4%)" or
    "no change detectable above 2.4%".

    The magnitude is the change of the metric itself (``|head / base - 1|``); for a
    speed metric (rates, times) worse reads "slower", otherwise "worse".
    """
    level = f"{verdict.confidence:.0%} CI"
    if not verdict.significant:
        if math.isinf(verdict.mde):
            return verdict.note or "too few samples for an interval"
        return f"no change detectable above {verdict.mde:.1%} ({level} {_span(verdict)})"
    worse = verdict.change < 0 if higher_is_better else verdict.change > 0
    words = ("slower", "faster") if speed else ("worse", "better")
    word = words[0] if worse else words[1]
    low, high = sorted((abs(verdict.low), abs(verdict.high)))
    return f"{word} by {abs(verdict.change):.1%} ({level} {100 * low:.1f}-{100 * high:.1f}%)"


def _span(verdict: Verdict) -> str:
    return f"{verdict.low:+.1%} to {verdict.high:+.1%}"


def median_interval(values: list[float], alpha: float = DEFAULT_ALPHA) -> tuple[float, float]:
    """Distribution-free interval for the median: the order statistics ``x_(k)`` and
    ``x_(n+1-k)`` with ``k = n/2 - z * sqrt(n) / 2`` (the binomial(n, 1/2) count of
    samples below the median, normal approximation). Unbounded when ``n`` is too small."""
    depth = len(values) / 2 - _rank_quantile(alpha) * math.sqrt(len(values)) / 2
    return _order_statistic_interval(np.asarray(values, dtype=float), depth)


# --- change points over a history ------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A level change in a series: ``index`` is the first point of the new level."""

    index: int
    before: float  # the level (median) of the segment before, on the series' scale
    after: float  # the level of the segment from ``index`` on

    @property
    def change(self) -> float:
        return self.after / self.before - 1 if self.before else math.inf


def robust_noise(values: np.ndarray) -> float:
    """The noise's standard deviation, blind to steps and single outliers.

    Successive differences of a noisy level have twice its variance; a step or an
    outlier makes one or two large differences, which the median absolute deviation
    ignores (1.4826 makes the MAD a standard deviation for normal noise).
    """
    differences = np.diff(values)
    if len(differences) == 0:
        return 0.0
    mad = float(np.median(np.abs(differences - np.median(differences))))
    return 1.4826 * mad / math.sqrt(2)


def segment_costs(values: np.ndarray) -> list[list[float]]:
    """``cost[i][j]``: sum of absolute deviations of ``values[i:j]`` from their median.

    Growing each segment one value at a time keeps it sorted (``insort``); the sum of
    absolute deviations from the median is then the sum of the upper half minus the
    sum of the lower half (the median itself, for an odd length, deviates by zero).
    """
    n = len(values)
    cost = [[math.inf] * (n + 1) for _ in range(n + 1)]
    for i in range(n):
        ordered: list[float] = []
        for j in range(i, n):
            bisect.insort(ordered, float(values[j]))
            half = len(ordered) // 2
            cost[i][j + 1] = sum(ordered[len(ordered) - half:]) - sum(ordered[:half])
    return cost


def segment(values: np.ndarray, penalty: float, min_size: int = 2) -> list[int]:
    """Start indices of the segments minimising ``sum of L1 costs + penalty * segments``.

    Least absolute deviations from each segment's median (not squares from its mean),
    as asv's step detection does, so an outlier costs its distance, not its square.
    Segments are at least ``min_size`` long: with two or more, a single outlier can
    never be a segment of its own, and in a segment of two its distance to the
    median is the same as in the long segment around it, so isolating it gains nothing.
    Exact dynamic programming over every split, O(n^2) segment costs.
    """
    n = len(values)
    cost = segment_costs(values)
    best = [math.inf] * (n + 1)  # best[j]: cheapest segmentation of values[:j]
    best[0] = 0.0
    previous = [0] * (n + 1)  # previous[j]: where the last segment of values[:j] starts
    for j in range(min_size, n + 1):
        for i in range(j - min_size + 1):
            total = best[i] + cost[i][j] + penalty
            if total < best[j]:
                best[j], previous[j] = total, i
    if math.isinf(best[n]):  # shorter than one segment
        return [0]
    starts, j = [], n
    while j > 0:
        starts.append(int(previous[j]))
        j = previous[j]
    return sorted(starts)


# The penalty per segment, in noise standard deviations times log(n): a split of pure
# noise gains about sigma * sqrt(n) at most by chance; a real step of d sigmas over
# L points gains about L * d. Calibrated on simulated series (tests/test_bench_changes.py).
STEP_PENALTY = 3.0


def detect_steps(
    values: list[float], min_change: float = 0.0, penalty: float = STEP_PENALTY
) -> list[Step]:
    """Level changes in a positive series (one value per run, in history order).

    The series is segmented on a log scale (a 5% step is the same size at any level);
    each boundary is a step, with the segments' medians before and after. Steps
    smaller than ``min_change`` (relative) are dropped.
    """
    logs = np.log(np.asarray(values, dtype=float))
    if len(logs) < 4:
        return []
    sigma = robust_noise(logs) or 1e-12
    starts = segment(logs, penalty * sigma * math.log(len(logs)))
    bounds = [*starts, len(logs)]
    levels = [float(np.exp(np.median(logs[a:b]))) for a, b in pairwise(bounds)]
    steps = [Step(start, before, after)
             for start, before, after in zip(starts[1:], levels, levels[1:])]
    return [s for s in steps if abs(s.change) >= min_change]
