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
- ``dies-at-start``: exits before its hello.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

from conformance.examples.jsonl_engine import JsonlServer, main
from engines.protocol import Unsupported


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


FAULTS: dict[str, type[JsonlServer]] = {
    "crash-on-third": CrashesOnThird,
    "garbage": PrintsGarbage,
    "sleep-forever": SleepsForever,
    "truncated-logprobs": TruncatesLogprobs,
    "token-out-of-range": TokenOutOfRange,
    "wrong-id": AnswersAnotherId,
    "unsupported": RefusesEverything,
    "dies-at-start": DiesAtStart,
}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in FAULTS:
        sys.exit(f"usage: python -m conformance.examples.faulty_engines {{{','.join(FAULTS)}}}")
    main(FAULTS[sys.argv[1]])
