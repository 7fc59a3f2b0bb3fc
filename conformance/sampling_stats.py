"""Sampler statistics: the distribution settings imply, and whether draws fit it.

``implied_distribution`` states mlx-lm's sampling semantics (which the
reference follows) in NumPy: the filters act on the *untempered* log-
probabilities, in the order top-p, min-p, top-k, each setting excluded tokens
to -inf; the survivors are drawn from ``softmax(logprobs / temp)``.

``goodness_of_fit`` judges seeded draws against that distribution twice:

- support: a draw of a token the settings exclude fails at once (one such
  draw is proof, no statistics needed);
- frequencies: Pearson's chi-square over tokens expected at least 5 times,
  the rest pooled, at significance ``alpha``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from .protocol import SamplerSettings

MIN_EXPECTED = 5.0  # the usual validity condition of the chi-square approximation


def implied_distribution(logprobs: np.ndarray, settings: SamplerSettings) -> np.ndarray:
    """Probabilities of each token under ``settings``, given the full logprob vector."""
    kept = np.asarray(logprobs, dtype=np.float64).copy()
    if 0 < settings.top_p < 1:
        kept = _top_p(kept, settings.top_p)
    if settings.min_p > 0:
        kept = _min_p(kept, settings.min_p, settings.min_tokens_to_keep)
    if settings.top_k > 0:
        kept = _top_k(kept, settings.top_k)
    scaled = kept / settings.temp
    scaled -= scaled.max()
    probs = np.exp(scaled)
    return probs / probs.sum()


def _top_p(logprobs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep a token iff the tokens ranked above it hold less than ``top_p`` of the mass
    (so the token that crosses the threshold is kept; ties at the threshold all are)."""
    order = np.sort(logprobs)[::-1]
    probs = np.exp(order)
    mass_above = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    threshold = order[mass_above < top_p * probs.sum()].min()
    return np.where(logprobs < threshold, -np.inf, logprobs)


def _min_p(logprobs: np.ndarray, min_p: float, min_tokens_to_keep: int) -> np.ndarray:
    """Keep tokens with probability at least ``min_p`` times the top token's."""
    keep = logprobs >= logprobs.max() + np.log(min_p)
    keep[np.argsort(logprobs)[::-1][:min_tokens_to_keep]] = True
    return np.where(keep, logprobs, -np.inf)


def _top_k(logprobs: np.ndarray, top_k: int) -> np.ndarray:
    keep = np.zeros(logprobs.shape, dtype=bool)
    keep[np.argsort(logprobs, kind="stable")[::-1][:top_k]] = True
    return np.where(keep, logprobs, -np.inf)


@dataclass
class FitResult:
    draws: int
    p_value: float
    chi2: float
    df: int
    # Draws of tokens the settings exclude: token -> count.
    outside_support: dict[int, int] = field(default_factory=dict)
    # (token ids in the bin, observed, expected), largest standardized deviation first.
    bins: list[tuple[list[int], int, float]] = field(default_factory=list)

    def passed(self, alpha: float) -> bool:
        return not self.outside_support and self.p_value >= alpha


def goodness_of_fit(samples: list[int], probs: np.ndarray) -> FitResult:
    counts = Counter(int(s) for s in samples)
    n = len(samples)
    outside = {t: c for t, c in counts.items() if not 0 <= t < len(probs) or probs[t] == 0}
    support = np.flatnonzero(probs > 0)
    expected = n * probs[support]
    big = expected >= MIN_EXPECTED
    bins = [[int(t)] for t in support[big]]
    pooled = [int(t) for t in support[~big]]
    if pooled:
        if n * probs[pooled].sum() >= MIN_EXPECTED or not bins:
            bins.append(pooled)
        else:  # too little mass to stand alone: join the least likely big bin
            smallest = min(range(len(bins)), key=lambda i: probs[bins[i]].sum())
            bins[smallest] = bins[smallest] + pooled
    observed = np.array([sum(counts.get(t, 0) for t in b) for b in bins], dtype=np.float64)
    expect = np.array([n * probs[b].sum() for b in bins])
    df = len(bins) - 1
    if df == 0:
        chi2, p_value = 0.0, 1.0
    else:
        chi2 = float(((observed - expect) ** 2 / expect).sum())
        p_value = float(stats.chi2.sf(chi2, df))
    order = np.argsort(-np.abs(observed - expect) / np.sqrt(expect))
    table = [(bins[i], int(observed[i]), float(expect[i])) for i in order]
    return FitResult(n, p_value, chi2, df, outside, table)
