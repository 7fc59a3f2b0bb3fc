"""The benchmark history: every raw sample in a SQLite database.

Why SQLite: it is embedded (no server), one file a CI job can cache, and it keeps
what was committed when a process is killed. Each trial is committed as soon as it
finishes, and the database runs in WAL mode so a reader (``bench compare``) can
open it while a run is still writing.

Two tables:

- ``runs``     one row per ``lmconform bench`` invocation or ingested pytest-benchmark
               file: when, which code (commit, dirty), which machine (fingerprint
               JSON and its hardware key), with what settings. ``finished_at`` stays
               NULL for a run that was interrupted.
- ``samples``  one row per raw measurement: run, trial, engine, model, workload,
               metric, value, unit, settings JSON (workload and engine parameters).

The view ``sample_rows`` joins the two, for anyone who wants plain SQL.

The schema carries a version (SQLite's ``user_version``), checked on every open: a
database from a newer lmconform, a file that is not SQLite, or a SQLite file that is
not a history is refused with a ``HistoryError`` naming the file. Readers
(``show``, ``compare``, ``plot``) open it read-only, so they can neither create nor
change a history (and work on a file they may not write).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from benchmarks.fingerprint import Fingerprint
from benchmarks.revision import Revision
from benchmarks.workloads import metric as metric_info

DEFAULT_DB = Path(".lmconform") / "history.sqlite"
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    commit_sha   TEXT,
    dirty        INTEGER NOT NULL,
    machine_key  TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    source       TEXT NOT NULL,
    settings     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       INTEGER NOT NULL REFERENCES runs(id),
    trial        INTEGER NOT NULL,
    engine       TEXT NOT NULL,
    model        TEXT NOT NULL,
    workload     TEXT NOT NULL,
    metric       TEXT NOT NULL,
    value        REAL NOT NULL,
    unit         TEXT NOT NULL,
    settings     TEXT NOT NULL,
    recorded_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_run ON samples(run_id, engine, model, workload, metric);
CREATE VIEW IF NOT EXISTS sample_rows AS
    SELECT s.*, r.commit_sha, r.dirty, r.machine_key, r.fingerprint, r.started_at
    FROM samples s JOIN runs r ON r.id = s.run_id;
"""


class HistoryError(Exception):
    """The history cannot be used: missing, not a history, corrupt, newer or not writable."""


REQUIRED_TABLES = ("runs", "samples")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Run:
    id: int
    started_at: str
    finished_at: str | None
    revision: Revision
    fingerprint: Fingerprint
    source: str
    settings: dict

    @property
    def interrupted(self) -> bool:
        return self.finished_at is None

    @property
    def label(self) -> str:
        return f"run {self.id} ({self.revision.label})"


