"""Deliberately faulty JSON-lines engines: the example engine with one fault each.

The suite's promise is that a misbehaving external engine fails the case at
hand, with its stderr tail, and never stops or hangs the run. These engines
break that promise's every premise; ``tests/test_jsonl_engines.py`` checks
each is reported for what it is. Run one as::

    python -m conformance.examples.faulty_engines crash-on-third

Faults (the first request of each kind that matters is counted per process,
so a fresh process behaves the same way again):

- ``crash-on-third``: exits with status 3 while answering its third request;
- ``garbage``: answers every request with a line that is not JSON;
- ``sleep-forever``: stops answering (and reading) at its first request;
- ``truncated-logprobs``: lists 2 top logprobs whatever number was asked;
- ``token-out-of-range``: its second event names a token past the vocabulary;
- ``wrong-id``: answers with a request id the suite never sent;
- ``unsupported``: refuses every generation with an "unsupported" error;
- ``dies-at-start``: exits before its hello;
- ``null-logprobs``: declares ``logprobs`` but sends ``logprob: null``;
- ``stray-after-finish``: writes one more event after its first finished request
  (with ``LMCONFORM_FAULTY_ONCE_FILE`` set: only in the first process);
- ``exits-leaving-child``: at its first request, starts a child that keeps its
  stdout open, then exits (the exit must be noticed at once, the child killed);
- ``hostile-text``: writes terminal escapes, XML-illegal characters, Markdown
  pipes and fences, and a 1 MB line to stderr, then crashes;
- ``ignores-shutdown``: never exits by itself (it must be killed, with its group).

If ``LMCONFORM_FAULTY_PID_FILE`` is set, each engine process appends its pid
to that file when it starts (tests use it to check that no process survives).

``module:Class`` engines that misbehave inside the suite's own process (each
must fail its cases, never end the run): ``ExitsInConstructor``,
``ExitsInGenerate``, ``InterruptsInGenerate`` (raises ``KeyboardInterrupt``)
and ``SwallowsTimeout`` (catches every exception while it sleeps, then answers).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

from conformance.examples.jsonl_engine import JsonlServer, main
from engines.adapters.reference import ReferenceEngine
from engines.protocol import Unsupported

PID_FILE_VARIABLE = "LMCONFORM_FAULTY_PID_FILE"
ONCE_FILE_VARIABLE = "LMCONFORM_FAULTY_ONCE_FILE"


def stderr(text: str) -> None:
    print(f"faulty engine: {text}", file=sys.stderr, flush=True)


class CrashesOnThird(JsonlServer):
    requests = 0

    def handle(self, message):
        if message.type in ("generate", "batch", "score"):
            self.requests += 1
            if self.requests == 3:
                stderr(f"simulated crash while answering request {message.id}")
                os._exit(3)
        super().handle(message)


class PrintsGarbage(JsonlServer):
    def generate(self, request, request_id):
        stderr("about to print garbage")
        self.out.write("<html>this is not JSON</html>\n")
        self.out.flush()


class SleepsForever(JsonlServer):
    def generate(self, request, request_id):
        stderr(f"sleeping instead of answering request {request_id}")
        while True:
            time.sleep(3600)


class TruncatesLogprobs(JsonlServer):
    def generate(self, request, request_id):
        for event in self.engine.generate(request):
            top = event.top_logprobs[:2] if event.top_logprobs else event.top_logprobs
            self.write(replace(event, top_logprobs=top), request_id)


class TokenOutOfRange(JsonlServer):
    def generate(self, request, request_id):
        for step, event in enumerate(self.engine.generate(request)):
            if step == 1:
                stderr("emitting a token past the vocabulary")
                event = replace(event, token=self.engine.vocab_size + 7)
            self.write(event, request_id)


class AnswersAnotherId(JsonlServer):
    def generate(self, request, request_id):
        for event in self.engine.generate(request):
            self.write(event, "not-" + request_id)


class RefusesEverything(JsonlServer):
    def generate(self, request, request_id):
        raise Unsupported("this engine generates nothing")


class DiesAtStart(JsonlServer):
    def serve(self):
        stderr("cannot find my weights; giving up before hello")
        sys.exit(1)


class NullLogprobs(JsonlServer):
    def generate(self, request, request_id):
        for event in self.engine.generate(request):
            self.write(replace(event, logprob=None), request_id)


class StrayAfterFinish(JsonlServer):
    strayed = False

    def generate(self, request, request_id):
        event = None
        for event in self.engine.generate(request):
            self.write(event, request_id)
        if not self.strayed and not _done_once():
            self.strayed = True
            self.write(replace(event, finish_reason=None), request_id)  # one event too many


class ExitsLeavingChild(JsonlServer):
    def generate(self, request, request_id):
        # The child inherits stdout: the pipe stays open after this process is gone.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        stderr(f"started child {child.pid}; exiting without an answer")
        os._exit(0)


class HostileText(JsonlServer):
    def generate(self, request, request_id):
        stderr("\x1b[31mred\x1b[0m | pipe | ``` fence \x00 nul \x08 backspace \x0c ]]> </x>")
        stderr("x" * 1_000_000)
        os._exit(7)


class IgnoresShutdown(JsonlServer):
    def serve(self):
        super().serve()
        while True:  # after "shutdown" or end of input, keep running
            time.sleep(3600)


FAULTS: dict[str, type[JsonlServer]] = {
    "crash-on-third": CrashesOnThird,
    "garbage": PrintsGarbage,
    "sleep-forever": SleepsForever,
    "truncated-logprobs": TruncatesLogprobs,
    "token-out-of-range": TokenOutOfRange,
    "wrong-id": AnswersAnotherId,
    "unsupported": RefusesEverything,
    "dies-at-start": DiesAtStart,
    "null-logprobs": NullLogprobs,
    "stray-after-finish": StrayAfterFinish,
    "exits-leaving-child": ExitsLeavingChild,
    "hostile-text": HostileText,
    "ignores-shutdown": IgnoresShutdown,
}


# -- in-process (module:Class) engines ---------------------------------------------------------


class ExitsInConstructor(ReferenceEngine):
    name = "exits-in-constructor"

    def __init__(self, source):
        sys.exit(4)


class ExitsInGenerate(ReferenceEngine):
    name = "exits-in-generate"

    def generate(self, request):
        sys.exit(5)
        yield from ()


class InterruptsInGenerate(ReferenceEngine):
    name = "interrupts-in-generate"

    def generate(self, request):
        raise KeyboardInterrupt("an engine pretending the user pressed Ctrl-C")
        yield from ()


class SwallowsTimeout(ReferenceEngine):
    name = "swallows-timeout"

    def generate(self, request):
        try:
            time.sleep(3)  # longer than the tests' case limit
        except BaseException:  # noqa: BLE001, S110 - the fault: swallowing the time limit
            pass
        yield from super().generate(request)


def _done_once() -> bool:
    """With ``LMCONFORM_FAULTY_ONCE_FILE`` set, a fault happens once across processes:
    False the first time (the file is created), True ever after."""
    path = os.environ.get(ONCE_FILE_VARIABLE)
    if not path:
        return False
    try:
        open(path, "x").close()
    except FileExistsError:
        return True
    return False


def _record_pid() -> None:
    path = os.environ.get(PID_FILE_VARIABLE)
    if path:
        with open(path, "a") as out:
            out.write(f"{os.getpid()}\n")


if __name__ == "__main__":
    _record_pid()
    if len(sys.argv) != 2 or sys.argv[1] not in FAULTS:
        sys.exit(f"usage: python -m conformance.examples.faulty_engines {{{','.join(FAULTS)}}}")
    main(FAULTS[sys.argv[1]])
