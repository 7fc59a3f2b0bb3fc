"""Per-case time limits for engines running inside this process.

A case that runs past its limit is interrupted with ``CaseTimeout`` (a
failure of that case; the run goes on). The limit is a SIGALRM timer, which
fires between Python operations, so an engine looping in Python is stopped;
one stuck inside a single native call is stopped when that call returns.
Where SIGALRM is not available (Windows, threads other than the main one)
no limit is enforced; engines in other processes get their own timeouts.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class CaseTimeout(Exception):
    pass


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

    def expire(signum, frame):
        raise CaseTimeout(f"the case ran longer than its limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
