"""The measurement design of the runner (benchmarks/runner.py): blocks in a seeded random
order, warm-up until stable, CPU beside wall time, disturbed blocks measured again,
``trials="auto"`` until the intervals are narrow.

The engine and workload here are scripted (each measurement returns the next value of
a list) so the scheduling itself is what is tested; the machine's counters are the
real ``/proc/stat`` except where a test scripts a disturbance.
"""

import random
import time

import pytest

from benchmarks import runner
from benchmarks.history import History


class Scripted:
    """An engine whose every measurement returns the next of ``values`` (then the last)."""

    def __init__(self, name: str, values, log: list, seconds: float = 0.0):
        self.name, self.values, self.log, self.seconds = name, list(values), log, seconds

    def load(self): ...
    def close(self): ...
    def unsupported(self, kind): return None
    def versions(self): return {self.name: "scripted"}
    def settings(self): return {}

    def next_value(self) -> float:
        self.log.append(self.name)
        if self.seconds:
            time.sleep(self.seconds)
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


class ScriptedWorkload:
    name, kind = "decode-scripted", "decode"

    def settings(self):
        return {}

    def measure(self, engine):
        return {"decode_tps": engine.next_value()}


def plan(engines, **options) -> runner.RunPlan:
    return runner.RunPlan(engines, "m", [ScriptedWorkload()], measure_bandwidth=False,
                          **{"warmup": 0, **options})


def execute(tmp_path, the_plan):
    with History(tmp_path / "h.sqlite") as store:
        outcome = runner.run(the_plan, store, lambda message: None)
        return store.run(outcome.run_id), store.samples([outcome.run_id])


def test_blocks_run_in_the_seeded_random_order_and_the_order_is_recorded(tmp_path):
    log = []
    engines = [Scripted(name, [1.0], log) for name in "ABC"]
    run, samples = execute(tmp_path, plan(engines, trials=8, order_seed=7))
    rng, names = random.Random(7), [e.name for e in engines]
    expected = [name for _ in range(8) for name in [e.name for e in rng.sample(engines, 3)]]
    assert log == expected and log != names * 8  # shuffled, exactly as the seed says
    assert run.settings["order_seed"] == 7
    decode = [s for s in samples if s.metric == "decode_tps"]
    positions = {(s.trial, s.settings["trial"]["position"]): s.engine for s in decode}
    assert [positions[(1, p)] for p in range(3)] == log[:3]
    assert sorted(names) == sorted(log[3:6])  # every block has each engine once


def test_without_a_seed_blocks_keep_the_given_order(tmp_path):
    log = []
    execute(tmp_path, plan([Scripted("A", [1.0], log), Scripted("B", [1.0], log)], trials=3))
    assert log == ["A", "B"] * 3


def test_warm_up_goes_on_until_the_first_metric_stops_moving(tmp_path):
    log = []
    # 100 -> 50 -> 30 -> 29.5: the change falls under 3% at the fourth round.
    engine = Scripted("A", [100.0, 50.0, 30.0, 29.5, 29.4, 29.3], log)
    _, samples = execute(tmp_path, plan([engine], trials=2, warmup=1, max_warmup=10))
    assert [s.value for s in samples if s.metric == "decode_tps"] == [29.4, 29.3]
    assert len(log) == 6  # four warm-up rounds, two trials


def test_cpu_time_and_wall_time_are_stored_beside_the_metric(tmp_path):
    engine = Scripted("A", [1.0], [], seconds=0.05)
    _, samples = execute(tmp_path, plan([engine], trials=2))
    wall = [s.value for s in samples if s.metric == "wall_s"]
    cpu = [s.value for s in samples if s.metric == "cpu_s"]
    assert len(wall) == len(cpu) == 2
    assert all(w >= 0.05 for w in wall) and all(c < 0.04 for c in cpu)  # asleep, not busy
    facts = samples[0].settings["trial"]
    assert facts["wall_s"] == wall[0] and facts["repeats"] == 0 and facts["disturbed"] is None


def test_the_machines_counters_describe_a_busy_trial():
    before, wall, cpu = runner.CpuCounters.read(), time.perf_counter(), time.process_time()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    facts = runner.trial_facts(wall, cpu, before, runner.CpuCounters.read())
    assert cpu <= wall * 1.05 and 0 <= facts["steal"] <= 1
    assert 0 <= facts["foreign_cores"] <= __import__("os").cpu_count()


