"""The interface every engine adapter implements.

An adapter wraps one engine with one model loaded. It declares its
capabilities and the model formats it accepts, answers requests with token
events, and raises ``Unsupported`` for a request it cannot express (the case
is then reported "unsupported", not failed). Anything else it raises is a
failure of the case that sent the request; the run goes on.

To plug in your own Python engine, subclass ``Engine`` and run
``lmconform check --engine yourmodule:YourEngine``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np

from engines.models import ModelSource
from engines.protocol import (
    BatchRequest,
    GenerateRequest,
    ProtocolError,
    ScoreRequest,
    TokenEvent,
    Unsupported,
)


class Engine(ABC):
    name: str = "engine"
    capabilities: frozenset[str] = frozenset({"greedy"})
    # Model formats this engine loads, most preferred first (see engines/models.py).
    model_formats: tuple[str, ...] = ("hf-folder",)
    # Bits an engine rounds activations to inside quantized matmuls, where it does (None:
    # float activations); it picks the precision profile the engine is judged under.
    activation_bits: int | None = None
    # Spec options (strings, ``NAME:key=value``) -> a validator of ``engines.inputs``: the
    # registry checks their values before the engine is opened (a typo is exit 2 at once).
    option_checks: ClassVar[dict[str, Callable[[str], object]]] = {}

    def __init__(self, source: ModelSource):
        self.source = source

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Size of the logprob vectors the model produces."""

    @abstractmethod
    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        """Events of one generation, in order; the last one carries ``finish_reason``."""

    def generate_batch(self, request: BatchRequest) -> list[list[TokenEvent]]:
        """One event list per row, in the order of ``request.rows``."""
        raise Unsupported(f"{self.name} does not batch")

    def score(self, request: ScoreRequest) -> list[TokenEvent]:
        raise Unsupported(f"{self.name} does not score continuations")

    @property
    def label(self) -> str:
        """A short name for tables and progress lines; ``name`` stays the full identity."""
        return self.name

    def describe(self) -> dict[str, Any]:
        """Engine name, version and model, for reports."""
        return {"engine": self.name, "model": self.source.describe()}

    def close(self) -> None:
        """Release resources (models, processes)."""


def event_from_logprobs(
    token: int,
    logprobs: np.ndarray,
    vocab_size: int,
    top_k: int,
    **fields: Any,
) -> TokenEvent:
    """A ``TokenEvent`` from an engine's full logprob vector for one step.

    The vector's length is checked here: a vector of the wrong length means
    the engine's logprobs belong to some other vocabulary (or step), and any
    comparison built on them would mislead.
    """
    vector = np.asarray(logprobs, dtype=np.float64).reshape(-1)
    if vector.shape[0] != vocab_size:
        raise ProtocolError(
            f"logprob vector has {vector.shape[0]} entries; the vocabulary has {vocab_size}"
        )
    token = int(token)
    if not 0 <= token < vocab_size:
        raise ProtocolError(f"token {token} is outside the vocabulary [0, {vocab_size})")
    top = None
    if top_k > 0:
        k = min(top_k, vocab_size)
        best = np.argpartition(-vector, k - 1)[:k]
        best = best[np.argsort(-vector[best], kind="stable")]
        top = [(int(t), float(vector[t])) for t in best]
    return TokenEvent(token=token, logprob=float(vector[token]), top_logprobs=top, **fields)


def ends_with_any(tokens: list[int], sequences: list[list[int]]) -> bool:
    return any(seq and tokens[-len(seq) :] == list(seq) for seq in sequences)
