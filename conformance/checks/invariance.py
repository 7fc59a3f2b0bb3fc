"""Kind ``invariance``: the output must not depend on how it was computed.

Each of ``params.variants`` (a draft model, a prefill chunk size, the prompt
given as embeddings, ...) is run on the engine and compared twice: with the
engine's own plain answer (self-consistency, which needs no reference) and
with the reference's plain answer.
"""

from __future__ import annotations

from conformance.checks.context import CaseContext, describe_overrides
from conformance.comparator import PASS

# With the model as its own greedy draft every draft token is accepted, so an
# engine reporting from_draft must report some; none means it never drafted.
MIN_TOKENS_FOR_DRAFT_CHECK = 4


def run(ctx: CaseContext) -> None:
    base = ctx.request()
    variants = [ctx.request(**overrides) for overrides in ctx.params["variants"]]
    for request in [base, *variants]:
        ctx.require(request.capabilities_needed())
    reference = ctx.primary_reference(base)
    name = ctx.engine_name
    plain = ctx.run(base, "plain")
    ctx.compare("plain vs reference", reference, plain)
    for overrides, request in zip(ctx.params["variants"], variants):
        label = describe_overrides(overrides)
        trace = ctx.run(request, label)
        ctx.compare(f"{label} vs plain", plain, trace, f"{name} plain", f"{name} {label}")
        ctx.compare(f"{label} vs reference", reference, trace, "reference", f"{name} {label}")
        if request.draft is not None and request.draft.model == "self":
            _check_drafts_accepted(ctx, label, trace)


def _check_drafts_accepted(ctx: CaseContext, label: str, trace) -> None:
    flags = [e.from_draft for e in trace.events]
    if any(f is None for f in flags) or len(flags) < MIN_TOKENS_FOR_DRAFT_CHECK:
        return  # the engine does not say which tokens came from the draft
    accepted = sum(flags)
    if accepted == 0:
        ctx.fail(
            f"{label} drafts accepted",
            f"FAIL: with the model as its own draft no token came from the draft "
            f"({len(flags)} tokens): speculative decoding is not happening",
        )
    else:
        ctx.add(
            f"{label} drafts accepted",
            PASS,
            f"pass: {accepted} of {len(flags)} tokens from the draft",
        )
