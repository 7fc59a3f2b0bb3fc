"""``cmd:<command line>``: an engine in another process, spoken to over JSON lines.

The engine may be written in any language; it implements
``conformance/PROTOCOL.md`` on stdin/stdout (messages: ``jsonl_protocol.py``).
This adapter starts it, reads its ``hello`` (capabilities, model formats),
hands it the model in the first format it accepts, and then turns each
request into messages and the answers back into events.

An engine declaring the ``timing/1`` extension stamps each event with its own
clock and follows each generation with a ``usage`` message; the adapter keeps
them as ``last_times`` (``EngineTimes``) for the benchmarks.

An external engine may misbehave in every way, so every wait has a deadline
(``start_timeout`` for the hello and the model load, ``request_timeout`` per
request, ``total_timeout`` for the engine's whole run) and every answer is
checked as it arrives. A crash, a hang, malformed JSON, a protocol violation
or a token outside the vocabulary fails the case at hand, with the engine's
stderr tail; the process is then discarded, and the next request starts a
fresh one (after ``MAX_START_FAILURES`` failed starts in a row, requests fail
at once instead of waiting for yet another start).

Output the engine writes after a request has finished (a stray event, a
second finish) is charged to that request: it is looked for when the request
finishes and when its case ends (``settle``), so it fails the case that caused
it, not the next one.

Timeouts can be set with the environment variables
``LMCONFORM_CMD_START_TIMEOUT``, ``LMCONFORM_CMD_REQUEST_TIMEOUT`` and
``LMCONFORM_CMD_TOTAL_TIMEOUT`` (seconds; a value that is not a positive number
up to ``MAX_TIMEOUT`` makes the engine unavailable, naming the variable). A command starting with
``python`` or ``python3`` runs with the Python interpreter running the suite.
"""

from __future__ import annotations

import itertools
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

from engines.adapters.base import Engine
from engines.adapters.line_process import EngineCrashed, EngineFailure, EngineHung, LineProcess
from engines.jsonl_protocol import (
    TIMING,
    EngineTimes,
    Error,
    Hello,
    Load,
    Loaded,
    Message,
    Shutdown,
    check_hello,
    decode,
    encode,
)
from engines.models import FORMATS, ModelSource, ModelUnavailable, resolve
from engines.protocol import (
    BadRequest,
    BatchRequest,
    GenerateRequest,
    ProtocolError,
    ScoreRequest,
    TokenEvent,
    Trace,
    Unsupported,
)

MAX_START_FAILURES = 3
SHUTDOWN_GRACE = 5.0
MAX_TIMEOUT = 7 * 24 * 3600.0  # seconds; anything longer is a typo, not a wish
SETTLE_S = 0.05  # how long a finished case waits for stray output from the engine


class EngineError(EngineFailure):
    """The engine answered with an ``error`` message (other than "unsupported")."""


class EngineBadRequest(EngineError, BadRequest):
    """The engine answered with an ``error`` of kind ``bad_request`` (S6)."""


def _setting(name: str, default: float) -> float:
    """A timeout from ``LMCONFORM_CMD_<name>``; a bad value is an error naming the variable."""
    from engines.registry import EngineUnavailable

    variable = f"LMCONFORM_CMD_{name}"
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise EngineUnavailable(
            f"environment variable {variable}={text!r}: expected seconds, a number in "
            f"(0, {MAX_TIMEOUT:g}]"
        )
    return value


