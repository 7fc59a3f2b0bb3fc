"""The ``suite`` workload: ``lmconform check`` of one engine on one model, timed, stored in
the bench history like every other workload."""

from __future__ import annotations

import pytest

from benchmarks.engines import TimedEngine
from benchmarks.history import History
from benchmarks.runner import RunPlan, run
from benchmarks.workloads import Workload, resolve


def test_suite_is_a_named_workload_over_the_whole_catalogue():
    (suite,) = resolve("suite")
    assert (suite.kind, suite.cases, suite.metrics) == ("suite", "", ("suite_s",))
    with pytest.raises(ValueError, match="sizes must be positive"):
        Workload("prefill-0", "prefill", prompt_tokens=0)


def test_a_suite_trial_times_a_check_run_and_lands_in_the_history(tmp_path):
    workload = Workload("suite-hello", "suite", cases="greedy/hello")
    engine = TimedEngine.from_spec("reference", "dummy")
    history = History(tmp_path / "history.sqlite")
    plan = RunPlan([engine], "dummy", [workload], trials=1, warmup=0, measure_bandwidth=False)
    outcome = run(plan, history)
    assert outcome.errors == {} and outcome.skipped == []
    samples = {(s.trial, s.engine, s.metric): s.value for s in history.samples([outcome.run_id])}
    assert {trial for trial, _, _ in samples} == {1}
    assert {(1, "reference", m) for m in ("suite_s", "wall_s", "cpu_s")} <= set(samples)
    # A check run starts Python, imports MLX and loads the model (never under 0.1 s),
    # within the trial's wall time; in another process, so this one's CPU time is small.
    assert 0.1 < samples[(1, "reference", "suite_s")] <= samples[(1, "reference", "wall_s")]
    assert samples[(1, "reference", "cpu_s")] < samples[(1, "reference", "suite_s")] / 2


def test_a_check_run_that_cannot_start_fails_the_trial_with_its_reason():
    workload = Workload("suite-hello", "suite", cases="greedy/nosuch")
    engine = TimedEngine.from_spec("reference", "dummy")
    with pytest.raises(RuntimeError, match="exited 2: .*matches no case"):
        workload.measure(engine)
