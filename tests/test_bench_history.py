"""The history (benchmarks/history.py) on both backends, SQLite and PostgreSQL: what is
stored, when it is committed, concurrent writers. The PostgreSQL server is real,
started and stopped by these tests (``postgres_server.py``)."""

import itertools
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from postgres_server import NoPostgres, PostgresServer

from benchmarks import cli as cli_bench
from benchmarks.compare import DifferentMachines, compare_runs
from benchmarks.fingerprint import Fingerprint
from benchmarks.history import SCHEMA_VERSION, History, HistoryError, database_errors
from benchmarks.revision import Revision

MACHINE = Fingerprint(
    cpu_model="Test CPU", cores=4, memory_gb=16.0, os="Linux 6", mlx_device="Device(cpu, 0)",
    python="3.11.7", mlx_version="0.32.4", engine_versions={"reference": "0.1.0"},
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def postgres():
    try:
        server = PostgresServer.start()
    except NoPostgres as error:
        pytest.fail(f"the PostgreSQL history cannot be tested: {error}")
    yield server
    server.stop()


_schemas = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path):
    """Where a fresh, empty history lives: a SQLite file, or a schema of its own in
    the test server."""
    if request.param == "sqlite":
        return tmp_path / "h.sqlite"
    return request.getfixturevalue("postgres").fresh_schema(f"t{next(_schemas)}")


def start(store: History, commit: str | None = "a" * 40, dirty: bool = False,
          machine: Fingerprint = MACHINE) -> int:
    return store.start_run(Revision(commit, dirty), machine, settings={"trials": 3})


def test_sqlite_runs_in_wal_mode_with_a_schema_version(tmp_path):
    with History(tmp_path / "h.sqlite") as store:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_postgres_stores_the_same_tables_with_a_schema_version(postgres):
    url = postgres.fresh_schema("layout")
    with History(url) as store:
        assert store.backend.tables() == {"runs", "samples", "lmconform_schema"}
        assert store.backend.version() == SCHEMA_VERSION
        # Values are double precision, not PostgreSQL's 4-byte REAL.
        run_id = start(store)
        store.add_trial(run_id, 1, "e", "m", "w", {"decode_tps": 1 / 3}, {})
        assert store.samples()[0].value == 1 / 3


def test_each_trial_is_visible_to_another_connection_as_soon_as_it_is_added(target):
    writer = History(target)
    run_id = start(writer)
    writer.add_trial(run_id, 1, "reference", "dummy", "decode-64", {"decode_tps": 10.0},
                     {"workload": {"new_tokens": 64}})
    # The writer is still open and the run unfinished: a reader sees the committed trial.
    with History(target, read_only=True) as reader:
        (sample,) = reader.samples()
        assert reader.runs()[0].interrupted
    assert (sample.engine, sample.workload, sample.metric, sample.value, sample.unit) == (
        "reference", "decode-64", "decode_tps", 10.0, "tok/s")
    writer.close()


def test_samples_round_trip_with_run_metadata(target):
    with History(target) as store:
        run_id = start(store, commit="b" * 40, dirty=True)
        for trial, value in enumerate([5.0, 6.0, 7.0], 1):
            store.add_trial(run_id, trial, "mlx-lm", "dummy", "prefill-32",
                            {"prefill_tps": value, "ttft_s": 32 / value}, {"k": trial})
        store.finish_run(run_id)
        (run,) = store.runs()
        assert run.revision == Revision("b" * 40, True)
        assert run.fingerprint == MACHINE
        assert run.settings == {"trials": 3}
        assert not run.interrupted
        samples = store.samples([run_id])
        assert store.samples([]) == []
    assert [s.value for s in samples if s.metric == "prefill_tps"] == [5.0, 6.0, 7.0]
    assert [s.trial for s in samples if s.metric == "ttft_s"] == [1, 2, 3]
    assert samples[0].key == ("prefill-32", "mlx-lm", "dummy", "prefill_tps")
    assert samples[-1].settings == {"k": 3}


def test_the_joined_view_has_commit_and_fingerprint_per_sample(target):
    with History(target) as store:
        run_id = start(store, commit="c" * 40)
        store.add_trial(run_id, 1, "e", "m", "w", {"decode_tps": 1.0}, {})
        row = store.db.execute("SELECT commit_sha, dirty, machine_key FROM sample_rows").fetchone()
    assert tuple(row) == ("c" * 40, 0, MACHINE.machine_key)


def test_a_run_never_finished_reads_as_interrupted(target):
    with History(target) as store:
        start(store)
        assert store.runs()[0].interrupted


