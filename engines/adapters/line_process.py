"""A child process spoken to in lines, where nothing can block past a deadline.

An external engine may crash, hang, flood its output or stop reading its
input. So nothing here waits without a deadline:

- a thread reads stdout line by line into a queue; the caller takes lines
  with a timeout (a line longer than ``MAX_LINE`` bytes is an error, not
  unbounded memory);
- another thread keeps the last lines of stderr (the "stderr tail" every
  failure report shows);
- writes go to a non-blocking stdin, a chunk at a time, each waiting at most
  until the deadline for the pipe to accept it (an engine that never reads
  cannot block the suite on a full pipe).

Failures are ``EngineCrashed`` (the process is gone), ``EngineHung`` (no
answer before the deadline) and ``ProtocolError`` (a line that cannot be a
message), each carrying the stderr tail.

Engines cannot outlive the suite: each starts in its own process group (what
it starts in turn is killed with it), on Linux with a parent-death signal
(SIGKILL if the suite dies, even by SIGKILL), and ``stop_all`` kills every
group still running (the command line calls it on SIGINT/SIGTERM). A process
that exits is noticed at once, even when a child it left behind keeps its
stdout open. Lines are capped: stdout at ``MAX_LINE`` bytes (an error), stderr
lines at ``MAX_STDERR_LINE`` characters (cut) in the kept tail.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
import weakref

from engines.deadline import CaseTimeout
from engines.protocol import ProtocolError

MAX_LINE = 64 * 1024 * 1024  # bytes; a full-vocabulary logprob event is well under 1 MB
STDERR_LINES = 20
MAX_STDERR_LINE = 2000  # characters of one stderr line kept in the tail
POLL_S = 0.1  # how often a wait for output also checks whether the process is still alive
_EOF = object()
_LIVE: weakref.WeakSet[LineProcess] = weakref.WeakSet()  # every process not yet killed
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _parent_death_signal():
    """A function for the child to run before exec: be killed when the suite dies.

    libc is loaded here, in the parent: between fork and exec the child may only
    make plain system calls (loading a library there could deadlock on a lock
    another thread of the suite held at the fork). None where there is no prctl.
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return die_with_parent


_DIE_WITH_PARENT = _parent_death_signal()


def stop_all() -> int:
    """Kill every engine process group still running; returns how many there were."""
    processes = list(_LIVE)
    for process in processes:
        process.kill()
    return len(processes)


# The two forms of the stderr report appended to a failure's message (``stderr_note``).
NO_STDERR = "; the engine wrote nothing to stderr"
STDERR_TAIL = "; the engine's stderr ends with:\n"


def without_stderr_note(message: str) -> str:
    """``message`` up to the stderr report a JSON-lines engine's failure carries."""
    for note in (NO_STDERR, STDERR_TAIL):
        message = message.split(note)[0]
    return message


class EngineFailure(Exception):
    """The engine process failed, rather than breaking a rule of the protocol."""


class EngineCrashed(EngineFailure):
    """The engine process exited (or closed its output) in the middle of the conversation."""


class EngineHung(CaseTimeout):
    """The engine did not answer (or read) within the time allowed."""


