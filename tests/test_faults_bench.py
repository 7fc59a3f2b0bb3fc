"""Bad inputs and faults around the bench history and CLI: each gives its exit code
(0 ok, 1 regression, 2 usage/input error, 3 internal error), a one-line message naming
the problem, and leaves the history's rows exactly as they were."""

import contextlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from benchmarks import cli as cli_bench
from benchmarks import compare
from benchmarks.fingerprint import Fingerprint
from benchmarks.history import SCHEMA_VERSION, History
from benchmarks.revision import Revision

MACHINE = Fingerprint(
    cpu_model="Test CPU", cores=4, memory_gb=16.0, os="Linux 6", mlx_device="Device(cpu, 0)",
    python="3.11.7", mlx_version="0.32.4", engine_versions={},
)
STEADY = [100.0, 101.0, 99.0, 100.5, 99.5, 100.2, 99.8, 100.1]


def add_run(path: Path, engine: str, values=STEADY) -> int:
    with History(path) as store:
        run_id = store.start_run(Revision("a" * 40, False), MACHINE, {})
        for trial, value in enumerate(values, 1):
            store.add_trial(run_id, trial, engine, "dummy", "decode-16",
                            {"decode_tps": value}, {})
        store.finish_run(run_id)
    return run_id


def rows(path: Path) -> tuple[list, list]:
    """Every row of both tables, read with plain sqlite3 (independent of History)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return (db.execute("SELECT * FROM runs ORDER BY id").fetchall(),
                db.execute("SELECT * FROM samples ORDER BY id").fetchall())


def bench(capsys, *args) -> tuple[int, str, str]:
    try:
        status = cli_bench.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse refuses bad option values with status 2
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def history(tmp_path):
    path = tmp_path / "history.sqlite"
    add_run(path, "reference")
    add_run(path, "mlx-lm")
    return path


def test_compare_of_runs_with_no_engine_in_common_is_an_input_error(history, capsys):
    before = rows(history)
    status, out, err = bench(capsys, "compare", 1, 2, "--db", history)
    assert status == 2 and out == ""
    one_line_error(err, "no measurement in common", "base: engines reference",
                   "head: engines mlx-lm")
    assert rows(history) == before


def test_a_missing_history_is_named_and_not_created(tmp_path, capsys):
    path = tmp_path / "nowhere" / "history.sqlite"
    for command in (["show"], ["compare"], ["plot", "--metric", "decode_tps", "--out",
                                           tmp_path / "p.png"], ["show", "--changes"]):
        status, _, err = bench(capsys, *command, "--db", path)
        assert status == 2
        one_line_error(err, f"no history at {path}")
    assert not path.parent.exists()


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path, capsys):
    path = tmp_path / "history.sqlite"
    path.write_bytes(b"this is a text file, not a database\n" * 100)
    before = path.read_bytes()
    for command in (["show"], ["compare"], ["--engines", "synthetic"]):
        status, _, err = bench(capsys, *command, "--db", path)
        assert status == 2
        one_line_error(err, str(path), "not a usable history")
    assert path.read_bytes() == before


def test_a_truncated_history_is_refused_with_one_line(history, tmp_path, capsys):
    broken = tmp_path / "broken.sqlite"
    with contextlib.closing(sqlite3.connect(history)) as db:  # fold the WAL into the file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = history.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    status, _, err = bench(capsys, "compare", 1, 2, "--db", broken)
    assert status == 2
    one_line_error(err, str(broken))
    assert broken.read_bytes() == data[: len(data) // 2]


def test_a_sqlite_database_of_something_else_is_not_taken_for_a_history(tmp_path, capsys):
    path = tmp_path / "other.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE invoices (id INTEGER, amount REAL)")
        db.execute("INSERT INTO invoices VALUES (1, 9.5)")
    for command in (["show"], ["--engines", "synthetic"]):
        status, _, err = bench(capsys, *command, "--db", path)
        assert status == 2
        one_line_error(err, "not a benchmark history", "invoices")
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("invoices",)]
        assert db.execute("SELECT * FROM invoices").fetchall() == [(1, 9.5)]


def test_a_history_from_a_newer_lmconform_is_refused_for_reading_and_writing(history, capsys):
    with contextlib.closing(sqlite3.connect(history)) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    before = rows(history)
    for command in (["show"], ["--engines", "synthetic:step_ms=0.1", "--workloads",
                               "prefill-16", "--trials", "1", "--no-bandwidth"]):
        status, _, err = bench(capsys, *command, "--db", history)
        assert status == 2
        one_line_error(err, f"schema version {SCHEMA_VERSION + 1}", "upgrade lmconform")
    assert rows(history) == before


def test_a_run_with_a_damaged_fingerprint_is_named(history, capsys):
    with contextlib.closing(sqlite3.connect(history)) as db, db:
        db.execute("UPDATE runs SET fingerprint = '{not json' WHERE id = 2")
    before = rows(history)
    status, _, err = bench(capsys, "compare", 1, 2, "--db", history)
    assert status == 2
    one_line_error(err, "run 2", "is corrupt", "fingerprint")
    assert rows(history) == before


@contextlib.contextmanager
def write_protected(path: Path):
    """Make ``path`` unwritable even for root (an immutable file), or by mode otherwise."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o444)
        path.parent.chmod(0o555)
        try:
            yield
        finally:
            path.parent.chmod(0o755)
            path.chmod(0o644)


