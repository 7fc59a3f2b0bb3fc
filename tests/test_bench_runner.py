"""The bench runner (benchmarks/runner.py): order of trials, storage, failures, budget."""

import pytest

from benchmarks import runner
from benchmarks.engines import TimedEngine
from benchmarks.history import History
from benchmarks.instruments import SyntheticEngine
from benchmarks.workloads import Workload
from engines import registry

DECODE = Workload("decode-4", "decode", prompt_tokens=4, new_tokens=4)
PREFILL = Workload("prefill-8", "prefill", prompt_tokens=8)
BATCH = Workload("batch-2", "batch", prompt_tokens=4, new_tokens=2, batch_size=2)


class Logging(SyntheticEngine):
    """A fast synthetic engine that logs every generation in a shared list."""

    def __init__(self, tag: str, log: list):
        super().__init__(step_ms=0.05, prefill_us=1.0)
        self.tag, self.log = tag, log

    def generate(self, request):
        self.log.append(self.tag)
        yield from super().generate(request)


class Crashing(Logging):
    def generate(self, request):
        raise RuntimeError("engine crashed")


def recording(name: str, log: list, without: frozenset = frozenset()) -> TimedEngine:
    adapter = Logging(name, log)
    adapter.capabilities = adapter.capabilities - without
    return TimedEngine.around(adapter, name)


def broken(name: str, log: list) -> TimedEngine:
    return TimedEngine.around(Crashing(name, log), name)


class Truncated(SyntheticEngine):
    """Opened through the registry as ``test_bench_runner:Truncated``: its model is bad."""

    def __init__(self, source):
        raise FileNotFoundError("model file is truncated")


def quiet(message):
    pass


def test_engines_are_interleaved_after_warm_up_and_every_trial_is_stored(tmp_path):
    log = []
    plan = runner.RunPlan([recording("A", log), recording("B", log)], "synthetic", [DECODE],
                          trials=3, warmup=1, measure_bandwidth=False)
    with History(tmp_path / "h.sqlite") as store:
        outcome = runner.run(plan, store, quiet)
        samples = store.samples([outcome.run_id])
        run = store.run(outcome.run_id)
    assert log == ["A", "B"] * 4  # one warm-up round, then A B A B A B
    trials = sorted((s.engine, s.trial) for s in samples if s.metric == "decode_tps")
    assert trials == [("A", 1), ("A", 2), ("A", 3), ("B", 1), ("B", 2), ("B", 3)]
    assert not run.interrupted
    assert run.settings["engines"] == ["A", "B"] and run.settings["trials"] == 3
    assert run.fingerprint.engine_versions == {"A": "synthetic", "B": "synthetic"}
    settings = samples[0].settings
    assert settings["workload"]["new_tokens"] == 4
    assert settings["engine"]["weight_bytes_per_token"] == 10_000_000


def test_a_failing_engine_is_reported_and_the_others_carry_on(tmp_path):
    log = []
    plan = runner.RunPlan([broken("bad", log), recording("good", log)], "synthetic",
                          [PREFILL, DECODE], trials=2, warmup=1, measure_bandwidth=False)
    messages = []
    with History(tmp_path / "h.sqlite") as store:
        outcome = runner.run(plan, store, messages.append)
        samples = store.samples([outcome.run_id])
        assert not store.run(outcome.run_id).interrupted
    assert set(outcome.errors) == {("bad", "prefill-8"), ("bad", "decode-4")}
    assert "engine crashed" in outcome.errors[("bad", "decode-4")]
    assert {s.engine for s in samples} == {"good"}
    assert len([s for s in samples if s.metric == "decode_tps"]) == 2
    assert any("bad failed in warm-up 1" in m for m in messages)


