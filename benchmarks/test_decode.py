"""Decode tokens/s for one sequence, and the peak memory while decoding."""

from benchmarks.conftest import run_workload
from benchmarks.workloads import Workload

DECODE = Workload("decode-64", "decode", prompt_tokens=16, new_tokens=64)


def test_decode(benchmark, engine, rounds):
    result = run_workload(benchmark, engine, DECODE, rounds)
    assert result["decode_tps"] > 0


def test_peak_memory(benchmark, engine, rounds):
    """Peak memory = the engine's weights + the most it added while decoding."""
    result = run_workload(benchmark, engine, DECODE, rounds)
    if engine.profile.weight_bytes is None:  # another process: the peak is its own report
        assert result.get("peak_memory_mb", 1) > 0
    else:
        assert result["peak_memory_mb"] * 1e6 >= engine.profile.weight_bytes
