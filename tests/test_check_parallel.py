"""``lmconform check -j N``: worker processes give a serial run's verdicts and reports.

The runs compared are real: the reference and a mutant engine (end tokens ignored,
so it fails the three end-token cases) on ``dummy``, over four case groups, once in this
process and once in two workers. Everything but timings and the date must match.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conformance.catalogue import load_cases
from conformance.cli.check import Progress
from lmconform.cli import main

ENGINES = ["--engine", "reference", "--engine", "mutants:EosIgnored"]
CASES = ["--model", "dummy", "--cases", "greedy,stopping,logit_bias,resumption"]
FAULTY = f"{shlex.quote(sys.executable)} -m conformance.examples.faulty_engines"


def check(argv, capsys):
    try:
        status = main(["check", *argv])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def reports(folder: Path) -> list[str]:
    return ["--json", str(folder / "r.json"), "--markdown", str(folder / "r.md"),
            "--junit", str(folder / "r.xml")]


def without_timings(folder: Path) -> dict:
    """The three reports with every clock reading blanked."""
    data = json.loads((folder / "r.json").read_text())
    for key in ("date", "time per engine and model", "total time"):
        assert key in data["meta"]
        data["meta"][key] = "-"
    for result in data["results"]:
        result["duration_s"] = 0.0
    markdown = re.sub(r"- \*\*(date|time per engine and model|total time)\*\*: .*", r"\1",
                      (folder / "r.md").read_text())
    junit = re.sub(r'time="[^"]*"', 'time="-"', (folder / "r.xml").read_text())
    return {"json": data, "markdown": markdown, "junit": junit}


def lmconform_check(argv) -> subprocess.CompletedProcess:
    """``lmconform check`` in a fresh interpreter, as a user runs it (and as the workers
    start: the reference picks its matmul library by what was imported first)."""
    tests = str(Path(__file__).parent)  # where ``mutants`` lives
    env = os.environ | {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lmconform.cli", "check", *argv],
                          check=False, env=env, capture_output=True, text=True, timeout=600)


def test_two_workers_give_the_serial_verdicts_and_reports(tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    serial.mkdir(), parallel.mkdir()
    one = lmconform_check([*ENGINES, *CASES, *reports(serial)])
    two = lmconform_check([*ENGINES, *CASES, *reports(parallel), "-j", "2"])
    assert one.returncode == two.returncode == 1, two.stderr  # the mutant fails: a finding
    assert one.stdout == two.stdout  # the matrix and every diagnostic
    assert without_timings(serial) == without_timings(parallel)
    verdicts = {(r["engine"], r["case_id"]): r["verdict"]
                for r in json.loads((parallel / "r.json").read_text())["results"]}
    assert len(verdicts) == 2 * 13  # greedy, stopping, logit_bias, resumption on dummy
    assert {k for k, v in verdicts.items() if v == "fail"} == {  # the end-token cases
        ("mutant-eos", "stopping/stop_token"),
        ("mutant-eos", "stopping/second_eos"),
        ("mutant-eos", "stopping/end_token_at_last_step"),
    }
    # Progress: each case's line once, with its place in the serial run's column.
    def lines(err):
        return sorted(re.findall(r"^\[.*\] \S+ (?:pass|FAIL|near-tie)", err, re.MULTILINE))
    assert lines(one.stderr) == lines(two.stderr) and len(lines(two.stderr)) == 26
    assert "[mutant-eos @ dummy 13/13] logit_bias/redirect pass" in two.stderr


def test_cases_running_side_by_side_each_have_a_heartbeat_once_they_run_long():
    stream = io.StringIO()
    progress = Progress(stream, heartbeat_s=0.2)
    hello, fox = (c for c in load_cases() if c.id in ("greedy/hello", "greedy/fox"))
    time.sleep(0.3)  # stderr quiet before the cases start: no heartbeat for them yet
    progress("a", "dummy", 0, 1, hello, None)
    progress("b", "dummy", 0, 1, fox, None)
    time.sleep(0.1)
    assert "still running" not in stream.getvalue()
    time.sleep(0.4)
    progress.finish()
    beats = stream.getvalue().splitlines()
    assert "[a @ dummy 1/1] greedy/hello still running (0 s)" in beats
    assert "[b @ dummy 1/1] greedy/fox still running (0 s)" in beats
    assert set(beats) <= {
        f"[{e} @ dummy 1/1] {c} still running ({s} s)"
        for e, c in (("a", "greedy/hello"), ("b", "greedy/fox")) for s in (0, 1)
    }


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "1000000"])
def test_jobs_must_be_a_whole_number_of_at_least_one(value, capsys, tmp_path):
    status, _, err = check([*CASES, "-j", value, "--json", str(tmp_path / "r.json")], capsys)
    assert status == 2
    assert "argument -j/--jobs: expected processes, a whole number in [1, " in err
    assert f"got '{value}'" in err
    assert not (tmp_path / "r.json").exists()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _gone(pid: int, within_s: float = 10.0) -> bool:
    """Whether ``pid`` has exited (or does within ``within_s``: multiprocessing's resource
    tracker leaves when it sees the suite's end of its pipe close)."""
    end = time.monotonic() + within_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # exited, not yet reaped by whoever adopted it
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.1)


def test_sigterm_stops_the_workers_and_their_engines_and_keeps_the_reports(tmp_path):
    pid_file, report = tmp_path / "pids", tmp_path / "r.json"
    command = [
        sys.executable, "-m", "lmconform.cli", "check", "-j", "2",
        "--engine", "reference", "--engine", f"cmd:{FAULTY} sleep-forever",
        "--model", "dummy", "--against", "snapshots",
        "--cases", "greedy/hello,stopping/stop_token", "--json", str(report),
    ]
    env = os.environ | {"LMCONFORM_FAULTY_PID_FILE": str(pid_file)}
    suite = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        end = time.monotonic() + 120
        while len(pid_file.read_text().split() if pid_file.exists() else []) < 2:
            assert time.monotonic() < end and suite.poll() is None, "no engine started"
            time.sleep(0.1)
        time.sleep(3)  # each worker's engine loads its model, then sleeps on its request
        children = _children(suite.pid)  # the two workers (and multiprocessing's helper)
        engines = [int(p) for p in pid_file.read_text().split()]
        suite.send_signal(signal.SIGTERM)
        _, err = suite.communicate(timeout=60)
    finally:
        suite.kill()
    assert suite.returncode == 143 and "stopped by SIGTERM" in err
    data = json.loads(report.read_text())
    assert "stopped early" in data["meta"]["stopped"]
    finished = {(r["engine"], r["case_id"]) for r in data["results"]}
    assert ("reference", "greedy/hello") in finished  # the reference ran before the sleeper
    assert len(children) >= 2 and all(_gone(pid) for pid in children)
    for engine in engines:
        with pytest.raises(ProcessLookupError):
            os.killpg(engine, 0)
