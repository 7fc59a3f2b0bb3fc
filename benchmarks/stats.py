"""Verdicts on two sets of raw samples: improved, unchanged or regressed.

Two questions, both must say "yes" before a change is called:

1. *Is there a shift at all?* The Mann-Whitney U test (a rank test) on the raw
   samples: it assumes nothing about the shape of the timing distribution, and one
   wild outlier moves one rank, not the mean. A mean-percentage rule ("the mean got
   5% worse") is fooled by exactly that outlier.
2. *Is the shift big enough to matter?* The relative change of the medians must
   reach a minimum effect size (default 5%). With many samples a rank test detects
   a 1% drift caused by a warmer room; nobody should be paged for that.

A significant shift under the minimum effect stays "unchanged", with a note saying
so: the samples do support a small change, and a caller who cares about small
changes lowers ``min_effect``.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

IMPROVED, UNCHANGED, REGRESSED = "improved", "unchanged", "regressed"

DEFAULT_ALPHA = 0.05
DEFAULT_MIN_EFFECT = 0.05
# Below this many samples per side a two-sided U test cannot reach p < 0.05 at all.
MIN_SAMPLES = 4


@dataclass(frozen=True)
class Verdict:
    verdict: str
    base_median: float
    head_median: float
    change: float  # head median / base median - 1 (sign is not "good" or "bad")
    p_value: float | None
    n_base: int
    n_head: int
    note: str = ""


def compare_samples(
    base: list[float],
    head: list[float],
    higher_is_better: bool,
    alpha: float = DEFAULT_ALPHA,
    min_effect: float = DEFAULT_MIN_EFFECT,
) -> Verdict:
    """Judge ``head`` against ``base`` for one metric."""
    if not base or not head:
        raise ValueError("both sample sets must be non-empty")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if min_effect < 0:
        raise ValueError(f"min_effect must be >= 0, got {min_effect}")
    base_median, head_median = median(base), median(head)
    change = head_median / base_median - 1 if base_median else float("inf")
    common = {
        "base_median": base_median, "head_median": head_median, "change": change,
        "n_base": len(base), "n_head": len(head),
    }
    if min(len(base), len(head)) < MIN_SAMPLES:
        note = f"too few samples (need {MIN_SAMPLES} per side) for a rank test"
        return Verdict(UNCHANGED, p_value=None, note=note, **common)

    if len(set(base) | set(head)) == 1:
        return Verdict(UNCHANGED, p_value=1.0, note="all samples identical", **common)
    from scipy.stats import mannwhitneyu  # here: scipy.stats takes 0.5 s to import

    p_value = float(mannwhitneyu(base, head, alternative="two-sided").pvalue)
    better = change > 0 if higher_is_better else change < 0
    if p_value >= alpha:
        return Verdict(UNCHANGED, p_value=p_value, **common)
    if abs(change) < min_effect:
        note = f"significant shift {change:+.1%} is below the {min_effect:.0%} minimum effect"
        return Verdict(UNCHANGED, p_value=p_value, note=note, **common)
    return Verdict(IMPROVED if better else REGRESSED, p_value=p_value, **common)
