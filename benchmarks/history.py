"""The benchmark history: every raw sample in a database, SQLite or PostgreSQL.

SQLite is the embedded default: no server, one file a CI job can cache, and it keeps
what was committed when a process is killed. It runs in WAL mode so a reader
(``bench compare``) can open it while a run is still writing. PostgreSQL
(``--db postgresql://user@host/dbname``, needs the ``postgres`` extra: psycopg 3) is
for a team: many CI runners and machines write one history at once. Either way each
trial is committed as soon as it is measured, and every run carries its machine's
fingerprint, so ``compare`` keeps machines apart in a shared history.

Two tables, the same on both backends (one schema text; ``Backend`` fills in the few
words the two dialects spell differently):

- ``runs``     one row per ``lmconform bench`` invocation or ingested pytest-benchmark
               file: when, which code (commit, dirty), which machine (fingerprint
               JSON and its hardware key), with what settings. ``finished_at`` stays
               NULL for a run that was interrupted.
- ``samples``  one row per raw measurement: run, trial, engine, model, workload,
               metric, value, unit, settings JSON (workload and engine parameters).

The view ``sample_rows`` joins the two, for anyone who wants plain SQL.

The schema carries a version (SQLite's ``user_version``; in PostgreSQL the table
``lmconform_schema``), checked on every open: a database from a newer lmconform, a
file that is not SQLite, or a database that is not a history is refused with a
``HistoryError`` naming it. Readers (``show``, ``compare``, ``plot``) open it
read-only, so they can neither create nor change a history (and work on a file they
may not write).
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from benchmarks.fingerprint import Fingerprint
from benchmarks.revision import Revision
from benchmarks.workloads import metric as metric_info

DEFAULT_DB = Path(".lmconform") / "history.sqlite"
SCHEMA_VERSION = 1
POSTGRES_SCHEMES = ("postgresql://", "postgres://")

# Both dialects: ``{key}`` is the auto-numbered primary key, ``{create_view}`` the
# view's create-if-missing. DOUBLE PRECISION is SQLite's REAL and PostgreSQL's float8
# (PostgreSQL's REAL is only float4).
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id           {key},
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
    id           {key},
    run_id       BIGINT NOT NULL REFERENCES runs(id),
    trial        INTEGER NOT NULL,
    engine       TEXT NOT NULL,
    model        TEXT NOT NULL,
    workload     TEXT NOT NULL,
    metric       TEXT NOT NULL,
    value        DOUBLE PRECISION NOT NULL,
    unit         TEXT NOT NULL,
    settings     TEXT NOT NULL,
    recorded_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_run ON samples(run_id, engine, model, workload, metric);
{create_view} sample_rows AS
    SELECT s.*, r.commit_sha, r.dirty, r.machine_key, r.fingerprint, r.started_at
    FROM samples s JOIN runs r ON r.id = s.run_id
"""


class HistoryError(Exception):
    """The history cannot be used: missing, not a history, corrupt, newer or not writable."""


REQUIRED_TABLES = ("runs", "samples")


