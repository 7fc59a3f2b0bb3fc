"""Metric definitions (benchmarks/workloads.py), checked on a virtual clock.

The fake engine below is an engine adapter (``engines.adapters.base.Engine``) that
advances a virtual clock by known costs instead of taking real time, yielding each
event as its token is "produced", so each metric must come out exactly as defined:
prefill counts up to the first token, decode and batch rates exclude the first token,
speculative speed-up is the ratio of two runs in the same trial, and an engine's own
clock (JSON-lines ``timing/1``) replaces arrival times when it reports one.
"""

import math

import pytest

from benchmarks.engines import Profile, TimedEngine
from benchmarks.workloads import (
    METRICS,
    PROMPT_TEXT,
    TokenClock,
    Workload,
    metric,
    prompt_ids,
    resolve,
    standard_workloads,
)
from engines.adapters.base import Engine
from engines.jsonl_protocol import EngineTimes, Usage
from engines.models import ModelSource
from engines.protocol import TokenEvent

END = 3  # the fake model's end token


class VirtualClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FixedProbe:
    def __init__(self, extra_bytes: int):
        self.extra_bytes, self.peak_extra_bytes = extra_bytes, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.peak_extra_bytes = self.extra_bytes


class FakeEngine(Engine):
    """Prefill 0.01 s per prompt token, decode 0.1 s per step (0.15 s per drafted round
    yielding two tokens), a batched step 0.1 s * (1 + 0.5 * (batch - 1)). It would emit
    its end token as the 3rd token unless the request's logit bias bans it."""

    name = "fake"
    capabilities = frozenset({"greedy", "stream", "logit_bias", "speculative", "batch"})

    def __init__(self, clock: VirtualClock, extra_bytes: int = 5000):
        super().__init__(ModelSource("fake", "builtin"))
        self.clock, self.extra_bytes = clock, extra_bytes
        self.requests = []

    @property
    def vocab_size(self):
        return 256

    def timing_profile(self):
        return Profile(encode=lambda text: [ord(c) for c in text], end_tokens=[END],
                       probe=lambda: FixedProbe(self.extra_bytes), weight_bytes=2_000_000,
                       weight_bytes_per_token=2_000_000)

    def tokens(self, request, produced):
        """The next token and whether this is the end (a 3rd token is END unless banned)."""
        banned = request.processors.logit_bias.get(END) == -math.inf
        token = END if produced == 2 and not banned else 65
        last = token == END or produced + 1 == request.max_tokens
        return token, last

    def generate(self, request):
        self.requests.append(request)
        draft = request.draft.num_draft_tokens if request.draft else None
        self.clock.t += 0.01 * len(request.prompt)
        produced = 0
        while True:
            for from_draft in ([True, False] if draft and produced else [False]):
                token, last = self.tokens(request, produced)
                produced += 1
                yield TokenEvent(token, from_draft=from_draft,
                                 finish_reason=("stop" if token == END else "length")
                                 if last else None)
                if last:
                    return
            self.clock.t += 0.15 if draft else 0.1

    def stream_batch(self, request):
        self.requests.append(request)
        size = len(request.rows)
        self.clock.t += 0.01 * sum(len(r.request.prompt) for r in request.rows)
        steps = request.rows[0].request.max_tokens
        for step in range(steps):
            if step:
                self.clock.t += 0.1 * (1 + 0.5 * (size - 1))
            for i in range(size):
                yield i, TokenEvent(65, finish_reason="length" if step + 1 == steps else None)


@pytest.fixture
def clock():
    return VirtualClock()


def timed_fake(clock, **kwargs) -> tuple[TimedEngine, FakeEngine]:
    fake = FakeEngine(clock, **kwargs)
    return TimedEngine.around(fake, "fake", model="fake"), fake


def test_prefill_rate_is_prompt_tokens_over_time_to_first_token(clock):
    engine, fake = timed_fake(clock)
    result = Workload("p", "prefill", prompt_tokens=40).measure(engine, now=clock)
    assert result["ttft_s"] == pytest.approx(0.4)
    assert result["prefill_tps"] == pytest.approx(100.0)
    assert fake.requests[0].max_tokens == 1  # prefill asks for exactly one token
    assert fake.requests[0].prompt == [ord(c) for c in PROMPT_TEXT[:40]]


def test_decode_rate_excludes_the_first_token_and_memory_adds_weights(clock):
    engine, fake = timed_fake(clock)
    result = Workload("d", "decode", prompt_tokens=8, new_tokens=20).measure(engine, now=clock)
    request = fake.requests[0]
    assert request.max_tokens == 21  # the first token belongs to prefill
    assert request.processors.logit_bias == {END: -math.inf}  # the end token is banned
    assert request.sampler.greedy
    assert result["decode_tps"] == pytest.approx(10.0)  # 20 tokens in 20 * 0.1 s
    assert result["peak_memory_mb"] == pytest.approx((2_000_000 + 5000) / 1e6)


