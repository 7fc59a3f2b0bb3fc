"""Test instruments for the benchmarks: an engine with known costs, and a known slowdown.

Neither measures anything real. They exist so the tests can prove the timing chain
(workloads -> runner -> history -> statistics) right on cheap, predictable numbers:

- ``SyntheticEngine`` an engine adapter (``engines.adapters.base.Engine``) that burns a
                      known amount of CPU time per prompt token and per decode step;
                      ``lmconform bench --engines synthetic:step_ms=2`` opens it
- ``slowed``          makes the decode phase of any engine cost a given fraction
                      more CPU time (``--engines reference:slowdown=0.15``), to prove
                      that a real 15% regression is flagged and a 2% one is not
- ``burn_cpu``        the busy-work both use
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import ClassVar, TypeVar

from benchmarks import memory
from benchmarks.engines import Profile
from engines.adapters.base import Engine
from engines.inputs import number
from engines.models import ModelSource
from engines.protocol import BatchRequest, GenerateRequest, TokenEvent

T = TypeVar("T")


def burn_cpu(seconds: float) -> None:
    """Busy-work for ``seconds`` of this thread's CPU time.

    Work measured in CPU time, not wall time, behaves like a compute-bound engine:
    when another process takes half the CPU, the step takes twice as long on the wall
    clock, for the synthetic engine and its slowed copy alike, so their *ratio*
    survives a loaded machine. (Sleeping does not: each extra wake-up on a busy
    machine costs a scheduling delay that has nothing to do with its length.)
    """
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


def slowed(events: Iterable[T], fraction: float) -> Iterator[T]:
    """``events`` (``TokenEvent`` or ``(row, TokenEvent)``) with the decode phase made
    ``fraction`` more costly: each finishing event (one with a ``finish_reason``) is
    held back by busy-work of ``fraction`` of the CPU time the process spent since the
    first event (or the previous finishing one); prefill, up to the first event, is
    left alone. Busy-work is real work: it adds its CPU time, and its wall time is what
    that CPU time takes on this machine now, as for the engine's own computing (a sleep
    would add wall time that no CPU-time metric sees, and a wake-up on a busy machine
    costs a scheduling delay unrelated to its length).

    Why at the finish and not between tokens: an engine may decode one step ahead (the
    reference, as mlx-lm, queues step n+1 on MLX's worker thread before it hands out
    token n). A delay between tokens then overlaps the engine's own work and gives its
    worker slack, so the engine blocks less often; on a loaded machine each block costs
    a trip through the scheduler, and a copy slowed between tokens came out *faster*
    (the wrong-sign estimates of the first power runs). Paid at the finish, the delay
    changes nothing the engine does: the trial's CPU time grows by exactly ``fraction``
    of the decode phase's, and the decode rate (first to last token) by the busy-work's
    wall time.
    """
    mark: float | None = None  # process CPU time when the owed work started to accrue
    for item in events:
        event = item[1] if isinstance(item, tuple) else item
        if mark is None:
            mark = time.process_time()
        elif event.finish_reason is not None:
            burn_cpu(fraction * (time.process_time() - mark))
            mark = time.process_time()
        yield item


class SyntheticEngine(Engine):
    """An engine that burns a known amount of CPU time instead of computing logits.

    Prefill costs ``prefill_us`` microseconds of CPU per prompt token, each decode step
    ``step_ms`` milliseconds (a batched step grows by ``batch_growth`` per extra
    sequence), and every generated token appends ``kv_bytes`` of "KV cache" (a NumPy
    buffer, so the memory probe has something real to see). Speculative rounds cost
    ``1 + 0.25 * num_draft_tokens`` steps and yield two tokens, one from the draft.
    Tokens are bytes; there are no end tokens. Options arrive as strings (from a spec).
    """

    name = "synthetic"
    model_formats = ("builtin",)
    capabilities = frozenset({"greedy", "stream", "logit_bias", "speculative", "batch"})
    option_checks: ClassVar[dict] = {
        "step_ms": number(float, 0, 60_000), "prefill_us": number(float, 0, 60_000_000),
        "batch_growth": number(float, 0, 100), "kv_bytes": number(float, 0, 2**30),
        "weight_mb": number(float, 0, 2**20),
    }

    def __init__(
        self,
        source: ModelSource | None = None,
        *,
        step_ms: float | str = 2.0,
        prefill_us: float | str = 50.0,
        batch_growth: float | str = 0.1,
        kv_bytes: int | str = 16384,
        weight_mb: float | str = 10.0,
    ):
        super().__init__(source or ModelSource("synthetic", "builtin"))
        self.step_s, self.prefill_s = float(step_ms) / 1e3, float(prefill_us) / 1e6
        self.batch_growth, self.kv_bytes = float(batch_growth), int(float(kv_bytes))
        self.weight_bytes = int(float(weight_mb) * 1e6)

    @property
    def vocab_size(self) -> int:
        return 256

    def timing_profile(self) -> Profile:
        return Profile(
            encode=lambda text: list(text.encode("utf-8")),
            end_tokens=[],
            probe=memory.TracemallocProbe,
            weight_bytes=self.weight_bytes,
            weight_bytes_per_token=self.weight_bytes,
            settings={"step_s": self.step_s, "prefill_s": self.prefill_s},
        )

    def describe(self) -> dict:
        return {"engine": self.name, "version": "synthetic", "model": self.source.describe()}

    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        import numpy as np

        cache = []
        draft = request.draft.num_draft_tokens if request.draft else 0
        burn_cpu(self.prefill_s * len(request.prompt))
        # Each round: its cost, then its tokens (from the draft or not).
        rounds = [[False]]
        while sum(map(len, rounds)) < request.max_tokens:
            rounds.append([True, False] if draft else [False])
        produced = 0
        for index, round_ in enumerate(rounds):
            if index:
                burn_cpu(self.step_s * (1 + 0.25 * draft))
            for from_draft in round_[: request.max_tokens - produced]:
                cache.append(np.ones(self.kv_bytes, dtype=np.uint8))
                produced += 1
                last = produced == request.max_tokens
                yield TokenEvent(produced % 256, from_draft=from_draft,
                                 finish_reason="length" if last else None)

    def stream_batch(self, request: BatchRequest) -> Iterator[tuple[int, TokenEvent]]:
        size = len(request.rows)
        steps = max(row.request.max_tokens for row in request.rows)
        burn_cpu(self.prefill_s * sum(len(row.request.prompt) for row in request.rows))
        for step in range(steps):
            if step:
                burn_cpu(self.step_s * (1 + self.batch_growth * (size - 1)))
            for i, row in enumerate(request.rows):
                if step < row.request.max_tokens:
                    last = step + 1 == row.request.max_tokens
                    yield i, TokenEvent(step % 256, finish_reason="length" if last else None)

    def generate_batch(self, request: BatchRequest) -> list[list[TokenEvent]]:
        rows: list[list[TokenEvent]] = [[] for _ in request.rows]
        for i, event in self.stream_batch(request):
            rows[i].append(event)
        return rows
