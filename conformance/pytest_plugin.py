"""pytest plugin: ``pytest --pyargs conformance --engine E --model M`` runs the catalogue.

Registered as a ``pytest11`` entry point, so pytest loads it in *every* run
of every project in the environment. It therefore imports nothing but
pytest at load time, and does nothing but add its options unless
``--engine`` is given: only then is the catalogue test in this package
collected (one test per engine, model and case).

Verdicts are the CLI's (both call ``runner.run_case``): pass and near-tie
pass (a near-tie is recorded as a user property and printed), fail fails
with the diagnostic, unsupported and unavailable engines skip with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DEFAULT_MODELS = ("dummy", "smollm2-135m")
CATALOGUE_TEST = Path(__file__).with_name("test_catalogue.py")


def pytest_addoption(parser) -> None:
    group = parser.getgroup("lmconform", "lmconform conformance suite")
    group.addoption(
        "--engine",
        action="append",
        default=None,
        help="engine to validate: reference, mlx-lm, transformers, module:Class or "
        "'cmd:COMMAND LINE' (repeatable); enables the conformance tests of "
        "`pytest --pyargs conformance`",
    )
    group.addoption(
        "--model",
        action="append",
        default=None,
        help=f"model for the conformance tests (repeatable; default: {', '.join(DEFAULT_MODELS)})",
    )
    group.addoption(
        "--cases", default=None, help="conformance case ids: substrings or globs, comma-separated"
    )
    group.addoption("--profile", default=None, help="precision profile (default: per model)")
    group.addoption(
        "--against",
        default="reference",
        help="compare with: reference (live; default), snapshots (the committed golden "
        "outputs; no MLX needed) or a folder written by `lmconform snapshot`",
    )
    group.addoption(
        "--case-timeout", type=float, default=600.0, help="time limit per conformance case (s)"
    )


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    if config.getoption("engine") is None and Path(collection_path) == CATALOGUE_TEST:
        return True
    return None


def pytest_generate_tests(metafunc) -> None:
    if "conformance_case" not in metafunc.fixturenames:
        return
    from conformance.catalogue import load_cases, select_cases

    config = metafunc.config
    engines = config.getoption("engine") or ["reference"]
    models = config.getoption("model") or list(DEFAULT_MODELS)
    catalogue = load_cases()
    params, ids = [], []
    for model in models:
        for engine in engines:
            for case in select_cases(catalogue, model, config.getoption("cases")):
                params.append((engine, model, case))
                ids.append(f"{engine}@{model}:{case.id}")
    metafunc.parametrize("conformance_case", params, ids=ids)


class ConformanceSession:
    """Engines and oracles opened on first use and shared by all conformance tests."""

    def __init__(self, config):
        self.config = config
        self.oracles = {}
        self.engines = {}

    def oracle(self, model: str):
        """The oracle (live reference or snapshots), or why there is none (a string)."""
        from conformance.runner import open_oracle
        from conformance.snapshots.store import SnapshotError

        if model not in self.oracles:
            try:
                self.oracles[model] = open_oracle(model, self.config.getoption("against"))
            except SnapshotError as error:
                self.oracles[model] = str(error)
        return self.oracles[model]

    def engine(self, spec: str, model: str):
        """The opened engine, or the reason it cannot be used (a string)."""
        from engines.registry import EngineUnavailable, open_engine

        key = (spec, model)
        if key not in self.engines:
            oracle = self.oracle(model)
            try:
                if isinstance(oracle, str):
                    self.engines[key] = oracle
                elif spec == "reference" and oracle.engine is not None:
                    self.engines[key] = oracle.engine
                else:
                    self.engines[key] = open_engine(spec, model)
            except EngineUnavailable as error:
                self.engines[key] = str(error)
        return self.engines[key]

    def close(self) -> None:
        oracles = [o for o in self.oracles.values() if not isinstance(o, str)]
        for engine in self.engines.values():
            if not isinstance(engine, str) and all(engine is not o.engine for o in oracles):
                engine.close()
        for oracle in oracles:
            oracle.close()


@pytest.fixture(scope="session")
def conformance_session(request):
    session = ConformanceSession(request.config)
    yield session
    session.close()


@pytest.fixture
def conformance_result(conformance_case, conformance_session, request):
    """Runs the case (skipping when the engine is unavailable); ``judge`` gives the outcome."""
    from conformance.runner import not_covered, run_case

    spec, model, case = conformance_case
    engine = conformance_session.engine(spec, model)
    if isinstance(engine, str):
        pytest.skip(engine)
    oracle = conformance_session.oracle(model)
    uncovered = not_covered(oracle, [case])
    if uncovered:
        pytest.skip(uncovered[case.id])
    profile = oracle.default_profile(request.config.getoption("profile"))
    result = run_case(case, engine, oracle, profile, request.config.getoption("case_timeout"))
    request.node.user_properties.append(("verdict", result.verdict))
    return result


def judge(result) -> None:
    """The pytest outcome of a case result: the same verdict the CLI prints."""
    from conformance.comparator import FAIL, NEAR_TIE
    from conformance.report import format_problems
    from conformance.runner import UNSUPPORTED

    if result.verdict == UNSUPPORTED:
        pytest.skip(result.reason)
    if result.verdict == FAIL:
        pytest.fail(format_problems([result]), pytrace=False)
    if result.verdict == NEAR_TIE:
        print(format_problems([result]))
