"""pytest plugin: ``pytest --pyargs conformance --lmconform-engine E`` runs the catalogue.

Registered as a ``pytest11`` entry point, so pytest loads it in *every* run
of every project in the environment. It therefore imports nothing but
pytest at load time, namespaces every option (``--lmconform-...``, held in
the ``OPTION_*`` constants) so that it cannot clash with another plugin's,
and does nothing but add its options unless ``--lmconform-engine`` is given:
only then is the catalogue test in this package collected (one test per
engine, model and case).

Verdicts are the CLI's (both call ``runner.run_case``): pass and near-tie
pass, fail fails with the diagnostic, unsupported and unavailable engines
skip with the reason. A near-tie is recorded as the test's ``verdict`` user
property and as a report section, and listed with its diagnostic in the
terminal summary (``NearTies``).

Under pytest-xdist (``-n N``, or ``--tx`` to other machines) the tests of one
engine and model go to one worker (``pytest_xdist_make_scheduler``), which opens
that engine and its model once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.models import DEFAULT_CASE_TIMEOUT_S, DEFAULT_MODELS

CATALOGUE_TEST = Path(__file__).with_name("test_catalogue.py")

OPTION_ENGINE = "--lmconform-engine"
OPTION_MODEL = "--lmconform-model"
OPTION_CASES = "--lmconform-cases"
OPTION_PROFILE = "--lmconform-profile"
OPTION_AGAINST = "--lmconform-against"
OPTION_TIMEOUT = "--lmconform-timeout"
NEAR_TIE_SECTION = "lmconform near-tie"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("lmconform", "lmconform conformance suite")
    group.addoption(
        OPTION_ENGINE,
        action="append",
        default=None,
        help="engine to validate: reference, mlx-lm, transformers, module:Class or "
        "'cmd:COMMAND LINE' (repeatable); enables the conformance tests of "
        "`pytest --pyargs conformance`",
    )
    group.addoption(
        OPTION_MODEL,
        action="append",
        default=None,
        help=f"model for the conformance tests (repeatable; default: {', '.join(DEFAULT_MODELS)})",
    )
    group.addoption(
        OPTION_CASES, default=None, help="conformance case ids: substrings or globs, comma-separated"
    )
    group.addoption(
        OPTION_PROFILE, default=None, help="conformance precision profile (default: per model)"
    )
    group.addoption(
        OPTION_AGAINST,
        default="reference",
        help="compare with: reference (live; default), snapshots (the committed golden "
        "outputs; no MLX needed) or a folder written by `lmconform snapshot`",
    )
    group.addoption(
        OPTION_TIMEOUT,
        type=_seconds,
        default=DEFAULT_CASE_TIMEOUT_S,
        help="time limit per conformance case (s)",
    )


def _seconds(text: str) -> float:
    from engines.inputs import arg_type, seconds  # imported on use: the plugin loads everywhere

    return arg_type(seconds)(text)


def pytest_configure(config) -> None:
    if config.getoption(OPTION_ENGINE) is None:
        return
    problem = _bad_option(config)
    if problem:
        raise pytest.UsageError(f"lmconform: {problem}")
    config.pluginmanager.register(NearTies(), "lmconform-near-ties")


def _bad_option(config) -> str | None:
    """The first unusable option or LMCONFORM_* variable, as ``lmconform check`` words it;
    None when all are usable. A typo must stop the session, not skip or deselect its tests.
    A built-in peer that is not installed is not a typo: its tests skip with the reason."""
    from conformance.catalogue import load_cases, select_cases
    from conformance.cli.options import (
        InputError,
        case_patterns,
        check_engines,
        check_models,
        check_profile,
    )
    from engines.inputs import distinct, environment_problems
    from engines.registry import BUILTIN_ENGINES, missing_requirements

    problems = environment_problems()
    if problems:
        return problems[0]
    engines = config.getoption(OPTION_ENGINE)
    installed = [e for e in engines if e not in BUILTIN_ENGINES or not missing_requirements(e)]
    catalogue = load_cases()
    known = sorted({m for case in catalogue for m in case.models})
    against = config.getoption(OPTION_AGAINST)
    try:
        distinct("--engine", engines)
        check_engines(installed)
        models = check_models(config.getoption(OPTION_MODEL) or list(DEFAULT_MODELS), known)
        for pattern in case_patterns(config.getoption(OPTION_CASES)) or []:
            if not any(select_cases(catalogue, m, pattern) for m in models):
                return f"{OPTION_CASES}: {pattern!r} matches no case on {', '.join(models)}"
        check_profile(config.getoption(OPTION_PROFILE))
    except (InputError, ValueError) as error:
        return str(error).replace("--", "--lmconform-", 1)
    if against not in ("reference", "snapshots") and not Path(against).is_dir():
        return f"{OPTION_AGAINST} {against!r} is neither 'reference', 'snapshots' nor a folder"
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (``-n N``, ``--tx``) one worker runs all the tests of one engine
    and model, so each worker opens an engine once: xdist's "load" distribution (the
    default) becomes one by engine and model. Other ``--dist`` modes are kept."""
    if config.getoption(OPTION_ENGINE) is None or config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    prefixes = sorted(
        (f"[{engine}@{model}:" for engine, model in _engines_and_models(config)),
        key=len,
        reverse=True,
    )

    class ByEngineAndModel(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            # A conformance test's id is test_case[ENGINE@MODEL:CASE]; others keep their own.
            return next((p for p in prefixes if p in nodeid), nodeid)

    return ByEngineAndModel(config, log)


def _engines_and_models(config) -> list[tuple[str, str]]:
    engines = config.getoption(OPTION_ENGINE) or ["reference"]
    models = config.getoption(OPTION_MODEL) or list(DEFAULT_MODELS)
    return [(engine, model) for model in models for engine in engines]


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    if config.getoption(OPTION_ENGINE) is None and Path(collection_path) == CATALOGUE_TEST:
        return True
    return None


def pytest_generate_tests(metafunc) -> None:
    if "conformance_case" not in metafunc.fixturenames:
        return
    from conformance.catalogue import load_cases, select_cases

    config = metafunc.config
    catalogue = load_cases()
    params, ids = [], []
    for engine, model in _engines_and_models(config):
        for case in select_cases(catalogue, model, config.getoption(OPTION_CASES)):
            params.append((engine, model, case))
            ids.append(f"{engine}@{model}:{case.id}")
    metafunc.parametrize("conformance_case", params, ids=ids)


class NearTies:
    """Near-ties pass, so pytest would say nothing of them: they are listed with their
    diagnostic in the terminal summary. Read from the test reports' near-tie section, which
    also reaches the controller when pytest-xdist ran the tests in workers."""

    def __init__(self):
        self.found: list[tuple[str, str]] = []  # (test id, diagnostic)

    def pytest_runtest_logreport(self, report) -> None:
        for title, content in report.sections:
            if report.when == "call" and title == f"Captured {NEAR_TIE_SECTION} call":
                self.found.append((report.nodeid, content))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.found:
            return
        terminalreporter.section(f"lmconform: {len(self.found)} near-tie(s) (passed)")
        for test_id, diagnostic in self.found:
            terminalreporter.write_line(test_id)
            for line in diagnostic.splitlines():
                terminalreporter.write_line("  " + line)


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
                self.oracles[model] = open_oracle(model, self.config.getoption(OPTION_AGAINST))
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
    from conformance.comparator import NEAR_TIE
    from conformance.profiles import profile_for_engine
    from conformance.report import format_problems
    from conformance.runner import not_covered, run_case

    spec, model, case = conformance_case
    engine = conformance_session.engine(spec, model)
    if isinstance(engine, str):
        pytest.skip(engine)
    oracle = conformance_session.oracle(model)
    uncovered = not_covered(oracle, [case])
    if uncovered:
        pytest.skip(uncovered[case.id])
    config = request.config
    override = config.getoption(OPTION_PROFILE)
    profile = profile_for_engine(oracle.default_profile(override), engine, override)
    result = run_case(case, engine, oracle, profile, config.getoption(OPTION_TIMEOUT))
    request.node.user_properties.append(("verdict", result.verdict))
    if result.verdict == NEAR_TIE:
        diagnostic = format_problems([result])
        request.node.add_report_section("call", NEAR_TIE_SECTION, diagnostic)
    return result


def judge(result) -> None:
    """The pytest outcome of a case result: the same verdict the CLI prints."""
    from conformance.comparator import FAIL
    from conformance.report import format_problems
    from conformance.runner import UNSUPPORTED

    if result.verdict == UNSUPPORTED:
        pytest.skip(result.reason)
    if result.verdict == FAIL:
        pytest.fail(format_problems([result]), pytrace=False)
