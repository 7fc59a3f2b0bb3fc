"""A broken JSON-lines engine for the mutants: the reference served over the protocol,
except that it drops fields the protocol does not define instead of refusing the request
(PROTOCOL.md S6). Run as ``python tests/lenient_jsonl_engine.py``."""

from __future__ import annotations

import dataclasses
import json

from conformance.examples.jsonl_engine import JsonlServer, main
from engines.protocol import SamplerSettings

KNOWN = {f.name for f in dataclasses.fields(SamplerSettings)}


class DropsUnknownSamplerFields(JsonlServer):
    def serve(self) -> None:
        self.inp = (drop_unknown_sampler_fields(line) for line in self.inp)
        super().serve()


def drop_unknown_sampler_fields(line: str) -> str:
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return line
    sampler = message.get("sampler") if isinstance(message, dict) else None
    if not isinstance(sampler, dict):
        return line
    message["sampler"] = {k: v for k, v in sampler.items() if k in KNOWN}
    return json.dumps(message) + "\n"


if __name__ == "__main__":
    main(DropsUnknownSamplerFields)
