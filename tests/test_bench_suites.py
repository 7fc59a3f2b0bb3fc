"""The pytest-benchmark suites in benchmarks/: they run, and their JSON ingests.

The suites are run for real, in a subprocess, on the synthetic engine (seconds,
not minutes); the default ``pytest`` must not collect them.
"""

import subprocess
import sys
from pathlib import Path

from child_process import child_env

from benchmarks import cli as cli_bench
from benchmarks import fingerprint
from benchmarks.history import History

REPO = Path(__file__).resolve().parents[1]


def test_suites_run_on_any_engine_and_their_json_ingests_as_a_comparable_run(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider",
         "--bench-engines", "synthetic", "--bench-rounds", "2", f"--benchmark-json={out}"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "11 passed" in done.stdout

    db = tmp_path / "history.sqlite"
    assert cli_bench.main(["ingest", str(out), "--db", str(db)]) == 0
    with History(db) as store:
        (run,) = store.runs()
        samples = store.samples()
    # Our conftest put our own fingerprint into machine_info: same hardware key as a
    # ``lmconform bench`` run on this machine, so the two can be compared.
    assert run.fingerprint.machine_key == fingerprint.collect().machine_key
    workloads = {s.workload for s in samples}
    assert {"test_prefill[prompt_len=32]", "test_prefill[prompt_len=512]", "test_decode",
            "test_batch_throughput[batch_size=16]", "test_speculative_speedup",
            "test_time_to_first_token", "test_peak_memory"} <= workloads
    decode = [s for s in samples if s.workload == "test_decode"]
    assert {s.engine for s in decode} == {"synthetic"}
    assert len([s for s in decode if s.metric == "decode_tps"]) == 2  # one per round
    assert len([s for s in decode if s.metric == "time_s"]) == 2


def test_default_pytest_run_does_not_collect_the_benchmark_suites():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert "tests/test_bench_suites.py" in done.stdout  # it did collect the project's tests
    assert "benchmarks/" not in done.stdout