class CmdEngine(Engine):
    name = "cmd"
    # Every format: the engine's hello says which it takes, and __init__ re-resolves.
    model_formats = FORMATS
    command: tuple[str, ...] = ()
    spec = "cmd:"
    start_timeout = 120.0
    request_timeout = 120.0
    total_timeout = 3600.0

    @classmethod
    def bind(cls, command_line: str, **settings: Any) -> type[CmdEngine]:
        """A ``CmdEngine`` class for ``command_line``; ``settings`` override the timeouts."""
        from engines.registry import EngineUnavailable

        argv = shlex.split(command_line)
        if not argv:
            raise EngineUnavailable("a cmd: engine needs a command line, e.g. cmd:./my-engine")
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        if shutil.which(argv[0]) is None:
            raise EngineUnavailable(f"cmd: engine: command not found: {argv[0]}")
        timeouts = {
            "start_timeout": _setting("START_TIMEOUT", cls.start_timeout),
            "request_timeout": _setting("REQUEST_TIMEOUT", cls.request_timeout),
            "total_timeout": _setting("TOTAL_TIMEOUT", cls.total_timeout),
        }
        attributes = {"command": tuple(argv), "spec": f"cmd:{command_line}"}
        return type(cls.__name__, (cls,), attributes | timeouts | settings)

    def __init__(self, source: ModelSource):
        super().__init__(source)
        self.name = self.spec
        self._ends_at = time.monotonic() + self.total_timeout
        self._ids = itertools.count(1)
        self._process: LineProcess | None = None
        self._drafts: set[str] = set()
        self._start_failures = 0
        self._last_start_error: Exception | None = None
        self.hello: Hello | None = None
        self._vocab_size = 0
        self.timed = False  # the engine speaks timing/1
        self.last_times: EngineTimes | None = None  # its clock readings of the last request
        self._last_request: str | None = None  # the latest request sent to the live process
        self._start()  # an engine that cannot start cannot be opened

    # -- the Engine interface ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        process, request_id, deadline = self._send(request)
        finished = False
        event_t: list[float] = []
        try:
            for step in itertools.count():
                message = self._receive(process, request_id, "event", deadline)
                event = message.body
                self._check_event(process, event, step, request_id)
                event_t.append(self._event_time(process, message, request_id))
                if step >= request.max_tokens:
                    raise self._violation(
                        process,
                        f"request {request_id}: more than max_tokens="
                        f"{request.max_tokens} events (no finish_reason)",
                    )
                if event.finish_reason is not None:
                    self._read_usage(process, request_id, deadline, event_t)
                    self._check_quiet(process, request_id, wait=0.0)
                    finished = True
                    yield event
                    return
                yield event
        except (Unsupported, EngineError):
            finished = True  # the engine ended the request with an error: still in step
            raise
        finally:
            if not finished:
                self._discard()

    def generate_batch(self, request: BatchRequest) -> list[list[TokenEvent]]:
        rows: list[list[TokenEvent]] = [[] for _ in request.rows]
        for row, event in self.stream_batch(request):
            rows[row].append(event)
        return rows

    def stream_batch(self, request: BatchRequest) -> Iterator[tuple[int, TokenEvent]]:
        """(row index, event) pairs of a batch, each as it arrives."""
        if "batch" not in self.capabilities:
            raise Unsupported(f"{self.name} does not batch")
        process, request_id, deadline = self._send(request)
        rows: list[list[TokenEvent]] = [[] for _ in request.rows]
        open_rows = set(range(len(rows)))
        event_t: list[float] = []
        try:
            while open_rows:
                message = self._receive(process, request_id, "event", deadline)
                row = message.row
                if row not in open_rows:
                    state = "finished" if row is not None and 0 <= row < len(rows) else "unknown"
                    raise self._violation(
                        process, f"request {request_id}: an event for {state} row {row!r}"
                    )
                event = message.body
                self._check_event(process, event, len(rows[row]), request_id)
                event_t.append(self._event_time(process, message, request_id))
                rows[row].append(event)
                if event.finish_reason is not None:
                    open_rows.discard(row)
                elif len(rows[row]) >= request.rows[row].request.max_tokens:
                    raise self._violation(
                        process,
                        f"request {request_id}: row {row} reached max_tokens "
                        "without a finish_reason",
                    )
                if not open_rows:
                    self._read_usage(process, request_id, deadline, event_t)
                    self._check_quiet(process, request_id, wait=0.0)
                yield row, event
        except (Unsupported, EngineError):
            raise  # the engine ended the request with an error: still in step
        except BaseException:
            self._discard()
            raise

    def score(self, request: ScoreRequest) -> list[TokenEvent]:
        if "score" not in self.capabilities:
            raise Unsupported(f"{self.name} does not score continuations")
        process, request_id, deadline = self._send(request)
        try:
            trace: Trace = self._receive(process, request_id, "trace", deadline).body
            for step, event in enumerate(trace.events):
                self._check_event(process, event, step, request_id)
            self._check_quiet(process, request_id, wait=0.0)
        except (Unsupported, EngineError):
            raise  # the engine ended the request with an error: still in step
        except BaseException:
            self._discard()
            raise
        return trace.events

    @property
    def label(self) -> str:
        # ``name`` is the whole command line (``cmd:...``); the hello names the engine for people.
        return self.hello.engine if self.hello else self.name

    def describe(self) -> dict[str, Any]:
        hello = self.hello
        return {
            "engine": self.name,
            "version": f"{hello.engine} {hello.version}".strip() if hello else self.name,
            "model": self.source.describe(),
            "command": shlex.join(self.command),
        }

    def settle(self) -> None:
        """At the end of a case: output written after its last request fails that case."""
        process = self._process
        if process is None or self._last_request is None:
            return
        try:
            self._check_quiet(process, self._last_request, wait=SETTLE_S)
        except ProtocolError:
            self._discard()
            raise

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.alive():
            try:
                process.send(encode(Shutdown()), time.monotonic() + 1.0)
            except (EngineFailure, EngineHung):
                pass
        process.close(SHUTDOWN_GRACE)

    # -- the conversation --------------------------------------------------------------

    def _start(self) -> None:
        """A fresh process: hello, then the target model loaded."""
        process = LineProcess(list(self.command))
        deadline = min(time.monotonic() + self.start_timeout, self._ends_at)
        try:
            hello = self._receive(process, None, "hello", deadline).body
            try:
                check_hello(hello)
            except ProtocolError as error:
                raise self._violation(process, str(error)) from None
            self.source = self._source_for(self.source.name, hello)
            self.capabilities = frozenset(hello.capabilities)
            loaded = self._load(process, self.source, "target", deadline)
        except BaseException:
            process.kill()
            raise
        self.hello, self._vocab_size, self._process = hello, loaded.vocab_size, process
        self.timed = TIMING in hello.extensions
        self._drafts = set()
        self._last_request = None

    def _source_for(self, model: str, hello: Hello) -> ModelSource:
        from engines.registry import EngineUnavailable

        try:
            return resolve(model, hello.model_formats)
        except ModelUnavailable as error:
            raise EngineUnavailable(f"{self.name} cannot load {model}: {error}") from None

    def _load(self, process: LineProcess, source: ModelSource, role: str, deadline) -> Loaded:
        load_id = f"load-{next(self._ids)}"
        path = None if source.path is None else str(source.path)
        process.send(encode(Load(source.name, source.format, path, role), id=load_id), deadline)
        loaded = self._receive(process, load_id, "loaded", deadline).body
        if role == "target" and loaded.vocab_size <= 0:
            raise self._violation(
                process, f"loaded: vocab_size {loaded.vocab_size} is not positive"
            )
        return loaded

    def _live_process(self) -> LineProcess:
        if self._process is not None and self._process.alive():
            return self._process
        self._discard()
        if self._start_failures >= MAX_START_FAILURES:
            raise EngineCrashed(
                f"the engine failed to start {self._start_failures} times in a row; not trying "
                f"again. The last time: {self._last_start_error}"
            )
        try:
            self._start()
        except Exception as error:
            self._start_failures += 1
            self._last_start_error = error
            raise
        self._start_failures = 0
        return self._process

    def _send(self, request) -> tuple[LineProcess, str, float]:
        """The request sent, with its deadline; a (re)start of the engine is not charged to it."""
        self._request_deadline()  # a used-up total budget is said at once, before any restart
        process = self._live_process()
        deadline = self._request_deadline()
        try:
            for name in self._draft_models(request):
                if name not in self._drafts:
                    try:
                        draft = resolve(name, self.hello.model_formats)
                    except ModelUnavailable as error:
                        raise Unsupported(
                            f"{self.name} cannot load draft {name}: {error}"
                        ) from None
                    self._load(process, draft, "draft", deadline)
                    self._drafts.add(name)
            if self._last_request is not None:
                self._check_quiet(process, self._last_request, wait=0.0)
            request_id = f"r{next(self._ids)}"
            self._last_request = request_id
            process.send(encode(request, id=request_id), deadline)
        except Unsupported:
            raise
        except BaseException:
            self._discard()
            raise
        return process, request_id, deadline

    def _receive(
        self, process: LineProcess, request_id: str | None, kind: str, deadline
    ) -> Message:
        if self._process is None:  # still starting: the hello and the target model's load
            limit = f"start timeout {self.start_timeout:g} s"
        else:
            limit = f"request timeout {self.request_timeout:g} s"
        what = f"{kind} of request {request_id}" if request_id else f"the engine's {kind}"
        waiting_for = f"{what} ({limit})"
        line = process.receive(deadline, waiting_for)
        try:
            message = decode(line)
        except ProtocolError as error:
            raise self._violation(process, f"waiting for {waiting_for}: {error}") from None
        if message.type == "error":
            error: Error = message.body
            if message.id not in (request_id, None):
                raise self._violation(process, f"an error for request {message.id!r}")
            if error.kind == "unsupported":
                raise Unsupported(f"{self.name}: {error.message}")
            failure = EngineBadRequest if error.kind == "bad_request" else EngineError
            raise failure(
                f"the engine answered {waiting_for} with an error ({error.kind}): "
                f"{error.message}{process.stderr_report(final=False)}"
            )
        if message.type != kind or message.id != request_id:
            raise self._violation(
                process,
                f"waiting for {waiting_for}, got a {message.type!r} message for "
                f"request {message.id!r}",
            )
        return message

    def _check_event(self, process, event: TokenEvent, step: int, request_id: str) -> None:
        ids = [event.token, *(t for t, _ in event.top_logprobs or [])]
        bad = [t for t in ids if not 0 <= t < self._vocab_size]
        if bad:
            raise self._violation(
                process,
                f"request {request_id}, step {step}: token {bad[0]} is outside the "
                f"vocabulary [0, {self._vocab_size})",
            )

    def _check_quiet(self, process: LineProcess, request_id: str, wait: float) -> None:
        """Nothing may arrive after request ``request_id`` finished; a line that does is a
        violation charged to that request."""
        line = process.pending(wait)
        if line is not None:
            raise self._violation(
                process,
                f"the engine wrote after request {request_id} had finished: {line[:200]!r}",
            )

    def _event_time(self, process: LineProcess, message: Message, request_id: str) -> float:
        """timing/1: the engine's clock at this event (every event has one, or none does)."""
        if self.timed and message.t is None:
            raise self._violation(
                process, f"request {request_id}: an event without `t` (the engine declared "
                f"{TIMING})"
            )
        if not self.timed and message.t is not None:
            raise self._violation(
                process, f"request {request_id}: an event with `t`, but the hello did not "
                f"declare {TIMING}"
            )
        return message.t or 0.0

    def _read_usage(self, process, request_id: str, deadline: float, event_t) -> None:
        """timing/1: the ``usage`` message that follows a generation's last event."""
        self.last_times = None
        if self.timed:
            usage = self._receive(process, request_id, "usage", deadline).body
            self.last_times = EngineTimes(list(event_t), usage)

    def _request_deadline(self) -> float:
        now = time.monotonic()
        if now >= self._ends_at:
            raise EngineHung(
                f"{self.name}: the engine's total time of {self.total_timeout:g} s is used up"
            )
        return min(now + self.request_timeout, self._ends_at)

    def _discard(self) -> None:
        """Kill the process after a failed exchange: its state is unknown now."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()

    @staticmethod
    def _violation(process: LineProcess, text: str) -> ProtocolError:
        return ProtocolError(text + process.stderr_report())

    @staticmethod
    def _draft_models(request) -> list[str]:
        rows = request.rows if isinstance(request, BatchRequest) else [request]
        requests = [getattr(r, "request", r) for r in rows]
        return [
            r.draft.model
            for r in requests
            if isinstance(r, GenerateRequest) and r.draft and r.draft.model != "self"
        ]
