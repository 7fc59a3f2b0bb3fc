"""A throw-away PostgreSQL server for the history tests, started and stopped by them.

The server is Debian's ``postgresql`` package (``.ci/run`` installs it; ``make install``
installs psycopg). Its binaries live in ``/usr/lib/postgresql/<version>/bin``, or on the
PATH. PostgreSQL refuses to run as root, so under root the data folder is handed to the
``postgres`` user (which the package creates) and the server runs as that user.

A missing server or driver fails the tests that need them with a message saying what
to install: the PostgreSQL backend is part of what the suite claims, so it is never
skipped silently.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

USER = "lmconform"  # the database superuser initdb creates (trust auth, localhost only)
HOW_TO_INSTALL = ("install Debian's PostgreSQL server (apt-get install -y postgresql; "
                  ".ci/run does) and psycopg 3 (make install: the postgres extra)")


class NoPostgres(RuntimeError):
    """A PostgreSQL server cannot be started here; the message says why."""


def server_binaries() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: the newest installed version."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda path: int(Path(path).parent.parent.name))
    if not versions:
        raise NoPostgres(f"no PostgreSQL server binaries (initdb, pg_ctl) found: {HOW_TO_INSTALL}")
    return Path(versions[-1]).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    """A running server on 127.0.0.1 with its data in a temporary folder."""

    data: Path
    port: int
    bin: Path
    run_as: list[str]  # the command prefix that runs a program as the server's user

    @classmethod
    def start(cls) -> PostgresServer:
        try:
            import psycopg  # noqa: F401 - only to say early that the driver is missing
        except ImportError:
            raise NoPostgres(f"psycopg is not installed: {HOW_TO_INSTALL}") from None
        bin_ = server_binaries()
        data = Path(tempfile.mkdtemp(prefix="lmconform-postgres-"))
        run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise NoPostgres(f"running as root and there is no 'postgres' user to run "
                                 f"the server as: {HOW_TO_INSTALL}") from None
            os.chown(data, owner.pw_uid, owner.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        server = cls(data / "cluster", _free_port(), bin_, run_as)
        server._run("initdb", "-D", str(server.data), "-U", USER, "-A", "trust",
                    "-E", "UTF8", "--no-sync")
        # No fsync: the tests check what each commit makes visible, not an OS crash.
        options = (f"-p {server.port} -c listen_addresses=127.0.0.1 "
                   "-c unix_socket_directories='' -c fsync=off -c max_connections=50")
        server._run("pg_ctl", "-D", str(server.data), "-l", str(data / "server.log"),
                    "-o", options, "-w", "-t", "60", "start")
        return server

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self.run_as, str(self.bin / program), *args],
                              check=False, capture_output=True, text=True, timeout=120)
        if done.returncode:
            log = self.data.parent / "server.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise NoPostgres(f"{program} failed ({done.returncode}): {done.stderr.strip()} "
                             f"{tail}")

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def fresh_schema(self, name: str) -> str:
        """A URL whose tables land in a new, empty schema ``name`` (one per test)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as admin:
            admin.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.url}?options=-csearch_path%3D{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.data.parent, ignore_errors=True)
