"""Kind ``stream``: streaming and non-streaming answers of the engine are the same.

Both are also validated on their own (text pieces join to the decoded tokens,
see ``validation.py``), and the streamed one is compared with the reference.
"""

from __future__ import annotations

from dataclasses import replace

from conformance.checks.context import CaseContext


def run(ctx: CaseContext) -> None:
    base = ctx.request()
    ctx.require(base.capabilities_needed() | {"stream"})
    reference = ctx.primary_reference(base)
    streamed = ctx.run(replace(base, stream=True), "streaming")
    whole = ctx.run(replace(base, stream=False), "non-streaming")
    name = ctx.engine_name
    ctx.compare(
        "stream vs non-stream", whole, streamed, f"{name} non-streaming", f"{name} streaming"
    )
    ctx.compare("streamed vs reference", reference, streamed)