def scripted_counters(foreign: list[float], wall: float = 0.3):
    """Counters that show ``foreign[k]`` cores of other processes busy in trial k."""
    state = {"busy": 0.0, "total": 0.0, "reads": 0}

    def read():
        trial = state["reads"] // 2
        if state["reads"] % 2:  # the read after a trial: add what happened during it
            state["busy"] += foreign[min(trial, len(foreign) - 1)] * wall
            state["total"] += 2 * wall
        state["reads"] += 1
        return runner.CpuCounters(state["busy"], 0.0, state["total"])

    return read


def test_a_block_disturbed_by_a_load_change_is_measured_again(tmp_path, monkeypatch):
    # Trials 1-3 see 0.2 cores of other load; the 4th read pair sees 1.8: disturbed.
    monkeypatch.setattr(runner, "read_counters", scripted_counters([0.2, 0.2, 0.2, 1.8, 0.2]))
    log, messages = [], []
    engine = Scripted("A", [1.0, 2.0, 3.0, 99.0, 4.0], log, seconds=0.25)
    with History(tmp_path / "h.sqlite") as store:
        outcome = runner.run(plan([engine], trials=4), store, messages.append)
        samples = store.samples([outcome.run_id])
    values = [s.value for s in samples if s.metric == "decode_tps"]
    assert values == [1.0, 2.0, 3.0, 4.0]  # the disturbed 99.0 was measured again
    assert any("block 4 disturbed" in m and "other processes' load" in m for m in messages)
    last = [s for s in samples if s.metric == "decode_tps"][-1].settings["trial"]
    assert last["repeats"] == 1 and last["disturbed"] is None


def test_stolen_cpu_time_is_a_disturbance_and_short_trials_are_not_judged():
    tracker, the_plan = runner.LoadTracker(), plan([Scripted("A", [1.0], [])])
    stolen = {"wall_s": 0.5, "cpu_s": 0.5, "steal": 0.3, "foreign_cores": 0.1}
    assert "30% of CPU time stolen" in tracker.disturbance(stolen, the_plan)
    assert tracker.disturbance({**stolen, "wall_s": 0.01}, the_plan) is None


def test_auto_trials_stop_once_the_paired_interval_is_narrow(tmp_path):
    steady = [100.0 + 0.01 * (i % 3) for i in range(300)]
    engines = [Scripted("A", steady, []), Scripted("B", [v * 0.97 for v in steady], [])]
    run, samples = execute(tmp_path, plan(engines, trials="auto", min_trials=6))
    assert run.settings["trials"] == "auto"
    assert max(s.trial for s in samples) == 6  # narrow at once: the minimum


def test_auto_trials_keep_sampling_noise_until_the_cap(tmp_path):
    rng = random.Random(1)
    noisy = [100.0 * (1 + rng.uniform(-0.3, 0.3)) for _ in range(300)]
    engines = [Scripted("A", noisy, []), Scripted("B", noisy[::-1], [])]
    _, samples = execute(tmp_path, plan(engines, trials="auto", max_trials=15))
    assert max(s.trial for s in samples) == 15
    widths = runner.interval_widths({
        "A": {t: v for t, v in enumerate(noisy[:15])}, "B": {t: v for t, v in
                                                             enumerate(noisy[::-1][:15])}})
    assert widths["B"] > 0.02  # still wider than the target: the cap stopped it


def test_auto_trials_and_design_options_are_validated():
    engine = Scripted("A", [1.0], [])
    with pytest.raises(ValueError, match="'auto'"):
        plan([engine], trials="many")
    with pytest.raises(ValueError, match="max_warmup"):
        plan([engine], warmup=3, max_warmup=1)


def test_a_power_comparison_detects_a_large_slowdown_and_is_tabulated(tmp_path):
    from benchmarks import power
    from benchmarks.workloads import Workload

    workload = Workload("decode-8", "decode", prompt_tokens=4, new_tokens=8)
    with History(tmp_path / "h.sqlite") as history:
        slowed = power.one_comparison("synthetic:step_ms=0.5", "synthetic", workload, 0.5,
                                      seed=0, history=history, budget_s=1.0,
                                      target_width=0.05, min_effect=0.02)
    # Each decode step burns 50% more CPU: the trial's CPU time grows by about half.
    assert slowed.judged["cpu_s"].detected
    assert 0.3 < slowed.judged["cpu_s"].change < 0.7 and slowed.blocks >= 6
    quiet = power.Trial(0.0, {name: power.Judged(False, 0.001, -0.01, 0.012)
                              for name in power.METRICS}, 8, 3.0)
    rows = {row[0]: row for row in power.power_table([slowed, quiet]).rows}
    assert rows["50%"][4] == "1/1 (100%)" and rows["0%"][1] == "0/1 (0%)"
    assert rows["0%"][3] == "2.2%"  # the interval's width, 0.012 - (-0.01)
