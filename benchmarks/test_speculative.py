"""Speculative decoding speed-up: ``dummy-draft`` drafts for ``dummy``; other models
draft with themselves (``engines.models.DRAFT_MODELS``)."""

from benchmarks.conftest import run_workload
from benchmarks.workloads import Workload


def test_speculative_speedup(benchmark, engine, rounds):
    workload = Workload("speculative", "speculative", prompt_tokens=16, new_tokens=64)
    result = run_workload(benchmark, engine, workload, rounds)
    assert result["spec_speedup"] > 0
    assert 0 <= result.get("draft_acceptance", 0) <= 1  # absent: no from_draft flags
