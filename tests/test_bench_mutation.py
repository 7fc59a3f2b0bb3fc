"""benchmarks/mutation.py without running mutmut: scores, module selection, the scratch
copy's settings, and the score stored in (and shown from) the bench history."""

from __future__ import annotations

import tomllib

import pytest

from benchmarks import cli as cli_bench
from benchmarks import mutation
from benchmarks.history import History

RESULTS = """
    conformance.comparator.x_margin_at__mutmut_1: killed
    conformance.comparator.x_margin_at__mutmut_2: survived
    conformance.comparator.x_margin_at__mutmut_3: no tests
    conformance.comparator.x_margin_at__mutmut_4: timeout
    conformance.comparator.xǁComparisonǁrender__mutmut_1: killed
"""


def test_results_are_parsed_and_scored_over_the_checked_mutants():
    statuses = mutation.parse_results(RESULTS)
    assert len(statuses) == 5
    assert statuses["conformance.comparator.xǁComparisonǁrender__mutmut_1"] == "killed"
    score = mutation.ModuleScore("conformance/comparator.py")
    for status in statuses.values():
        score.counts[status] = score.counts.get(status, 0) + 1
    # killed: 2 killed + 1 timeout; not killed: 1 survived + 1 without tests.
    assert (score.killed, score.checked) == (3, 5)
    assert score.score == pytest.approx(60.0)
    assert "60.0% (3 of 5 killed" in score.line()


def test_a_module_with_nothing_checked_has_no_score():
    score = mutation.ModuleScore("reference/sampler.py", counts={"not checked": 4})
    assert score.score is None


def test_every_mapped_module_and_test_file_exists():
    root = mutation.ROOT
    for module, tests in mutation.MODULE_TESTS.items():
        sources = list(root.glob(module))
        assert sources, module
        for test in tests:
            path, _, function = test.partition("::")  # a file, or a test function's node id
            assert mutation.names_a_test_file(test), test
            assert not function or f"def {function}(" in (root / path).read_text(), test


def test_tests_may_be_files_or_node_ids_of_existing_files():
    """--tests takes what MODULE_TESTS holds: node ids were refused as 'no such file'."""
    assert mutation.names_a_test_file("tests/test_thresholds.py")
    assert mutation.names_a_test_file("tests/test_thresholds.py::test_the_tolerance_formula")
    assert not mutation.names_a_test_file("tests/no_such.py::test_the_tolerance_formula")
    assert not mutation.names_a_test_file("tests")  # a folder is not a test file


@pytest.mark.parametrize(
    "module, path, hit",
    [
        ("conformance/comparator.py", "conformance/comparator.py", True),
        ("conformance/comparator.py", "conformance/profiles.py", False),
        ("conformance/checks/*", "conformance/checks/batch.py", True),
        ("conformance/checks/*", "conformance/checks.md", False),
    ],
)
def test_changed_paths_select_modules(module, path, hit):
    assert mutation._matches(module, path) is hit


def test_a_file_under_a_glob_key_runs_with_that_keys_tests():
    checks = mutation.MODULE_TESTS["conformance/checks/*"]
    assert mutation.tests_for("conformance/checks/sampling.py") == checks
    assert mutation.tests_for("conformance/checks/*") == checks
    assert mutation.tests_for("conformance/comparator.py") == (
        mutation.MODULE_TESTS["conformance/comparator.py"]
    )
    assert mutation.tests_for("conformance/runner.py") is None
    with pytest.raises(SystemExit):
        mutation.main(["conformance/runner.py", "--no-history"])


def test_the_scratch_copy_mutates_only_the_module_with_its_tests(tmp_path):
    tests = ("tests/test_thresholds.py",)
    work = mutation.prepare("conformance/profiles.py", tests, tmp_path / "w")
    settings = tomllib.loads((work / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert settings["only_mutate"] == ["conformance/profiles.py"]
    assert settings["pytest_add_cli_args_test_selection"] == list(tests)
    assert "not smollm" in settings["pytest_add_cli_args"]  # the shared settings stay
    assert (work / "conformance" / "profiles.py").read_text() == (
        mutation.ROOT / "conformance" / "profiles.py"
    ).read_text()


def test_scores_go_to_the_history_and_bench_show_prints_them(tmp_path, capsys):
    db = tmp_path / "history.sqlite"
    scored = mutation.ModuleScore(
        "conformance/profiles.py", ("tests/test_thresholds.py",), {"killed": 9, "survived": 1}
    )
    unscored = mutation.ModuleScore("reference/sampler.py", error="tests fail")
    run_id = mutation.record([scored, unscored], db)
    with History(db) as history:
        samples = history.samples([run_id])
        assert history.run(run_id).source == "mutation"
    assert [(s.workload, s.metric, s.value) for s in samples] == [
        ("conformance/profiles.py", "mutation_score", 90.0)
    ]
    assert cli_bench.main(["show", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "conformance/profiles.py" in out and "mutation_score" in out and "90" in out


BAD_ARGUMENTS = {
    "--budget nan": (["--budget", "nan"], "--budget"),
    "--budget negative": (["--budget", "-1"], "--budget"),
    "--changed unknown": (["--changed", "no-such-revision"], "not a commit"),
    "--min-score above 100": (["--min-score", "200"], "--min-score"),
    "a misspelt module": (["conformance/comparater.py"], "did you mean 'conformance/comparator.py'"),
    "a module twice": (["conformance/profiles.py", "conformance/profiles.py"], "given twice"),
    "--tests missing file": (["--tests", "tests/no_such_test.py"], "no such file"),
    "--tests node id in a missing file": (["--tests", "tests/no_such.py::test_x"], "no such file"),
    "--budget twice": (["--budget", "5", "--budget", "6"], "given twice"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_before_any_mutant_runs(case, capsys, tmp_path):
    """A typo'd budget, revision or module used to run for an hour (nan, -1) or mutate
    nothing and exit 0 (an unknown --changed base raised a traceback)."""
    argv, message = BAD_ARGUMENTS[case]
    with pytest.raises(SystemExit) as exit_:
        mutation.main([*argv, "--db", str(tmp_path / "h.sqlite")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse's usage, then one line naming the input
    assert last.startswith("python -m benchmarks.mutation: error:") and message in last
    assert not (tmp_path / "h.sqlite").exists()
