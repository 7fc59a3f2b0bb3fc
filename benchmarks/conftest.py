"""Shared set-up of the pytest-benchmark suites in this folder.

Run them with ``pytest benchmarks/`` (options below). Each test is parametrised over
the engines of ``--bench-engines`` and times one workload from ``workloads.py`` with
``benchmark.pedantic``, so the suites and ``lmconform bench`` measure the same thing.
Tokens/s and friends go to ``extra_info`` (the median, plus every round under
``NAME_samples``, which ``lmconform bench ingest`` turns into rank-testable samples).
"""

from __future__ import annotations

from dataclasses import asdict
from statistics import median

import pytest

from benchmarks import fingerprint
from benchmarks.engines import TimedEngine, split_specs
from benchmarks.workloads import Workload
from engines.registry import EngineUnavailable

_loaded: dict[tuple[str, str], TimedEngine] = {}


def pytest_addoption(parser):
    group = parser.getgroup("lmconform benchmarks")
    group.addoption("--bench-engines", default="reference,mlx-lm,transformers",
                    help="comma list of engine specs (default reference,mlx-lm,transformers)")
    group.addoption("--bench-model", default="dummy", help="model name (default dummy)")
    group.addoption("--bench-rounds", type=int, default=3, help="timed rounds per test (3)")


def pytest_generate_tests(metafunc):
    if "engine" in metafunc.fixturenames:
        specs = split_specs(metafunc.config.getoption("bench_engines"))
        metafunc.parametrize("engine", specs, indirect=True)
    if "model" in metafunc.fixturenames:
        metafunc.parametrize("model", [metafunc.config.getoption("bench_model")])


@pytest.fixture
def engine(request, model) -> TimedEngine:
    """The opened engine (opened once per session); one that cannot open is a skip
    (a peer that is not installed, with the command that installs it)."""
    key = (request.param, model)
    if key not in _loaded:
        candidate = TimedEngine.from_spec(request.param, model)
        try:
            candidate.load()
        except EngineUnavailable as error:
            pytest.skip(f"{request.param} is not available: {error}")
        _loaded[key] = candidate
    return _loaded[key]


@pytest.fixture
def rounds(request) -> int:
    return request.config.getoption("bench_rounds")


def run_workload(benchmark, engine: TimedEngine, workload: Workload, rounds: int) -> dict:
    """Time ``workload`` for ``rounds`` rounds after one warm-up; fill ``extra_info``."""
    reason = engine.unsupported(workload.kind)
    if reason is not None:
        pytest.skip(reason)
    results: list[dict[str, float]] = []
    benchmark.pedantic(lambda: results.append(workload.measure(engine)),
                       rounds=rounds, iterations=1, warmup_rounds=1)
    timed = results[-rounds:]  # the warm-up round's result is not a sample
    for name in timed[0]:
        values = [r[name] for r in timed]
        benchmark.extra_info[name] = median(values)
        benchmark.extra_info[name + "_samples"] = values
    benchmark.extra_info["workload"] = workload.settings()
    return {name: benchmark.extra_info[name] for name in timed[0]}


def pytest_benchmark_update_machine_info(config, machine_info):
    """Our fingerprint, so ingested suites compare with ``lmconform bench`` runs."""
    versions: dict[str, str] = {}
    for engine in _loaded.values():
        versions.update(engine.versions())
    machine_info["lmconform"] = asdict(fingerprint.collect(versions))
