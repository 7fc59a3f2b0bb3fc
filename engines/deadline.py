"""Per-case time limits for engines running inside this process, and stopping a whole run.

A case that runs past its limit fails with ``CaseTimeout`` (a failure of that
case; the run goes on). The limit is a SIGALRM timer, which fires between
Python operations, so an engine looping in Python is stopped; one stuck inside
a single native call is stopped when that call returns. Where SIGALRM is not
available (Windows, threads other than the main one) no limit is enforced;
engines in other processes get their own timeouts.

Engine code cannot swallow the limit: the timer raises ``_Expired``, a
``BaseException`` that ``except Exception`` does not catch; it fires again every
``REFIRE_S`` seconds until the case's code gives up, and a block that caught it
and went on to return normally still ends in ``CaseTimeout``.

``Interrupted`` is how a run is stopped from outside (SIGINT, SIGTERM): the
command line turns those signals into it, so that an engine raising
``KeyboardInterrupt`` or ``SystemExit`` by itself is told apart from the user
stopping the suite (the former fails a case, the latter ends the run).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

REFIRE_S = 0.5  # after the limit, the timer fires again this often until the case gives up


class CaseTimeout(Exception):
    """A case ran past its limit (or an engine process did not answer in time)."""


class _Expired(BaseException):
    """Raised inside the case's code by the timer: not an ``Exception``, so hard to swallow."""


class Interrupted(BaseException):
    """The run was stopped by a signal; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextmanager
def deadline(seconds: float | None):
    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "SIGALRM")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return
    message = f"the case ran longer than its limit of {seconds:g} s"
    expired = False

    def expire(signum, frame):
        nonlocal expired
        expired = True
        raise _Expired(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, REFIRE_S)
    try:
        yield
    except _Expired:
        raise CaseTimeout(message) from None
    finally:
        _disarm(previous)
    if expired:  # the engine caught the timer's exception and carried on: still a timeout
        raise CaseTimeout(message + " (the engine caught the time-limit exception)")


def _disarm(previous) -> None:
    """Stop the timer, even if it fires once more while being stopped."""
    while True:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            return
        except _Expired:
            continue