def test_a_read_only_history_can_be_read_but_a_run_is_refused_before_it_starts(
        history, capsys):
    with contextlib.closing(sqlite3.connect(history)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for suffix in ("-wal", "-shm"):  # a copied or archived history has neither
        Path(f"{history}{suffix}").unlink(missing_ok=True)
    before = rows(history)
    with write_protected(history):
        status, out, _ = bench(capsys, "show", 1, "--db", history)
        assert status == 0 and "decode_tps" in out
        status, _, err = bench(capsys, "--engines", "synthetic", "--workloads", "prefill-16",
                               "--trials", "1", "--no-bandwidth", "--db", history)
        assert status == 2
        one_line_error(err, "cannot write to the history", str(history))
    assert rows(history) == before


def test_readers_never_write_to_the_history(history, tmp_path, capsys):
    add_run(history, "reference", [v * 0.9 for v in STEADY])  # run 3: 10% slower
    with contextlib.closing(sqlite3.connect(history)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before, data = rows(history), history.read_bytes()
    assert bench(capsys, "compare", 1, 3, "--db", history)[0] == 1  # the regression
    assert bench(capsys, "show", "--changes", "--db", history)[0] == 0
    assert bench(capsys, "plot", "--metric", "decode_tps", "--out", tmp_path / "p.png",
                 "--db", history)[0] == 0
    assert history.read_bytes() == data and rows(history) == before


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--alpha", "1.5", "between 0 and 1"),
    ("--alpha", "nan", "between 0 and 1"),
    ("--min-effect", "-0.1", "fraction >= 0"),
    ("--min-effect", "abc", "invalid fraction value"),
])
def test_bad_compare_options_are_usage_errors(history, capsys, option, value, message):
    before = rows(history)
    status, _, err = bench(capsys, "compare", option, value, "--db", history)
    assert status == 2 and message in err and "Traceback" not in err
    assert rows(history) == before


@pytest.mark.parametrize(("value", "message"), [("0", "must be >= 1"),
                                                ("many", "a count or 'auto'")])
def test_bad_trial_counts_are_usage_errors(history, capsys, value, message):
    before = rows(history)
    status, _, err = bench(capsys, "--engines", "synthetic", "--trials", value, "--db", history)
    assert status == 2 and message in err
    assert rows(history) == before


def test_ab_with_an_engine_not_in_the_run_lists_the_engines_there(history, capsys):
    before = rows(history)
    status, _, err = bench(capsys, "compare", "--ab", "reference,mlx-lm", 1, "--db", history)
    assert status == 2
    one_line_error(err, "no trial measured by both 'reference' and 'mlx-lm'",
                   "engines in the run: reference")
    status, _, err = bench(capsys, "compare", "--ab", "reference,mlx-lm", 1, 2, "--db", history)
    assert status == 2
    one_line_error(err, "give one run, not two")
    assert rows(history) == before


def test_unknown_runs_are_named(history, capsys):
    for ref, message in (("42", "no run 42"), ("feedbeef", "neither a run id nor a commit")):
        status, _, err = bench(capsys, "compare", 1, ref, "--db", history)
        assert status == 2
        one_line_error(err, message)


def test_a_history_folder_that_cannot_be_created_is_named(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    status, _, err = bench(capsys, "--engines", "synthetic", "--workloads", "prefill-16",
                           "--db", blocker / "history.sqlite")
    assert status == 2
    one_line_error(err, "cannot create the history folder", str(blocker))


def test_an_internal_error_is_exit_3_with_the_traceback_saved(history, capsys, monkeypatch):
    def broken(*args, **kwargs):  # a bug in lmconform, injected: nothing else raises here
        raise ZeroDivisionError("lmconform bug")

    monkeypatch.setattr(compare, "compare_runs", broken)
    before = rows(history)
    status, _, err = bench(capsys, "compare", 1, 2, "--db", history)
    assert status == 3
    one_line_error(err, "internal error", "traceback saved to")
    saved = Path(err.strip().rsplit(" ", 1)[1])
    assert "ZeroDivisionError: lmconform bug" in saved.read_text()
    saved.unlink()
    assert rows(history) == before