def test_resolve_by_id_latest_previous_and_commit_prefix(target):
    with History(target) as store:
        first = start(store, commit="1234abcd" + "0" * 32)
        second = start(store, commit="99ff" + "0" * 36)
        third = start(store, commit="1234abcd" + "0" * 32)  # the same commit, re-run
        assert store.resolve("latest").id == third
        assert store.resolve("previous").id == second
        assert store.resolve(str(first)).id == first
        assert store.resolve("99ff").id == second
        assert store.resolve("1234ab").id == third  # a commit names its latest run
        with pytest.raises(LookupError, match="neither a run id nor a commit"):
            store.resolve("deadbeef")
        with pytest.raises(LookupError, match="no run 42"):
            store.resolve("42")


def test_resolve_on_an_empty_history_says_so(target):
    with History(target) as store, pytest.raises(LookupError, match="no runs"):
        store.resolve("latest")


def test_a_database_from_a_newer_lmconform_is_refused(target):
    with History(target) as store, store.backend.transaction():
        store.backend.set_version(SCHEMA_VERSION + 1)
    with pytest.raises(HistoryError, match="newer than this lmconform"):
        History(target)
    with pytest.raises(HistoryError, match="newer than this lmconform"):
        History(target, read_only=True)


def test_a_reader_can_neither_create_nor_change_a_history(target):
    with pytest.raises(HistoryError):  # nothing there yet: a reader does not create it
        History(target, read_only=True)
    History(target).close()
    with History(target, read_only=True) as reader, pytest.raises(
            database_errors(), match="read.?only"):
        start(reader)


def test_runs_of_two_machines_in_one_history_are_kept_apart_in_compare(target):
    other = replace(MACHINE, cpu_model="Other CPU", cores=64)
    with History(target) as store:
        for machine in (MACHINE, other):
            run_id = start(store, machine=machine)
            store.add_trial(run_id, 1, "e", "m", "w", {"decode_tps": 1.0}, {})
        base, head = store.runs()
        assert base.fingerprint.machine_key != head.fingerprint.machine_key
        with pytest.raises(DifferentMachines, match="different machines"):
            compare_runs(store, base, head)


WRITER = textwrap.dedent("""
    import sys
    from benchmarks.fingerprint import Fingerprint
    from benchmarks.history import History
    from benchmarks.revision import Revision
    target, writer, trials = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    machine = Fingerprint("CPU", 2, 1.0, "Linux", "cpu", "3.11", "0", {})
    with History(target) as store:
        run_id = store.start_run(Revision(None, False), machine, {"writer": writer})
        for trial in range(1, trials + 1):
            store.add_trial(run_id, trial, f"engine{writer}", "m", "w",
                            {"decode_tps": writer * 1000 + trial, "cpu_s": 0.5}, {})
        store.finish_run(run_id)
""")


def test_concurrent_writer_processes_lose_no_sample(target):
    """Four processes write one history at once, each committing trial by trial."""
    writers, trials = 4, 30
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(w),
                                   str(trials)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
                 for w in range(1, writers + 1)]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * writers, errors
    with History(target, read_only=True) as store:
        runs, samples = store.runs(), store.samples()
    assert sorted(run.settings["writer"] for run in runs) == list(range(1, writers + 1))
    assert not any(run.interrupted for run in runs)
    assert len(samples) == writers * trials * 2
    for run in runs:
        writer = run.settings["writer"]
        values = [s.value for s in samples if s.run_id == run.id and s.metric == "decode_tps"]
        assert values == [writer * 1000 + t for t in range(1, trials + 1)]


def test_bench_run_and_show_on_a_postgres_history(postgres, capsys):
    url = postgres.fresh_schema("cli")
    assert cli_bench.main(["--engines", "synthetic:step_ms=0.5:prefill_us=2", "--model",
                           "synthetic", "--workloads", "decode-16", "--trials", "3",
                           "--warmup", "0", "--no-bandwidth", "--db", url]) == 0
    capsys.readouterr()
    assert cli_bench.main(["show", "--format", "json", "--db", url]) == 0
    assert '"decode_tps"' in capsys.readouterr().out
    with History(url, read_only=True) as store:
        assert len([s for s in store.samples() if s.metric == "decode_tps"]) == 3


def test_an_unreachable_postgres_server_is_a_one_line_usage_error(capsys):
    url = "postgresql://nobody:secret@127.0.0.1:1/none"
    assert cli_bench.main(["show", "--db", url]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to the history postgresql://nobody:***@127.0.0.1:1/none" in err
    assert "secret" not in err and len(err.strip().splitlines()) == 1
