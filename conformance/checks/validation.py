"""Kind ``request_validation``: an invalid request is refused, never served (PROTOCOL.md S6).

Each of ``params.invalid`` (overrides of the case's valid request: ``max_tokens`` 0, a
token outside the vocabulary, ``top_p`` above 1, ...) is sent to the engine as it is, and
the engine must refuse it as a bad request: a Python engine by raising ``ValueError``
(``engines.protocol.BadRequest`` is one), an engine over JSON lines with an ``error`` of
kind ``bad_request``. Answering it with events fails, and so does refusing it in another
way (``unsupported`` says the request is valid but beyond the engine; a crash is an
internal error). A request needing a capability the engine lacks is not sent.

Engines over JSON lines (``cmd:``), each in a process of its own, also get what could
crash the process serving it: ``params.process_only`` (a prompt token outside the
vocabulary, which mlx-lm's embedding lookup meets with a segmentation fault that would end
the whole run in process) and the case's request with a field the protocol does not
define (``params.unknown_field``, added to the sampler settings: a misspelt setting that
an engine ignoring unknown fields would silently drop; a Python engine gets requests as
dataclasses, which cannot carry unknown fields).

The valid request itself must be served, so that an engine refusing everything fails too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass, replace
from typing import Any

from conformance.checks.context import CaseContext, describe_overrides
from conformance.comparator import PASS
from engines.adapters.cmd import CmdEngine
from engines.adapters.line_process import without_stderr_note
from engines.protocol import GenerateRequest, SamplerSettings, Unsupported


@dataclass(frozen=True)
class Refusal:
    refused: bool
    account: str


def run(ctx: CaseContext) -> None:
    base = ctx.request()
    ctx.require(base.capabilities_needed())
    ctx.compare("the valid request vs reference", ctx.primary_reference(base), ctx.run(base))
    own_process = isinstance(ctx.engine, CmdEngine)
    probes = ctx.params["invalid"] + (ctx.params.get("process_only", []) if own_process else [])
    for overrides in probes:
        request = ctx.request(**overrides)
        label = describe_overrides(overrides)
        missing = sorted(request.capabilities_needed() - set(ctx.engine.capabilities))
        if missing:
            ctx.add(label, PASS, f"pass: not sent (it needs {', '.join(missing)})")
            continue
        record(ctx, label, refusal(ctx.engine, request))
    unknown = ctx.params.get("unknown_field")
    if unknown and own_process:
        request = with_unknown_sampler_field(base, unknown)
        record(ctx, f"unknown field sampler.{next(iter(unknown))}", refusal(ctx.engine, request))


def refusal(engine, request: GenerateRequest) -> Refusal:
    """How ``engine`` answered an invalid ``request``."""
    try:
        events = list(engine.generate(request))
    except ValueError as error:  # BadRequest, an engine's `bad_request` error
        return Refusal(True, f"refused: {error}")
    except Unsupported as error:
        return Refusal(False, f"answered 'unsupported' ({error}); an invalid request is a bad one")
    except Exception as error:  # noqa: BLE001 - any other failure is the wrong answer
        return Refusal(False, f"failed with {type(error).__name__}: {error}")
    return Refusal(False, f"accepted it silently: answered {len(events)} events")


def record(ctx: CaseContext, label: str, outcome: Refusal) -> None:
    if outcome.refused:
        shown = without_stderr_note(outcome.account).splitlines()[0]
        ctx.add(label, PASS, f"pass: {shown}")
    else:
        ctx.fail(label, f"FAIL: {ctx.engine_name}, {label}: {outcome.account}")


def with_unknown_sampler_field(request: GenerateRequest, fields: dict[str, Any]):
    """``request`` whose sampler settings carry ``fields`` besides the protocol's: the JSON
    form of a dataclass lists every field, so the engine receives them."""
    extended = make_dataclass(
        "SamplerSettingsWithUnknownField",
        [(name, type(value), field(default=value)) for name, value in fields.items()],
        bases=(SamplerSettings,),
    )
    return replace(request, sampler=extended(**vars(request.sampler)))
