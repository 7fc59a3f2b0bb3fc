"""Metric definitions (benchmarks/workloads.py), checked on a virtual clock.

The fake engine below advances a virtual clock by known costs instead of taking
real time, so each metric must come out exactly as defined: prefill counts up to
the first token, decode and batch rates exclude the first token, speculative
speed-up is the ratio of two runs in the same trial.
"""

from contextlib import contextmanager

import pytest

from benchmarks.engines import BenchEngine
from benchmarks.workloads import (
    METRICS,
    PROMPT_TEXT,
    Workload,
    metric,
    prompt_ids,
    resolve,
    standard_workloads,
)


class VirtualClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeEngine(BenchEngine):
    """Prefill 0.01 s per prompt token, decode 0.1 s per step (0.15 s per drafted round
    yielding two tokens), a batched step 0.1 s * (1 + 0.5 * (batch - 1))."""

    name = model_name = "fake"

    def __init__(self, clock: VirtualClock, extra_bytes: int = 5000):
        self.clock, self.extra_bytes = clock, extra_bytes
        self.calls = []

    def load(self):
        pass

    def versions(self):
        return {}

    def encode(self, text):
        return [ord(c) for c in text]

    def weight_bytes(self):
        return 2_000_000

    def weight_bytes_per_token(self):
        return 2_000_000

    def supports(self, kind):
        return True

    @contextmanager
    def _probe(self):
        class Probe:
            peak_extra_bytes = 0

        probe = Probe()
        yield probe
        probe.peak_extra_bytes = self.extra_bytes

    def memory_probe(self):
        return self._probe()

    def generate(self, prompt, max_tokens, on_token, num_draft_tokens=None):
        self.calls.append((list(prompt), max_tokens, num_draft_tokens))
        self.clock.t += 0.01 * len(prompt)
        on_token(False)
        produced = 1
        while produced < max_tokens:
            if num_draft_tokens:
                self.clock.t += 0.15
                for from_draft in [True, False][: max_tokens - produced]:
                    on_token(from_draft)
                    produced += 1
            else:
                self.clock.t += 0.1
                on_token(False)
                produced += 1

    def generate_batch(self, prompts, max_tokens, on_step):
        self.calls.append(([list(p) for p in prompts], max_tokens, None))
        self.clock.t += 0.01 * sum(len(p) for p in prompts)
        on_step(len(prompts))
        for _ in range(max_tokens - 1):
            self.clock.t += 0.1 * (1 + 0.5 * (len(prompts) - 1))
            on_step(len(prompts))


@pytest.fixture
def clock():
    return VirtualClock()


def test_prefill_rate_is_prompt_tokens_over_time_to_first_token(clock):
    engine = FakeEngine(clock)
    result = Workload("p", "prefill", prompt_tokens=40).measure(engine, now=clock)
    assert result["ttft_s"] == pytest.approx(0.4)
    assert result["prefill_tps"] == pytest.approx(100.0)
    assert engine.calls[0][1] == 1  # prefill asks for exactly one token


def test_decode_rate_excludes_the_first_token_and_memory_adds_weights(clock):
    engine = FakeEngine(clock)
    result = Workload("d", "decode", prompt_tokens=8, new_tokens=20).measure(engine, now=clock)
    assert engine.calls[0][1] == 21  # the first token belongs to prefill
    assert result["decode_tps"] == pytest.approx(10.0)  # 20 tokens in 20 * 0.1 s
    assert result["peak_memory_mb"] == pytest.approx((2_000_000 + 5000) / 1e6)


def test_batch_rate_counts_every_sequence_after_the_first_step(clock):
    engine = FakeEngine(clock)
    workload = Workload("b", "batch", prompt_tokens=8, new_tokens=10, batch_size=4)
    result = workload.measure(engine, now=clock)
    prompts = engine.calls[0][0]
    assert len(prompts) == 4 and len({tuple(p) for p in prompts}) == 4  # distinct prompts
    assert all(len(p) == 8 for p in prompts)
    # 10 steps of 4 tokens, each step 0.1 * (1 + 1.5) = 0.25 s -> 40 tokens / 2.5 s.
    assert result["batch_tps"] == pytest.approx(16.0)


def test_batch_that_does_not_start_every_sequence_together_is_an_error(clock):
    class Staggered(FakeEngine):
        def generate_batch(self, prompts, max_tokens, on_step):
            on_step(1)
            on_step(len(prompts))

    with pytest.raises(RuntimeError, match="expected one per sequence"):
        Workload("b", "batch", 8, new_tokens=1, batch_size=4).measure(Staggered(clock), clock)


def test_speculative_speedup_is_drafted_over_plain_in_the_same_trial(clock):
    engine = FakeEngine(clock)
    workload = Workload("s", "speculative", prompt_tokens=8, new_tokens=20, num_draft_tokens=3)
    result = workload.measure(engine, now=clock)
    assert [c[2] for c in engine.calls] == [None, 3]
    assert result["spec_decode_tps"] == pytest.approx(20 / (10 * 0.15))
    assert result["spec_speedup"] == pytest.approx((20 / 1.5) / 10.0)
    assert result["draft_acceptance"] == pytest.approx(10 / 21)


def test_prompt_ids_have_exact_length_and_offsets_differ():
    encode = lambda text: [ord(c) for c in text]
    assert prompt_ids(encode, 7) == encode(PROMPT_TEXT[:7])
    long = prompt_ids(encode, 3 * len(PROMPT_TEXT))  # longer than the text: it repeats
    assert len(long) == 3 * len(PROMPT_TEXT)
    assert prompt_ids(encode, 5, offset=7) == encode(PROMPT_TEXT[7:12])
    with pytest.raises(ValueError, match="positive"):
        prompt_ids(encode, 0)


def test_workload_sets_and_names_resolve():
    names = [w.name for w in resolve("quick,decode-64")]
    assert names == ["prefill-32", "decode-16", "batch-8-short", "decode-64"]
    assert [w.name for w in resolve(["prefill-32", "prefill-32"])] == ["prefill-32"]
    default = [w.name for w in resolve("default")]
    assert {"prefill-32", "prefill-128", "prefill-512", "decode-64", "batch-1", "batch-4",
            "batch-8", "batch-16", "speculative"} == set(default)
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        resolve("nope")
    with pytest.raises(ValueError, match="no workloads"):
        resolve("")


def test_standard_workloads_are_valid_and_their_metrics_are_catalogued():
    for workload in standard_workloads().values():
        assert all(name in METRICS for name in workload.metrics)
    with pytest.raises(ValueError, match="unknown workload kind"):
        Workload("x", "nonsense", 4)
    with pytest.raises(ValueError, match="positive"):
        Workload("x", "decode", 4, new_tokens=0)


def test_metric_direction_for_known_and_ingested_names():
    assert metric("decode_tps").higher_is_better
    assert not metric("ttft_s").higher_is_better
    assert not metric("peak_memory_mb").higher_is_better
    assert metric("tokens_per_s").higher_is_better  # guessed from the name
    assert not metric("latency_ms").higher_is_better
