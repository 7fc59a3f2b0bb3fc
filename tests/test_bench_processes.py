"""``lmconform bench run --processes N``: blocks measured in N fresh processes in turn."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import cli as cli_bench
from benchmarks.history import History
from benchmarks.instruments import SyntheticEngine
from benchmarks.runner import RunPlan, worker_plan

FAST = "synthetic:step_ms=0.2:prefill_us=2"
FAIL_FILE = "LMCONFORM_TEST_FAIL_FILE"
CLOSE_FILE = "LMCONFORM_TEST_CLOSE_FILE"


class FailsInSecondWorker(SyntheticEngine):
    """The synthetic engine, except that its second load in a process other than the
    test's (its second worker) raises: the parent's check passes, one worker fails."""

    def __init__(self, *args, **kwargs):
        counter = os.environ.get(FAIL_FILE)
        if counter and os.getpid() != int(os.environ["LMCONFORM_TEST_PID"]):
            path = Path(counter)
            loads = int(path.read_text() or 0) + 1 if path.exists() else 1
            path.write_text(str(loads))
            if loads == 2:
                raise RuntimeError("broken in worker 2")
        super().__init__(*args, **kwargs)


class CountsCloses(SyntheticEngine):
    """The synthetic engine, writing the pid of each process that closes it to a file."""

    def close(self):
        with open(os.environ[CLOSE_FILE], "a") as log:
            log.write(f"{os.getpid()}\n")
        super().close()


@pytest.fixture
def db(tmp_path):
    return tmp_path / "history.sqlite"


def bench(*args) -> int:
    return cli_bench.main([str(a) for a in args])


def run(db, engines, *extra, model="synthetic") -> int:
    return bench("run", "--engines", engines, "--model", model, "--workloads", "decode-16",
                 "--warmup", 1, "--max-repeats", 0, "--no-bandwidth", "--db", db, *extra)


def trials(db) -> dict[tuple[str, int], dict]:
    """(engine, trial): the trial's facts, for the decode_tps samples of the latest run."""
    with History(db, read_only=True) as store:
        samples = store.samples([store.resolve("latest").id])
    return {(s.engine, s.trial): s.settings["trial"] for s in samples if s.metric == "decode_tps"}


def test_three_processes_share_six_blocks_numbered_on(db):
    assert run(db, f"{FAST},{FAST}:name=b", "--processes", 3, "--trials", 6) == 0
    found = trials(db)
    assert sorted(found) == [(e, t) for e in ("b", "synthetic") for t in range(1, 7)]
    for engine in ("synthetic", "b"):
        by_process = [found[(engine, t)]["process"] for t in range(1, 7)]
        assert by_process == [1, 1, 2, 2, 3, 3]
    pids = {facts["process"]: facts["pid"] for facts in found.values()}
    assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
    with History(db, read_only=True) as store:
        run_ = store.resolve("latest")
    assert run_.settings["processes"] == 3 and not run_.interrupted


def test_one_process_is_the_in_process_run_as_before(db):
    assert run(db, FAST, "--trials", 3) == 0
    found = trials(db)
    assert sorted(t for _, t in found) == [1, 2, 3]
    assert all("process" not in facts and "pid" not in facts for facts in found.values())
    with History(db, read_only=True) as store:
        assert "processes" not in store.resolve("latest").settings


def test_ab_compare_pairs_blocks_across_processes(db, capsys):
    assert run(db, f"{FAST},{FAST}:name=b", "--processes", 2, "--trials", 4) == 0
    capsys.readouterr()
    assert bench("compare", "--ab", "synthetic,b", "--db", db, "--format", "json") in (0, 1)
    verdicts = json.loads(capsys.readouterr().out)["verdicts"]
    decode = [v for v in verdicts if v["metric"] == "decode_tps"]
    assert decode and all(v["paired"] for v in decode)


def test_a_failing_worker_fails_the_run_and_keeps_the_others(db, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAIL_FILE, str(tmp_path / "loads"))
    monkeypatch.setenv("LMCONFORM_TEST_PID", str(os.getpid()))
    tests = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    engine = "test_bench_processes:FailsInSecondWorker:name=flaky"
    # a module engine takes a built-in model (the synthetic one ignores its weights)
    assert run(db, f"{FAST},{engine}", "--processes", 3, "--trials", 3, model="dummy") == 1
    err = capsys.readouterr().err
    assert "flaky failed on load" in err and "process 2" in err
    found = trials(db)
    assert {t for e, t in found if e == "flaky"} == {1, 3}  # block 2 ran without it
    assert {t for e, t in found if e == "synthetic"} == {1, 2, 3}


@pytest.mark.parametrize("processes", [1, 2])
def test_every_process_closes_its_engine_once(db, tmp_path, monkeypatch, processes):
    closes = tmp_path / "closes"
    monkeypatch.setenv(CLOSE_FILE, str(closes))
    tests = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    engine = "test_bench_processes:CountsCloses:name=counted"
    assert run(db, engine, "--processes", processes, "--trials", 2, model="dummy") == 0
    pids = closes.read_text().split()
    assert pids.count(str(os.getpid())) == 1  # the parent's copy, before or after the workers
    assert len(pids) == processes + (processes > 1)  # and each worker's own


@pytest.mark.parametrize("extra", [("--processes", "0"), ("--processes", "65"),
                                   ("--processes", "nan"),
                                   ("--trials", "2", "--processes", "3")])
def test_bad_process_counts_are_input_errors(db, capsys, extra):
    try:
        code = run(db, FAST, *extra)
    except SystemExit as exit_:  # refused by the parser
        code = exit_.code
    assert code == 2
    # argparse's usage lines may come first; the error itself is one line
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--processes" in errors[0]


def plan_for(**settings) -> RunPlan:
    engines = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    return RunPlan(engines=engines, model="dummy", workloads=[], specs=["a", "b"], **settings)


def test_fixed_trials_are_shared_out_with_the_remainder_first():
    plan = plan_for(trials=7, processes=3, order_seed=10, time_budget_s=90.0)
    parts = [worker_plan(plan, k) for k in (1, 2, 3)]
    assert [p["design"]["trials"] for p in parts] == [3, 2, 2]
    assert [p["design"]["order_seed"] for p in parts] == [11, 12, 13]  # no order repeated
    assert [p["time_budget_s"] for p in parts] == [30.0, 30.0, 30.0]
    assert all("processes" not in p["design"] for p in parts)  # a worker runs in process


@pytest.mark.parametrize(
    ("processes", "min_trials", "max_trials", "expected"),
    [
        (4, 6, 200, (2, 50)),  # min 6/4 rounds up to 2; max 200/4
        (3, 20, 200, (7, 67)),  # both round up, so the workers together do at least the plan's
        (3, 6, 5, (2, 2)),  # an interval needs two blocks
        (4, 6, 3, (1, 1)),  # ...but never more than the worker's maximum
    ],
)
def test_auto_trials_split_min_max_and_budget(processes, min_trials, max_trials, expected):
    plan = plan_for(trials="auto", processes=processes, min_trials=min_trials,
                    max_trials=max_trials, auto_budget_s=60.0)
    for k in range(1, processes + 1):
        design = worker_plan(plan, k)["design"]
        assert (design["min_trials"], design["max_trials"]) == expected
        assert design["trials"] == "auto" and design["auto_budget_s"] == 60.0 / processes
