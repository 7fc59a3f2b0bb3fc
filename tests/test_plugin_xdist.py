"""The pytest plugin under pytest-xdist: the serial run's outcomes, each engine and model
on one worker, near-ties still in the controller's summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from child_process import child_env

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ["reference", "mutants:NoisyLogits", "mutants:EosIgnored"]
CASES = "greedy/hello,resumption/near_tie,stopping/stop_token"


def conformance_pytest(tmp_path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``pytest --pyargs conformance`` on ``dummy``; its output and each test's outcome."""
    env = child_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    junit = tmp_path / f"{name}.xml"
    args = [sys.executable, "-m", "pytest", "--pyargs", "conformance", "-p", "no:cacheprovider",
            *[a for engine in ENGINES for a in ("--lmconform-engine", engine)],
            "--lmconform-model", "dummy", "--lmconform-cases", CASES,
            "--junitxml", str(junit), "-v", *extra]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = case.get("name")
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        outcomes[test_id] = "failed" if failed else "skipped" if skipped else "passed"
    return run, outcomes


def test_two_xdist_workers_give_the_serial_outcomes_one_worker_per_engine_and_model(tmp_path):
    serial, serial_outcomes = conformance_pytest(tmp_path, "serial")
    spread, spread_outcomes = conformance_pytest(tmp_path, "spread", "-n", "2")
    assert serial.returncode == spread.returncode == 1, spread.stdout[-3000:] + spread.stderr
    assert spread_outcomes == serial_outcomes
    assert len(serial_outcomes) == 9
    assert {t for t, o in serial_outcomes.items() if o == "failed"} == {
        "test_case[mutants:EosIgnored@dummy:stopping/stop_token]"
    }
    workers = defaultdict(set)  # "[gw1] [ 33%] PASSED test_catalogue.py::test_case[E@M:case]"
    for worker, engine in re.findall(r"^\[(gw\d+)\] .*test_case\[(.+)@dummy:", spread.stdout,
                                     re.MULTILINE):
        workers[engine].add(worker)
    assert sorted(workers) == sorted(ENGINES)
    assert all(len(w) == 1 for w in workers.values()), workers
    for run in (serial, spread):  # the near-tie, found in a worker, listed by the controller
        summary = run.stdout.split("lmconform: 1 near-tie(s) (passed)")[1]
        assert "mutants:NoisyLogits@dummy:resumption/near_tie" in summary and "step 5" in summary