def test_unsupported_workloads_are_skipped_not_failed(tmp_path):
    log, messages = [], []
    plan = runner.RunPlan([recording("A", log, without=frozenset({"batch"}))], "synthetic",
                          [BATCH, DECODE], trials=1, warmup=0, measure_bandwidth=False)
    with History(tmp_path / "h.sqlite") as store:
        outcome = runner.run(plan, store, messages.append)
        workloads = {s.workload for s in store.samples([outcome.run_id])}
    assert outcome.skipped == [("A", "batch-2")]
    assert not outcome.errors
    assert workloads == {"decode-4"}
    assert any("A: unsupported, skipped (A lacks the capabilities batch)" in m for m in messages)


def test_the_time_budget_stops_new_trials_and_keeps_the_run_readable(tmp_path):
    plan = runner.RunPlan([recording("A", [])], "synthetic", [DECODE], trials=50, warmup=0,
                          measure_bandwidth=False, time_budget_s=0.0)
    with History(tmp_path / "h.sqlite") as store:
        outcome = runner.run(plan, store, quiet)
        assert outcome.out_of_time
        assert not store.run(outcome.run_id).interrupted
        assert store.samples([outcome.run_id]) == []


def test_bandwidth_is_measured_and_stored_with_the_run(tmp_path):
    plan = runner.RunPlan([recording("A", [])], "synthetic", [PREFILL], trials=1, warmup=0)
    with History(tmp_path / "h.sqlite") as store:
        outcome = runner.run(plan, store, quiet)
        (sample,) = [s for s in store.samples([outcome.run_id]) if s.metric == "bandwidth_gbs"]
    assert sample.engine == "machine" and sample.workload == "memory-bandwidth"
    assert 0.1 < sample.value < 10_000  # GB/s: any real machine


def test_progress_reports_each_stored_trial(tmp_path):
    messages = []
    plan = runner.RunPlan([recording("A", [])], "synthetic", [DECODE], trials=2, warmup=0,
                          measure_bandwidth=False)
    with History(tmp_path / "h.sqlite") as store:
        runner.run(plan, store, messages.append)
    trial_lines = [m for m in messages if "] trial " in m]
    assert len(trial_lines) == 2
    assert trial_lines[1].startswith("[1/1 decode-4] trial 2/2 A: decode_tps=")


def test_plans_are_validated():
    with pytest.raises(ValueError, match="distinct"):
        runner.RunPlan([recording("A", []), recording("A", [])], "m", [DECODE])
    with pytest.raises(ValueError, match="trials"):
        runner.RunPlan([recording("A", [])], "m", [DECODE], trials=0)
    with pytest.raises(ValueError, match="at least one engine"):
        runner.RunPlan([], "m", [DECODE])


def test_an_engine_that_is_not_installed_is_refused_when_its_spec_is_read(monkeypatch):
    """Before any engine loads, so a run never measures half of what was asked for."""
    monkeypatch.setattr(registry, "missing_requirements", lambda engine: ["its_package"])
    with pytest.raises(registry.EngineUnavailable, match=r"pip install 'lmconform\[peers\]'"):
        TimedEngine.from_spec("mlx-lm", "dummy")


def test_engines_that_cannot_load_are_reported_and_left_out(tmp_path):
    messages = []
    truncated = TimedEngine.from_spec("test_bench_runner:Truncated:name=odd", "dummy")
    plan = runner.RunPlan([truncated, recording("A", [])],
                          "synthetic", [DECODE], trials=1, warmup=0, measure_bandwidth=False)
    with History(tmp_path / "h.sqlite") as store:
        outcome = runner.run(plan, store, messages.append)
        assert {s.engine for s in store.samples([outcome.run_id])} == {"A"}
    assert "truncated" in outcome.errors[("odd", "load")]
    assert any(m.startswith("odd failed to load") for m in messages)


def test_a_run_with_no_loadable_engine_is_an_error(tmp_path):
    truncated = TimedEngine.from_spec("test_bench_runner:Truncated:name=odd", "dummy")
    plan = runner.RunPlan([truncated], "m", [DECODE], measure_bandwidth=False)
    with History(tmp_path / "h.sqlite") as store, pytest.raises(RuntimeError, match="no engine"):
        runner.run(plan, store, quiet)