@dataclass(frozen=True)
class Sample:
    run_id: int
    trial: int
    engine: str
    model: str
    workload: str
    metric: str
    value: float
    unit: str
    settings: dict

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What a sample measures; samples with equal keys are comparable."""
        return (self.workload, self.engine, self.model, self.metric)


class History:
    """A handle on the history database (created on first use)."""

    def __init__(self, path: str | Path = DEFAULT_DB, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        try:
            self.db = self._connect()
            self._check_schema()
        except sqlite3.DatabaseError as error:
            raise HistoryError(f"{self.path} is not a usable history ({error})") from None

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            if not self.path.is_file():
                raise HistoryError(f"no history at {self.path} (a bench run creates it)")
            try:
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:
                # A WAL database in a folder we may not write has no -shm to share:
                # read it as an immutable file instead (no concurrent writer is seen).
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?immutable=1", uri=True)
            return db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise HistoryError(f"cannot create the history folder {self.path.parent}: "
                               f"{error.strerror}") from None
        # A generous busy timeout: a concurrent reader/writer waits instead of failing.
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against process crashes in WAL mode (only an OS crash
            # can lose the last commits), and much faster than FULL.
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError as error:
            db.close()
            raise HistoryError(f"cannot write to the history {self.path} ({error})") from None
        return db

    def _check_schema(self) -> None:
        """Refuse newer schemas and foreign databases; create the schema when writing."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.path} has schema version {version}, newer than this lmconform "
                f"({SCHEMA_VERSION}); upgrade lmconform to read it"
            )
        tables = {row[0] for row in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and not set(REQUIRED_TABLES) <= tables:
            raise HistoryError(f"{self.path} is a SQLite database but not a benchmark history "
                               f"(tables: {', '.join(sorted(tables))})")
        if self.read_only:
            if not tables:
                raise HistoryError(f"{self.path} is an empty database, not a benchmark history")
            return
        try:
            with self.db:
                self.db.executescript(SCHEMA)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.OperationalError as error:
            raise HistoryError(f"cannot write to the history {self.path} ({error})") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------

    def start_run(
        self,
        revision: Revision,
        fingerprint: Fingerprint,
        settings: dict,
        source: str = "bench",
        started_at: str | None = None,
    ) -> int:
        with self.db:
            cursor = self.db.execute(
                "INSERT INTO runs (started_at, commit_sha, dirty, machine_key, fingerprint,"
                " source, settings) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    started_at or _now(),
                    revision.commit,
                    int(revision.dirty),
                    fingerprint.machine_key,
                    fingerprint.to_json(),
                    source,
                    json.dumps(settings, sort_keys=True),
                ),
            )
        return int(cursor.lastrowid)

    def add_trial(
        self,
        run_id: int,
        trial: int,
        engine: str,
        model: str,
        workload: str,
        values: dict[str, float],
        settings: dict,
    ) -> None:
        """Store one trial's metrics and commit at once (an interrupted run keeps them)."""
        now = _now()
        rows = [
            (run_id, trial, engine, model, workload, name, float(value),
             metric_info(name).unit, json.dumps(settings, sort_keys=True), now)
            for name, value in values.items()
        ]
        with self.db:
            self.db.executemany(
                "INSERT INTO samples (run_id, trial, engine, model, workload, metric, value,"
                " unit, settings, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def finish_run(self, run_id: int) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET finished_at = ? WHERE id = ?", (_now(), run_id))

    # -- reading -------------------------------------------------------------------

    def runs(self) -> list[Run]:
        rows = self.db.execute(
            "SELECT id, started_at, finished_at, commit_sha, dirty, fingerprint, source,"
            " settings FROM runs ORDER BY id"
        ).fetchall()
        return [self._run(row) for row in rows]

    def _run(self, row: tuple) -> Run:
        try:
            return Run(
                id=row[0],
                started_at=row[1],
                finished_at=row[2],
                revision=Revision(commit=row[3], dirty=bool(row[4])),
                fingerprint=Fingerprint.from_json(row[5]),
                source=row[6],
                settings=json.loads(row[7]),
            )
        except (TypeError, ValueError) as error:  # JSON damaged by hand or by a tool
            raise HistoryError(f"run {row[0]} in {self.path} is corrupt "
                               f"(fingerprint or settings: {error})") from None

    def run(self, run_id: int) -> Run:
        for run in self.runs():
            if run.id == run_id:
                return run
        raise LookupError(f"no run {run_id} in {self.path}")

    def samples(self, run_ids: Iterable[int] | None = None) -> list[Sample]:
        query = (
            "SELECT run_id, trial, engine, model, workload, metric, value, unit, settings"
            " FROM samples"
        )
        params: tuple = ()
        if run_ids is not None:
            ids = list(run_ids)
            query += f" WHERE run_id IN ({', '.join('?' * len(ids))})"
            params = tuple(ids)
        rows = self.db.execute(query + " ORDER BY id", params).fetchall()
        try:
            return [Sample(*row[:8], settings=json.loads(row[8])) for row in rows]
        except (TypeError, ValueError) as error:
            raise HistoryError(f"a sample in {self.path} is corrupt (settings: {error})") from None

    def resolve(self, ref: str) -> Run:
        """A run from a reference: a run id, ``latest``, ``previous``, or a commit prefix.

        A commit names its most recent run (re-running a commit supersedes older runs).
        """
        runs = self.runs()
        if not runs:
            raise LookupError(f"the history {self.path} has no runs yet")
        if ref == "latest":
            return runs[-1]
        if ref == "previous":
            if len(runs) < 2:
                raise LookupError(f"the history {self.path} has only one run")
            return runs[-2]
        if ref.isdigit():
            return self.run(int(ref))
        matches = [r for r in runs if r.revision.commit and r.revision.commit.startswith(ref)]
        if not matches:
            raise LookupError(f"{ref!r} is neither a run id nor a commit in {self.path}")
        return matches[-1]
