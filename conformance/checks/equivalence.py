"""Kind ``equivalence``: the engine's answer equals the reference's, request by request.

``params.variants`` (optional) lists overrides of the case's request, each
checked the same way (e.g. ``max_tokens`` 1, 2, 7, 16 for exact stopping).
"""

from __future__ import annotations

from conformance.checks.context import CaseContext, describe_overrides


def run(ctx: CaseContext) -> None:
    base = ctx.request()
    ctx.require(base.capabilities_needed())
    ctx.primary_reference(base)
    for overrides in ctx.params.get("variants") or [{}]:
        request = ctx.request(**overrides)
        label = describe_overrides(overrides) if overrides else ""
        check = f"{label} vs reference" if label else "engine vs reference"
        ctx.compare(check, ctx.reference(request), ctx.run(request, label))
