"""Kind ``prompt_cache``: reusing a cached prefix gives what computing from scratch gives.

The first request fills the engine's cache under a key. The second, under the
same key, is either the whole conversation so far plus new text
(``follow = "continue"``: the cache holds a prefix of it) or the first prompt
plus text that departs from the first answer (``follow = "diverge"``: the
cache must be trimmed back to the shared prefix before reuse).
"""

from __future__ import annotations

from dataclasses import replace

from conformance.catalogue import CatalogueError
from conformance.checks.context import CaseContext


def run(ctx: CaseContext) -> None:
    key = f"lmconform:{ctx.case.id}"
    first = replace(ctx.request(), cache_key=key)
    ctx.require(first.capabilities_needed())
    reference = ctx.primary_reference(ctx.request())
    name = ctx.engine_name
    answer = ctx.run(first, "first turn")
    ctx.compare("first turn vs reference", reference, answer)

    suffix = ctx.oracle.encode(ctx.params["suffix"])
    follow = ctx.params["follow"]
    if follow == "continue":
        prompt = list(first.prompt) + answer.tokens + suffix
    elif follow == "diverge":
        if suffix[0] == answer.tokens[0]:
            raise CatalogueError(f"{ctx.case.id}: the suffix starts with the first answer's token")
        prompt = list(first.prompt) + suffix
    else:
        raise CatalogueError(
            f"{ctx.case.id}: follow must be 'continue' or 'diverge', got {follow!r}"
        )
    # The second turn keeps the first turn's settings (penalties, stop sequences, ...).
    second = replace(first, prompt=prompt, max_tokens=ctx.params["max_tokens"])
    cached = ctx.run(second, "second turn, cached")
    fresh = ctx.run(replace(second, cache_key=None), "second turn, from scratch")
    ctx.compare("cached vs from scratch", fresh, cached, f"{name} from scratch", f"{name} cached")
    ctx.compare(
        "cached vs reference",
        ctx.reference(replace(second, cache_key=None)),
        cached,
        "reference",
        f"{name} cached",
    )
