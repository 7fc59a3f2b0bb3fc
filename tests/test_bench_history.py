"""The SQLite history (benchmarks/history.py): what is stored, when it is committed."""

import sqlite3

import pytest

from benchmarks.fingerprint import Fingerprint
from benchmarks.history import SCHEMA_VERSION, History, HistoryError
from benchmarks.revision import Revision

MACHINE = Fingerprint(
    cpu_model="Test CPU", cores=4, memory_gb=16.0, os="Linux 6", mlx_device="Device(cpu, 0)",
    python="3.11.7", mlx_version="0.32.4", engine_versions={"reference": "0.1.0"},
)


def start(store: History, commit: str | None = "a" * 40, dirty: bool = False) -> int:
    return store.start_run(Revision(commit, dirty), MACHINE, settings={"trials": 3})


def test_database_runs_in_wal_mode_with_a_schema_version(tmp_path):
    with History(tmp_path / "h.sqlite") as store:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_each_trial_is_visible_to_another_connection_as_soon_as_it_is_added(tmp_path):
    path = tmp_path / "h.sqlite"
    writer = History(path)
    run_id = start(writer)
    writer.add_trial(run_id, 1, "reference", "dummy", "decode-64", {"decode_tps": 10.0},
                     {"workload": {"new_tokens": 64}})
    # The writer is still open and the run unfinished: a reader sees the committed trial.
    reader = sqlite3.connect(path)
    rows = reader.execute("SELECT engine, workload, metric, value, unit FROM samples").fetchall()
    assert rows == [("reference", "decode-64", "decode_tps", 10.0, "tok/s")]
    writer.close()
    reader.close()


def test_samples_round_trip_with_run_metadata(tmp_path):
    with History(tmp_path / "h.sqlite") as store:
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
    assert [s.value for s in samples if s.metric == "prefill_tps"] == [5.0, 6.0, 7.0]
    assert [s.trial for s in samples if s.metric == "ttft_s"] == [1, 2, 3]
    assert samples[0].key == ("prefill-32", "mlx-lm", "dummy", "prefill_tps")
    assert samples[-1].settings == {"k": 3}


def test_the_joined_view_has_commit_and_fingerprint_per_sample(tmp_path):
    with History(tmp_path / "h.sqlite") as store:
        run_id = start(store, commit="c" * 40)
        store.add_trial(run_id, 1, "e", "m", "w", {"decode_tps": 1.0}, {})
        row = store.db.execute("SELECT commit_sha, dirty, machine_key FROM sample_rows").fetchone()
    assert row == ("c" * 40, 0, MACHINE.machine_key)


def test_a_run_never_finished_reads_as_interrupted(tmp_path):
    with History(tmp_path / "h.sqlite") as store:
        start(store)
        assert store.runs()[0].interrupted


def test_resolve_by_id_latest_previous_and_commit_prefix(tmp_path):
    with History(tmp_path / "h.sqlite") as store:
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


def test_resolve_on_an_empty_history_says_so(tmp_path):
    with History(tmp_path / "h.sqlite") as store, pytest.raises(LookupError, match="no runs"):
        store.resolve("latest")


def test_a_database_from_a_newer_lmconform_is_refused(tmp_path):
    path = tmp_path / "h.sqlite"
    History(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(HistoryError, match="newer than this lmconform"):
        History(path)
