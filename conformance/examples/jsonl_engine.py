"""A worked example: the reference engine served over the JSON-lines protocol.

Run it as ``python -m conformance.examples.jsonl_engine`` and check it with::

    lmconform check --engine "cmd:python -m conformance.examples.jsonl_engine" --model dummy

It is the whole of an engine's side of ``conformance/PROTOCOL.md``, written
the way an engine in any language would be: write a ``hello``, then read one
message per line and answer it, until ``shutdown`` or the end of stdin.

1. ``hello``: protocol version, name, capabilities, model formats accepted.
2. ``load``: load the model (or a draft model) the suite names; answer ``loaded``
   with the width of the model's logprob vectors.
3. ``generate``: one ``event`` per token, in order, each written as soon as it is
   known; the last carries ``finish_reason``.
   ``batch``: the same per row, each event tagged with its ``row``.
   ``score``: one ``trace`` holding an event per continuation token.
4. A request the engine cannot serve gets an ``error`` (kind ``unsupported``,
   ``bad_request`` or ``internal``), and the engine goes on serving.
5. The ``timing/1`` extension (declared in the hello), for benchmarks: each event
   carries ``t``, the engine's clock when the token was chosen, and a ``usage``
   message follows the last event of each generation: when the request was read,
   and MLX's peak memory while answering it (weights included).

Stdout carries protocol lines only: anything else printed there would break
the conversation, so the real stdout is kept for the protocol and file
descriptor 1 is pointed at stderr (where logs and warnings belong).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

# The reference before mlx.core: it binds OpenBLAS under MLX's matmuls (reference/blas.py).
# isort: off
import reference
import mlx.core as mx
# isort: on
from engines.adapters.reference import ReferenceEngine
from engines.jsonl_protocol import (
    TIMING,
    Error,
    Hello,
    Load,
    Loaded,
    Message,
    Usage,
    decode,
    encode,
)
from engines.models import ModelSource
from engines.protocol import PROTOCOL_VERSION, ProtocolError, TokenEvent, Trace, Unsupported


class ServedReference(ReferenceEngine):
    """The reference adapter, loading models from wherever the suite says they are."""

    name = "reference-jsonl"
    model_formats = ("builtin", "hf-folder", "gguf")

    def __init__(self, source: ModelSource, drafts: dict[str, ModelSource]):
        self.draft_sources = drafts
        super().__init__(source)

    def load(self, source: ModelSource):
        return reference.load(str(source.path) if source.path else source.name)

    def load_draft(self, name: str):
        source = self.draft_sources.get(name)
        return reference.load(str(source.path) if source and source.path else name)[0]


class JsonlServer:
    """Answers the messages read from ``inp`` on ``out``; one method per message type."""

    def __init__(self, inp: TextIO, out: TextIO):
        self.inp = inp
        self.out = out
        self.engine_class = ServedReference
        self.engine = None
        self.drafts: dict[str, ModelSource] = {}

    def hello(self) -> Hello:
        return Hello(
            protocol=PROTOCOL_VERSION,
            engine=self.engine_class.name,
            capabilities=sorted(self.engine_class.capabilities),
            model_formats=list(self.engine_class.model_formats),
            version="lmconform reference, served over JSON lines",
            extensions=[TIMING],
        )

    def serve(self) -> None:
        self.write(self.hello())
        for line in self.inp:
            if not line.strip():
                continue
            try:
                message = decode(line)
            except ProtocolError as error:
                self.write(Error("bad_request", str(error)))
                continue
            if message.type == "shutdown":
                break
            try:
                self.handle(message)
            except Unsupported as error:
                self.write(Error("unsupported", str(error)), message.id)
            except (ProtocolError, ValueError) as error:  # the request itself is wrong
                self.write(Error("bad_request", str(error)), message.id)
            except Exception as error:  # noqa: BLE001 - report it and keep serving
                self.write(Error("internal", f"{type(error).__name__}: {error}"), message.id)

    def handle(self, message: Message) -> None:
        handlers = {
            "load": self.load,
            "generate": self.generate,
            "batch": self.batch,
            "score": self.score,
        }
        if message.type not in handlers:
            raise ProtocolError(f"an engine does not accept {message.type!r} messages")
        if message.type != "load" and self.engine is None:
            raise ProtocolError("no model is loaded yet")
        # timing/1: the clock is time.monotonic(); only differences of its readings matter.
        mx.reset_peak_memory()
        received = time.monotonic()
        handlers[message.type](message.body, message.id)
        if message.type in ("generate", "batch"):
            peak = int(mx.get_peak_memory())
            self.write(Usage(received_t=received, peak_memory_bytes=peak), message.id)

    # -- one method per request type --------------------------------------------------

    def load(self, load: Load, request_id: str) -> None:
        source = ModelSource(load.name, load.format, Path(load.path) if load.path else None)
        if load.role == "draft":
            if self.engine is None:
                raise ProtocolError("a draft model needs the target model loaded first")
            self.drafts[load.name] = source
            draft = self.engine.draft_model(load.name)  # loaded now, so errors show here
            width = int(draft(mx.array([[0]])).shape[-1])
            self.write(Loaded(width, source.describe()), request_id)
            return
        self.engine = self.engine_class(source, self.drafts)
        self.write(Loaded(self.engine.vocab_size, source.describe()), request_id)

    def generate(self, request, request_id: str) -> None:
        for event in self.engine.generate(request):
            self.write(event, request_id)

    def batch(self, request, request_id: str) -> None:
        for row, event in self.engine.stream_batch(request):
            self.write(event, request_id, row)

    def score(self, request, request_id: str) -> None:
        self.write(Trace(self.engine.score(request)), request_id)

    def write(self, body, request_id: str | None = None, row: int | None = None) -> None:
        """One message; an event is stamped with the engine's clock (timing/1)."""
        t = time.monotonic() if isinstance(body, TokenEvent) else None
        self.out.write(encode(body, request_id, row, t) + "\n")
        self.out.flush()


def protocol_streams() -> tuple[TextIO, TextIO]:
    """stdin, and a private copy of stdout for protocol lines; fd 1 now goes to stderr."""
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return sys.stdin, protocol_out


def main(server_class: type[JsonlServer] = JsonlServer) -> None:
    inp, out = protocol_streams()
    server_class(inp, out).serve()


if __name__ == "__main__":
    main()