class LineProcess:
    """``argv`` started with pipes on stdin, stdout and stderr."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.argv = argv
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            # Its own process group: killing it also kills what it started (a shell's child).
            start_new_session=os.name == "posix",
            # Only a prctl call, prepared in the parent (see _parent_death_signal).
            preexec_fn=_DIE_WITH_PARENT,  # noqa: PLW1509
        )
        _LIVE.add(self)
        self._lines: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        os.set_blocking(self.process.stdin.fileno(), False)
        self._stdout_reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stdout_reader.start()
        self._stderr_reader.start()

    # -- reading ----------------------------------------------------------------------

    def _read_stdout(self) -> None:
        stream = self.process.stdout
        try:
            while True:
                line = stream.readline(MAX_LINE + 1)
                if not line:
                    break
                if len(line) > MAX_LINE:
                    self._lines.put(ProtocolError(f"a line longer than {MAX_LINE} bytes"))
                    break
                self._lines.put(line)
        except (OSError, ValueError):  # the pipe was closed under us (kill)
            pass
        self._lines.put(_EOF)

    def _read_stderr(self) -> None:
        stream = self.process.stderr
        try:
            while raw := stream.readline(MAX_STDERR_LINE * 4):  # bounded, however long the line
                cut = not raw.endswith(b"\n")
                while cut and (rest := stream.readline(MAX_STDERR_LINE * 4)):
                    cut = not rest.endswith(b"\n")  # the rest of an overlong line: dropped
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if len(line) > MAX_STDERR_LINE or not raw.endswith(b"\n"):
                    line = line[:MAX_STDERR_LINE] + " [cut]"
                self._stderr.append(line)
        except (OSError, ValueError):
            pass

    def receive(self, deadline: float, waiting_for: str) -> str:
        """The next line of stdout (without its newline), or an error by ``deadline``."""
        item = self._next_item(deadline, waiting_for)
        if item is _EOF:
            self._lines.put(_EOF)  # later calls see the end too
            status = self.exit_status()
            raise EngineCrashed(
                f"the engine closed its output while we waited for {waiting_for} "
                f"({status}){self.stderr_report()}"
            )
        if isinstance(item, Exception):
            raise ProtocolError(f"{item} while waiting for {waiting_for}{self.stderr_report()}")
        try:
            return item.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            raise ProtocolError(
                f"a line that is not UTF-8 ({error}) while waiting for {waiting_for}"
                f"{self.stderr_report()}"
            ) from None

    def _next_item(self, deadline: float, waiting_for: str):
        """The next queued line; waits in short slices so that an exit is noticed at once."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self._lines.get(timeout=max(min(remaining, POLL_S), 0.0))
            except queue.Empty:
                pass
            if not self.alive():
                # Gone, but its stdout is still open (a child it started holds it):
                # take what it wrote before exiting, then report the exit.
                try:
                    return self._lines.get(timeout=POLL_S)
                except queue.Empty:
                    return _EOF
            if time.monotonic() >= deadline:
                raise EngineHung(
                    f"no answer from the engine within the time allowed while waiting for "
                    f"{waiting_for}{self.stderr_report()}"
                )

    def pending(self, wait: float) -> str | None:
        """A line the engine wrote unasked within ``wait`` seconds, or None (end of output
        is not a line)."""
        try:
            item = self._lines.get(timeout=wait)
        except queue.Empty:
            return None
        if item is _EOF or isinstance(item, Exception):
            self._lines.put(item)
            return None
        return item.decode("utf-8", "replace").rstrip("\r\n")

    # -- writing ----------------------------------------------------------------------

    def send(self, line: str, deadline: float) -> None:
        """Write ``line`` and a newline to stdin, giving up at ``deadline``."""
        data = memoryview((line + "\n").encode("utf-8"))
        fd = self.process.stdin.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_WRITE)
            while data:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise EngineHung(f"the engine stopped reading its input{self.stderr_report()}")
                try:
                    written = os.write(fd, data)
                except BlockingIOError:
                    continue
                except OSError:  # BrokenPipeError among them
                    status = self.exit_status()
                    raise EngineCrashed(
                        f"the engine closed its input ({status}){self.stderr_report()}"
                    ) from None
                data = data[written:]

    # -- state and shutdown ---------------------------------------------------------------

    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_status(self, wait: float = 1.0) -> str:
        try:
            status = self.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return "the process is still running"
        return f"the process exited with status {status}"

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def stderr_report(self, final: bool = True) -> str:
        """The stderr tail, formatted for a failure report.

        ``final``: the process is done for (every failure but an ``error`` message):
        it is killed first, so that everything it wrote to stderr, up to its last
        moment, is read before the tail is taken. Otherwise the tail is taken once
        stderr has been quiet for a moment (the engine goes on running).
        """
        if final:
            self.kill()
            self._stderr_reader.join(timeout=1.0)
        else:
            self._settle_stderr()
        tail = self.stderr_tail()
        if not tail:
            return NO_STDERR
        lines = "\n".join("  | " + line for line in tail.splitlines())
        return STDERR_TAIL + lines

    def _settle_stderr(self, quiet: float = 0.05, limit: float = 0.5) -> None:
        end = time.monotonic() + limit
        seen = len(self._stderr), self._stderr[-1] if self._stderr else None
        while time.monotonic() < end:
            time.sleep(quiet)
            now = len(self._stderr), self._stderr[-1] if self._stderr else None
            if now == seen:
                return
            seen = now

    def kill(self) -> None:
        _LIVE.discard(self)
        try:
            if os.name == "posix":
                # The whole group, even when the leader has exited: what it started may not have.
                os.killpg(self.process.pid, signal.SIGKILL)
            elif self.alive():
                self.process.kill()
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        # Only stdin is closed here: closing stdout or stderr would wait for the reader
        # threads, which end by themselves at end of file.
        try:
            self.process.stdin.close()
        except OSError:
            pass

    def close(self, grace: float) -> None:
        """Let the process finish on its own for ``grace`` seconds, then kill it."""
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
