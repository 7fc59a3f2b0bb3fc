"""Batched decode throughput: tokens/s summed over the batch."""

import pytest

from benchmarks.conftest import run_workload
from benchmarks.workloads import Workload


@pytest.mark.parametrize("batch_size", [1, 4, 8, 16])
def test_batch_throughput(benchmark, engine, batch_size, rounds):
    workload = Workload(f"batch-{batch_size}", "batch", prompt_tokens=16, new_tokens=16,
                        batch_size=batch_size)
    result = run_workload(benchmark, engine, workload, rounds)
    assert result["batch_tps"] > 0
