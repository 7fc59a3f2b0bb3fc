"""The engine protocol as JSON lines: the messages between the suite and an engine process.

The requests and events are the dataclasses of ``protocol.py``, written as
``serialization.py`` writes them; this module adds what a conversation with
a separate process needs (the handshake, model loading, errors, shutdown)
and the *envelope*: every line is one JSON object with a ``"type"``, the
message's fields, and

- ``"id"``: the request it belongs to (the suite picks it; the engine echoes it
  on every answer to that request);
- ``"row"``: on the events answering a batch request, the row's index;
- ``"t"``: on events, with the ``timing/1`` extension: the engine's clock (seconds)
  when it chose the token.

Extensions are optional parts of the protocol an engine declares in its hello
(``EXTENSIONS``). ``timing/1`` is what a benchmark needs: engine-side token
timestamps and, after each generation, a ``usage`` message (when the engine read
the request, its peak memory); an engine without it is timed by arrival.

``conformance/PROTOCOL.md`` is the specification for engine authors; its
field tables are checked against the dataclasses here by the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from engines.protocol import (
    PROTOCOL_VERSION,
    BatchRequest,
    GenerateRequest,
    ProtocolError,
    ScoreRequest,
    TokenEvent,
    Trace,
)
from engines.serialization import from_json_dict, to_json_dict

ENVELOPE = ("type", "id", "row", "t")
ERROR_KINDS = ("unsupported", "bad_request", "internal")
TIMING = "timing/1"
EXTENSIONS = {
    TIMING: "events carry the engine's clock `t`; a `usage` message ends each generation",
}


@dataclass
class Hello:
    """Engine -> suite, the first line the engine writes: who it is and what it can do."""

    protocol: int  # the protocol version the engine speaks (this suite: PROTOCOL_VERSION)
    engine: str  # a short name for reports
    capabilities: list[str]  # names from protocol.CAPABILITIES
    model_formats: list[str]  # formats it loads, most preferred first (engines.models.FORMATS)
    version: str = ""  # free text: the engine's version, build, device
    extensions: list[str] = field(default_factory=list)  # names from EXTENSIONS


@dataclass
class Load:
    """Suite -> engine: load a model (``role`` "target"), or a draft model for speculative
    requests (``role`` "draft"; requests name it by ``name`` in ``draft.model``)."""

    name: str  # the model's name in the suite (e.g. "dummy", "smollm2-135m")
    format: str  # one of the engine's model_formats
    path: str | None = None  # file or folder; null for the "builtin" format
    role: str = "target"


@dataclass
class Loaded:
    """Engine -> suite: the model of a ``load`` is ready."""

    vocab_size: int  # length of the model's logprob vectors (for a target model)
    description: str = ""  # free text for reports


@dataclass
class Error:
    """Engine -> suite: a request (or load) that cannot be answered. ``kind`` "unsupported"
    makes the case "unsupported"; anything else fails it."""

    kind: str  # one of ERROR_KINDS
    message: str


@dataclass
class Usage:
    """Engine -> suite, only with the ``timing/1`` extension: written once right after the
    last event of each ``generate`` or ``batch`` answer (not after errors or traces)."""

    received_t: float  # the engine's clock when it read the request (the clock of ``t``)
    peak_memory_bytes: int | None = None  # most memory held while answering, weights included


@dataclass
class EngineTimes:
    """What a ``timing/1`` engine said about one request: its clock at each event (in the
    order the events arrived) and its ``usage``. Only differences of times mean anything."""

    event_t: list[float]
    usage: Usage


@dataclass
class Shutdown:
    """Suite -> engine: finish and exit. (Closing stdin means the same.)"""


# Every message type on the wire, by its "type". Requests, events and traces are
# the engine protocol's own dataclasses.
MESSAGES: dict[str, type] = {
    "hello": Hello,
    "load": Load,
    "loaded": Loaded,
    "generate": GenerateRequest,
    "batch": BatchRequest,
    "score": ScoreRequest,
    "event": TokenEvent,
    "trace": Trace,
    "error": Error,
    "usage": Usage,
    "shutdown": Shutdown,
}
TYPE_OF = {cls: name for name, cls in MESSAGES.items()}


@dataclass
class Message:
    """One line, read: its type, envelope and body (an instance of ``MESSAGES[type]``)."""

    type: str
    body: Any
    id: str | None = None
    row: int | None = None
    t: float | None = None  # timing/1: the engine's clock at an event


def encode(
    body: Any, id: str | None = None, row: int | None = None, t: float | None = None
) -> str:
    """One line of JSON (without the newline) for ``body`` in its envelope."""
    data: dict[str, Any] = {"type": TYPE_OF[type(body)]}
    if id is not None:
        data["id"] = id
    if row is not None:
        data["row"] = row
    if t is not None:
        data["t"] = t
    data.update(to_json_dict(body))
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def decode(line: str) -> Message:
    """The message on ``line``; ``ProtocolError`` saying exactly what is wrong otherwise."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ProtocolError(
            f"malformed JSON ({error.msg} at column {error.colno}): {line[:200]!r}"
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(f"a message must be a JSON object, got {line[:200]!r}")
    kind = data.get("type")
    if kind not in MESSAGES:
        raise ProtocolError(f"unknown message type {kind!r}; expected one of {sorted(MESSAGES)}")
    message_id, row, t = data.get("id"), data.get("row"), data.get("t")
    if message_id is not None and not isinstance(message_id, str):
        raise ProtocolError(f"{kind}.id: expected a string, got {message_id!r}")
    if row is not None and (not isinstance(row, int) or isinstance(row, bool)):
        raise ProtocolError(f"{kind}.row: expected an integer, got {row!r}")
    if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool)):
        raise ProtocolError(f"{kind}.t: expected a number of seconds, got {t!r}")
    if t is not None and kind != "event":
        raise ProtocolError(f"{kind}.t: only events carry a time")
    body = {k: v for k, v in data.items() if k not in ENVELOPE}
    body = from_json_dict(MESSAGES[kind], body, kind)
    return Message(kind, body, message_id, row, None if t is None else float(t))


def check_hello(hello: Hello) -> None:
    """Raise ``ProtocolError`` if the engine's hello cannot start a conversation."""
    from engines.models import FORMATS
    from engines.protocol import CAPABILITIES

    if hello.protocol != PROTOCOL_VERSION:
        raise ProtocolError(
            f"the engine speaks protocol version {hello.protocol}; "
            f"this suite speaks version {PROTOCOL_VERSION}"
        )
    unknown = sorted(set(hello.capabilities) - set(CAPABILITIES))
    if unknown:
        raise ProtocolError(f"hello: unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}")
    extensions = sorted(set(hello.extensions) - set(EXTENSIONS))
    if extensions:
        raise ProtocolError(f"hello: unknown extensions {extensions}; known: {sorted(EXTENSIONS)}")
    formats = sorted(set(hello.model_formats) - set(FORMATS))
    if formats or not hello.model_formats:
        raise ProtocolError(
            f"hello: model_formats {hello.model_formats} must name some of {list(FORMATS)}"
        )
