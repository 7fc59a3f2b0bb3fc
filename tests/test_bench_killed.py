"""Killing ``lmconform bench`` mid-run keeps every finished trial, readable by ``compare``.

A real subprocess is killed with SIGKILL (no clean-up handlers run) after it has
reported some finished trials on stderr; the database must then hold at least those
trials, pass SQLite's integrity check, and ``bench compare`` must read the run.
"""

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks import cli as cli_bench
from benchmarks.history import History

REPO = Path(__file__).resolve().parents[1]
ENGINE = "synthetic:step_ms=5:prefill_us=2"


def bench_command(db: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "lmconform.cli", "bench", "--engines", ENGINE,
            "--model", "synthetic", "--workloads", "decode-16", "--trials", str(trials),
            "--warmup", "0", "--no-bandwidth", "--db", str(db)]


def finished_trials_then_kill(command: list[str], wanted: int, timeout: float = 60) -> list[str]:
    """Start ``command``, wait for ``wanted`` finished-trial lines on stderr, SIGKILL it."""
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                               stdout=subprocess.DEVNULL, env={**os.environ,
                                                               "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr],
                     daemon=True).start()
    finished: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(finished) < wanted:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if "] trial " in line:
                finished.append(line)
    except queue.Empty:
        pytest.fail(f"bench reported only {len(finished)} trials in {timeout}s")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    return finished


def test_killed_run_keeps_finished_trials_and_compare_reads_them(tmp_path, capsys):
    db = tmp_path / "history.sqlite"
    # A complete base run, then a run of 1000 trials killed after 5 have finished.
    subprocess.run(bench_command(db, 5), cwd=REPO, check=True, capture_output=True,
                   timeout=120)
    reported = finished_trials_then_kill(bench_command(db, 1000), wanted=5)

    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with History(db) as store:
        killed = store.run(2)
        stored = [s for s in store.samples([2]) if s.metric == "decode_tps"]
    assert killed.interrupted
    stored_trials = {s.trial for s in stored}
    reported_trials = {int(line.split("] trial ")[1].split("/")[0]) for line in reported}
    assert reported_trials <= stored_trials  # every trial reported finished is stored
    assert len(stored_trials) < 1000

    # 0 or 1 (unchanged or, on a machine whose load changed, a verdict): never an error.
    assert cli_bench.main(["compare", "1", "2", "--db", str(db)]) in (0, 1)
    out = capsys.readouterr().out
    assert "head: run 2" in out and "(interrupted)" in out
    assert f"(n={len(stored)})" in out
