"""Shared helpers for the conformance tests: synthetic traces and a shared dummy oracle.

Not a test module (no ``test_`` prefix). The oracle and engines are cached at
module level, so every conformance test file reuses the same loaded models.
"""

from __future__ import annotations

from functools import cache

from engines.protocol import TokenEvent, Trace


def make_trace(tokens, logprobs=None, tops=None, finish="length", texts=None) -> Trace:
    """A trace from plain lists; ``tops[i]`` is the top list of step i as (id, logprob) pairs."""
    events = []
    for i, token in enumerate(tokens):
        events.append(
            TokenEvent(
                token=token,
                logprob=None if logprobs is None else logprobs[i],
                top_logprobs=None if tops is None else tops[i],
                text="" if texts is None else texts[i],
                finish_reason=finish if i == len(tokens) - 1 else None,
            )
        )
    return Trace(events)


def decode_bytes(tokens) -> str:
    """A decode function for synthetic traces: token id = byte value."""
    return bytes(t % 256 for t in tokens).decode("utf-8", "replace")


@cache
def dummy_oracle():
    from conformance.oracle import ReferenceOracle

    return ReferenceOracle("dummy")


@cache
def reference_oracle(model: str):
    """The live reference of ``model``, one per test session. It keeps its answers, so a
    test asking what an earlier test asked (the catalogue's requests on smollm2-135m, which
    the golden snapshots, the mutants' and the sampler tests all ask) gets them at once.
    Tests must not close it."""
    from conformance.oracle import ReferenceOracle

    return ReferenceOracle(model)


@cache
def dummy_engine(spec: str):
    """A peer or reference engine on the dummy model (the reference is the oracle's own)."""
    from engines.registry import open_engine

    return dummy_oracle().engine if spec == "reference" else open_engine(spec, "dummy")


def dummy_case(case_id: str):
    from conformance.catalogue import load_cases

    return next(c for c in load_cases() if c.id == case_id)


def run_dummy_case(case, engine, oracle=None):
    """``case`` (a catalogue id, or a Case) run on ``engine`` against the live dummy
    reference, or against ``oracle``, with the dummy model's default profile."""
    from conformance.runner import run_case

    case = dummy_case(case) if isinstance(case, str) else case
    profile = dummy_oracle().default_profile()
    return run_case(case, engine, dummy_oracle() if oracle is None else oracle, profile)


def findings(result) -> list[tuple[str, str]]:
    """A case result's findings as (check, verdict) pairs, in order."""
    return [(f.check, f.verdict) for f in result.findings]


def summary(result, check: str) -> str:
    """The summary of the one finding named ``check``."""
    [found] = [f.summary for f in result.findings if f.check == check]
    return found


def differs(expected_label: str, actual_label: str, step: int = 0) -> str:
    """The start of the comparator's summary for a logprob difference at ``step``."""
    return (
        rf"^FAIL: logprob of .* at step {step} differs: {expected_label} [-+.e\d]+, {actual_label} "
    )


def _control():
    from mutants import Control

    return Control


class GreedyOnlyEngine(_control()):
    """The reference adapter declaring only greedy decoding (for "unsupported" verdicts)."""

    name = "greedy-only"
    capabilities = frozenset({"greedy", "logprobs", "stream"})
