"""Prefill tokens/s at several prompt lengths, and time to first token."""

import pytest

from benchmarks.conftest import run_workload
from benchmarks.workloads import Workload


@pytest.mark.parametrize("prompt_len", [32, 128, 512])
def test_prefill(benchmark, engine, prompt_len, rounds):
    workload = Workload(f"prefill-{prompt_len}", "prefill", prompt_tokens=prompt_len)
    result = run_workload(benchmark, engine, workload, rounds)
    assert result["prefill_tps"] > 0


def test_time_to_first_token(benchmark, engine, rounds):
    """A chat-sized prompt: the latency a user waits before the first token appears."""
    workload = Workload("ttft", "prefill", prompt_tokens=32)
    result = run_workload(benchmark, engine, workload, rounds)
    assert result["ttft_s"] > 0