def is_postgres(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def shown(target: str | Path) -> str:
    """``target`` as messages show it: a URL's password masked."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", str(target))


def database_errors() -> tuple[type[Exception], ...]:
    """The exceptions a database driver raises (psycopg's only once something loaded it)."""
    psycopg = sys.modules.get("psycopg")
    return (sqlite3.DatabaseError,) + ((psycopg.Error,) if psycopg else ())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class SqliteBackend:
    """A history file: WAL mode, a generous busy timeout, ``user_version``."""

    key = "INTEGER PRIMARY KEY AUTOINCREMENT"
    create_view = "CREATE VIEW IF NOT EXISTS"
    # A writer writes the (existing) schema again on open: a file it may not write is
    # refused before a run starts, and the single-file lock costs nobody anything.
    rewrite_schema = True

    def __init__(self, path: str | Path, read_only: bool):
        self.path = Path(path)
        self.db = self._connect(read_only)

    def _connect(self, read_only: bool) -> sqlite3.Connection:
        if read_only:
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

    def sql(self, query: str) -> str:
        return query

    def transaction(self):
        return self.db

    def lock_schema(self) -> None:
        """SQLite locks the whole file for a writing transaction already."""

    def tables(self) -> set[str]:
        return {row[0] for row in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")} - {"sqlite_sequence"}

    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def set_version(self, version: int) -> None:
        self.db.execute(f"PRAGMA user_version={int(version)}")


class PostgresBackend:
    """A history in a PostgreSQL database (psycopg 3), shared by many writers.

    The connection is in autocommit mode with explicit transactions for writes, so a
    long-lived reader holds no snapshot open; a reader's session is read-only.
    """

    key = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    create_view = "CREATE OR REPLACE VIEW"
    # A writer of a current schema leaves it alone: DDL would lock the tables that
    # other machines are writing, and needs rights a CI runner's role may lack.
    rewrite_schema = False
    # Any fixed number: writers creating the schema at once take turns on it.
    SCHEMA_LOCK = 7_020_613

    def __init__(self, url: str, read_only: bool):
        self.path = shown(url)  # as messages show it
        try:
            import psycopg
        except ImportError:
            raise HistoryError(f"{self.path} needs psycopg 3: pip install "
                               "'lmconform[postgres]'") from None
        try:
            self.db = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else error
            raise HistoryError(f"cannot connect to the history {self.path} "
                               f"({first_line})") from None
        if read_only:
            self.db.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")

    def sql(self, query: str) -> str:
        return query.replace("?", "%s")

    def transaction(self):
        return self.db.transaction()

    def lock_schema(self) -> None:
        self.db.execute("SELECT pg_advisory_xact_lock(%s)", (self.SCHEMA_LOCK,))

    def tables(self) -> set[str]:
        return {row[0] for row in self.db.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'")}

    def version(self) -> int:
        if "lmconform_schema" not in self.tables():
            return 0
        return self.db.execute("SELECT max(version) FROM lmconform_schema").fetchone()[0] or 0

    def set_version(self, version: int) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS lmconform_schema (version INTEGER NOT NULL)")
        self.db.execute("DELETE FROM lmconform_schema")
        self.db.execute("INSERT INTO lmconform_schema (version) VALUES (%s)", (version,))


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
    """A handle on the history (created on first use): a SQLite file path, or a
    ``postgresql://`` URL."""

    def __init__(self, target: str | Path = DEFAULT_DB, read_only: bool = False):
        self.read_only = read_only
        try:
            if is_postgres(target):
                self.backend: SqliteBackend | PostgresBackend = PostgresBackend(
                    str(target), read_only)
            else:
                self.backend = SqliteBackend(target, read_only)
            self.path = self.backend.path
            self.db = self.backend.db
            self._check_schema()
        except database_errors() as error:
            raise HistoryError(f"{shown(target)} is not a usable history ({error})") from None

    def _execute(self, query: str, params: tuple = ()) -> Any:
        return self.db.execute(self.backend.sql(query), params)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self.backend.transaction():
            yield

    def _check_schema(self) -> None:
        """Refuse newer schemas and foreign databases; create the schema when writing."""
        version = self.backend.version()
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.path} has schema version {version}, newer than this lmconform "
                f"({SCHEMA_VERSION}); upgrade lmconform to read it"
            )
        tables = self.backend.tables()
        if tables and not set(REQUIRED_TABLES) <= tables:
            raise HistoryError(f"{self.path} is a database but not a benchmark history "
                               f"(tables: {', '.join(sorted(tables))})")
        if self.read_only and not tables:
            raise HistoryError(f"{self.path} is an empty database, not a benchmark history")
        if self.read_only or (version == SCHEMA_VERSION and not self.backend.rewrite_schema):
            return
        schema = SCHEMA.format(key=self.backend.key, create_view=self.backend.create_view)
        try:
            with self._transaction():
                self.backend.lock_schema()
                for statement in schema.split(";"):
                    self.db.execute(statement.strip())
                self.backend.set_version(SCHEMA_VERSION)
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
        with self._transaction():
            row = self._execute(
                "INSERT INTO runs (started_at, commit_sha, dirty, machine_key, fingerprint,"
                " source, settings) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    started_at or _now(),
                    revision.commit,
                    int(revision.dirty),
                    fingerprint.machine_key,
                    fingerprint.to_json(),
                    source,
                    json.dumps(settings, sort_keys=True),
                ),
            ).fetchall()[0]  # fetched whole: SQLite commits only a finished statement
        return int(row[0])

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
        with self._transaction():
            self.db.cursor().executemany(self.backend.sql(
                "INSERT INTO samples (run_id, trial, engine, model, workload, metric, value,"
                " unit, settings, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                rows,
            )

    def finish_run(self, run_id: int) -> None:
        with self._transaction():
            self._execute("UPDATE runs SET finished_at = ? WHERE id = ?", (_now(), run_id))

    # -- reading -------------------------------------------------------------------

    def runs(self) -> list[Run]:
        rows = self._execute(
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
            if not ids:
                return []
            query += f" WHERE run_id IN ({', '.join('?' * len(ids))})"
            params = tuple(ids)
        rows = self._execute(query + " ORDER BY id", params).fetchall()
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
