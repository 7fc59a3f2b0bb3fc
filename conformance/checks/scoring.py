"""Kind ``score``: teacher-forced logprobs of a given continuation equal the reference's.

No token is chosen, so nothing can diverge: this checks logprobs on paths
where greedy decoding would be ill-conditioned.
"""

from __future__ import annotations

from conformance.checks.context import CaseContext
from engines.protocol import ScoreRequest


def run(ctx: CaseContext) -> None:
    prompt = ctx.request().prompt
    continuation = ctx.oracle.encode(ctx.params["continuation"])
    request = ScoreRequest(prompt=prompt, continuation=continuation)
    ctx.require(request.capabilities_needed())
    ctx.compare("scores vs reference", ctx.oracle.answer_score(request), ctx.run_score(request))
