"""Engines for the agreement tests: the reference with deterministic noise on its logits.

``lmconform agree`` teacher-forces engines through ``score`` (or, without it, one
one-token ``generate`` per position), so the noise is added where ``score`` computes
its logits. Usable from the CLI as ``agreement_engines:SmallNoise`` with ``tests`` on
``PYTHONPATH``.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np

from engines.adapters.base import event_from_logprobs
from engines.adapters.reference import ReferenceEngine


def noisy_logprobs(logits: np.ndarray, amplitude: float) -> np.ndarray:
    """Log-softmax of ``logits`` (positions x vocab) after each logit moved by at most
    ``amplitude``: a fixed pseudo-random pattern per position, as rounding would."""
    positions, vocab = logits.shape
    pattern = np.sin(np.arange(vocab)[None, :] * 12.9898 + np.arange(positions)[:, None] * 78.233)
    moved = logits + amplitude * pattern
    return moved - np.logaddexp.reduce(moved, axis=-1, keepdims=True)


class NoisyScores(ReferenceEngine):
    name = "noisy-scores"
    amplitude = 0.0

    def score(self, request):
        tokens = list(request.prompt) + list(request.continuation)
        logits = np.array(self.model(mx.array(tokens)[None])[0].astype(mx.float32), np.float64)
        logprobs = noisy_logprobs(logits, self.amplitude)
        start = len(request.prompt) - 1
        return [
            event_from_logprobs(t, logprobs[start + i], self.vocab_size, request.top_logprobs)
            for i, t in enumerate(request.continuation)
        ]


class SmallNoise(NoisyScores):
    """Noise of float32 kernels: far inside fp32's agreement limits."""

    amplitude = 1e-4


class LargeNoise(NoisyScores):
    """Noise of a few tenths of a nat: what no float32 engine does."""

    amplitude = 0.3


class NoScore(ReferenceEngine):
    """The reference without the ``score`` capability: teacher-forced by ``generate``."""

    name = "no-score"
    capabilities = ReferenceEngine.capabilities - {"score"}


class NoTopLogprobs(ReferenceEngine):
    """Scores without the top logprobs it was asked for: nothing to measure."""

    name = "no-top-logprobs"

    def score(self, request):
        return [replace(e, top_logprobs=None) for e in super().score(request)]


class ScoreChunksForgetContext(ReferenceEngine):
    """Broken: ``score`` runs the text in chunks of ``chunk`` tokens, each from an empty
    cache, so every position past the first chunk is predicted without the text before
    its chunk (and from position 0 again): the kind of bug reported for prompt logprobs
    under chunked prefill. Generation is the reference's, and so is every score of fewer
    than ``chunk`` tokens."""

    name = "mutant-score-chunks"
    chunk = 64

    def score(self, request):
        tokens = list(request.prompt) + list(request.continuation)
        rows = []
        for start in range(0, len(tokens), self.chunk):
            logits = self.model(mx.array(tokens[start : start + self.chunk])[None])[0]
            logits = logits.astype(mx.float32)  # (chunk, vocab)
            rows.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
        logprobs = np.concatenate(rows)
        start = len(request.prompt) - 1
        return [
            event_from_logprobs(t, logprobs[start + i], self.vocab_size, request.top_logprobs)
            for i, t in enumerate(request.continuation)
        ]