def test_an_engine_that_cannot_ban_end_tokens_fails_a_trial_it_ends_early(clock):
    engine, fake = timed_fake(clock)
    fake.capabilities = fake.capabilities - {"logit_bias"}
    with pytest.raises(RuntimeError, match="produced 3 tokens, asked 21"):
        Workload("d", "decode", prompt_tokens=8, new_tokens=20).measure(engine, now=clock)
    assert fake.requests[0].processors.logit_bias == {}  # nothing it cannot express


def test_batch_rate_counts_every_sequence_after_the_first_step(clock):
    engine, fake = timed_fake(clock)
    workload = Workload("b", "batch", prompt_tokens=8, new_tokens=10, batch_size=4)
    result = workload.measure(engine, now=clock)
    prompts = [row.request.prompt for row in fake.requests[0].rows]
    assert len(prompts) == 4 and len({tuple(p) for p in prompts}) == 4  # distinct prompts
    assert all(len(p) == 8 for p in prompts)
    # 10 steps of 4 tokens, each step 0.1 * (1 + 1.5) = 0.25 s -> 40 tokens / 2.5 s.
    assert result["batch_tps"] == pytest.approx(16.0)


def test_batch_prefilled_in_groups_counts_from_the_last_first_token(clock):
    """Rows 0-1 start at once and decode 4 steps alone; rows 2-3 join after that."""

    def grouped():
        for _ in range(4):
            clock.t += 0.1
            yield 0, TokenEvent(65)
            yield 1, TokenEvent(65)
        for _ in range(3):
            clock.t += 1.0
            for row in range(4):
                yield row, TokenEvent(65)

    tokens = TokenClock(clock)
    for row, event in grouped():
        tokens.event(event, row)
    # Row 3's first token is the 12th event; the 8 after it took the last 2 steps (2.0 s).
    assert tokens.batch_rate(4) == pytest.approx(8 / 2.0)
    with pytest.raises(RuntimeError, match="answered 4 of its 5 sequences"):
        tokens.batch_rate(5)


def test_engine_clock_replaces_arrival_times_when_the_engine_reports_one(clock):
    engine, fake = timed_fake(clock)
    # As a timing/1 engine would report: read at 50.0, tokens at 50.5, 50.6, 50.7.
    fake.last_times = EngineTimes([50.5, 50.6, 50.7], Usage(50.0, peak_memory_bytes=7_000_000))
    result = Workload("d", "decode", prompt_tokens=8, new_tokens=2).measure(engine, now=clock)
    assert result["decode_tps"] == pytest.approx(2 / 0.2)  # the engine's clock, not ours (10)
    assert result["peak_memory_mb"] == pytest.approx(2.005)  # measured here, in-process
    prefill = Workload("p", "prefill", prompt_tokens=8)
    fake.last_times = EngineTimes([50.25], Usage(50.0))
    assert prefill.measure(engine, now=clock)["ttft_s"] == pytest.approx(0.25)
    # A report that does not match the events received is not used.
    fake.last_times = EngineTimes([50.25, 51.0], Usage(50.0))
    assert prefill.measure(engine, now=clock)["ttft_s"] == pytest.approx(0.08)


def test_peak_memory_of_an_engine_elsewhere_is_its_own_report_or_left_out(clock):
    fake = FakeEngine(clock)
    engine = TimedEngine("far", None, "fake", adapter=fake,
                         profile=Profile(encode=lambda t: [ord(c) for c in t], end_tokens=[END]))
    decode = Workload("d", "decode", prompt_tokens=8, new_tokens=2)
    assert "peak_memory_mb" not in decode.measure(engine, now=clock)
    fake.last_times = EngineTimes([1.0, 1.1, 1.2], Usage(0.5, peak_memory_bytes=123_000_000))
    assert decode.measure(engine, now=clock)["peak_memory_mb"] == pytest.approx(123.0)


def test_speculative_speedup_is_drafted_over_plain_in_the_same_trial(clock):
    engine, fake = timed_fake(clock)
    workload = Workload("s", "speculative", prompt_tokens=8, new_tokens=20, num_draft_tokens=3)
    result = workload.measure(engine, now=clock)
    assert fake.requests[0].draft is None
    assert fake.requests[1].draft.num_draft_tokens == 3
    assert fake.requests[1].draft.model == "self"  # "fake" has no draft model of its own
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
