"""Mutation testing of the modules that decide verdicts and outputs, scored per module.

A mutant is the module with one small change (``<`` for ``<=``, ``+ 1``, a dropped
``not``, ...); the module's fast tests *kill* it if one of them fails. The mutation
score, killed / (mutants that ran), says how much of the module's behaviour the tests
pin down; every survivor is either an equivalent mutant (no input can tell it apart)
or a test still missing. Equivalent mutants are recorded, each with the reason, in
``benchmarks/mutation-equivalents.toml`` and left out of the score.

The tool is mutmut 3 (PyPI ``mutmut``). Measured here on ``conformance/comparator.py``
with its test file on this 2-core machine: mutmut checked 738 mutants in 7 min 46 s,
pytest-gremlins 50 mutants in 9 min 14 s. mutmut imports the project and pytest once
and forks a warm process per mutant; pytest-gremlins starts a fresh interpreter per
mutant (importing MLX each time; its fork executor is disabled upstream), and
cosmic-ray does the same after rewriting the source file in place, which other people's
test runs in this checkout would see.

Every run works on a scratch copy of the project (``.mutation/<module>/``): mutmut
writes its mutated sources into ``mutants/`` below the directory it runs in and reads
its settings from that directory's ``pyproject.toml``, so the copy gets the shared
``[tool.mutmut]`` settings plus this module's ``only_mutate`` and test selection, and
the tracked files are never touched.

The score goes to the benchmark history (``benchmarks/history.py``) as one run with
metric ``mutation_score`` (percent) per module as the workload, engine ``mutmut``:
``lmconform bench show`` prints it. Commands (see the Makefile):

    python -m benchmarks.mutation                         # every module of MODULE_TESTS
    python -m benchmarks.mutation conformance/comparator.py
    python -m benchmarks.mutation conformance/checks/sampling.py   # one file of a glob key
    python -m benchmarks.mutation --changed origin/main --budget 600
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engines.inputs import Parser, arg_type, did_you_mean, distinct, number, seconds

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"
COPIED = ("reference", "engines", "conformance", "benchmarks", "lmconform", "tests")
COPIED_FILES = ("pyproject.toml", "README.md")
METRIC = "mutation_score"
EQUIVALENTS = ROOT / "benchmarks" / "mutation-equivalents.toml"
# Mutants checked at once. One: the machine's two cores are shared with other people's
# test runs, and mutmut's default (a worker per core) would take both.
WORKERS = 1

# test_sampler_stats.py takes minutes (speculative sampling, calibration over seed sets,
# importing mlx-lm): its functions that take well under a second each, by node id.
SAMPLER_STATS_FAST = tuple(
    f"tests/test_sampler_stats.py::{name}"
    for name in (
        "test_temperature_reshapes_the_kept_tokens",
        "test_support_stability_notices_a_token_at_a_threshold",
        "test_chi_square_is_pearsons_when_no_cell_is_small",
        "test_small_cells_are_pooled_by_their_expected_counts",
        "test_rare_tokens_are_pooled_so_expected_counts_stay_valid",
        "test_draws_from_the_right_distribution_fit_and_wrong_ones_do_not",
        "test_holm_adjusts_step_down_and_beats_bonferroni",
        "test_monte_carlo_p_value_matches_the_chi_square_limit_where_that_is_accurate",
        "test_pooled_contexts_are_fit_against_their_own_distributions",
        "test_one_draw_outside_the_support_fails_and_names_token_and_rule",
        "test_every_stray_draw_is_counted",
        "test_verdict_is_plain_data",
        "test_sequences_are_judged_at_the_prefix_each_token_followed",
        "test_group_by_prefix_files_each_token_under_what_came_before",
        "test_an_unstable_context_is_a_catalogue_error",
        "test_the_catalogue_has_the_cases_the_issue_asks_for",
        "test_catalogue_contexts_are_informative_and_stable",
        "test_reference_draws_repeat_with_their_seed",
        "test_broken_sampler_is_caught_by_its_case",
    )
)

# The one place that says which fast tests exercise each module. Entries are pytest
# arguments (files, or node ids), run with the shared [tool.mutmut] arguments
# (``-m "not smollm"``); mutmut then runs, for each mutant, only those of them that
# reach the mutated function.
MODULE_TESTS: dict[str, tuple[str, ...]] = {
    "reference/sampler.py": (
        "tests/test_mutation_kills_sampler.py",
        "tests/test_boundaries_reference.py",
        "tests/test_sampling.py",
    ),
    "reference/logits_processors.py": (
        "tests/test_mutation_kills_logits_processors.py",
        "tests/test_boundaries_reference.py",
        "tests/test_sampling.py",
    ),
    "reference/kv_cache.py": (
        "tests/test_mutation_kills_kv_cache.py",
        "tests/test_prompt_cache.py",
        "tests/test_generate.py",
    ),
    "reference/batch_cache.py": ("tests/test_mutation_kills_batch_cache.py", "tests/test_batch.py"),
    "reference/generate.py": (
        "tests/test_mutation_kills_generate.py",
        "tests/test_boundaries_reference.py",
        "tests/test_generate.py",
        "tests/test_faults_reference.py",
    ),
    "reference/speculative.py": (
        "tests/test_mutation_kills_speculative.py",
        "tests/test_generate.py",
    ),
    "reference/tokenizer.py": (
        "tests/test_mutation_kills_tokenizer.py",
        "tests/test_detokenizer.py",
    ),
    "conformance/comparator.py": (
        "tests/test_mutation_kills_comparator.py",
        "tests/test_thresholds.py",
        "tests/test_conformance_comparator.py",
        "tests/test_resumption.py",
    ),
    "conformance/profiles.py": ("tests/test_thresholds.py", "tests/test_conformance_comparator.py"),
    "conformance/sampling/stats.py": (
        "tests/test_mutation_kills_sampling_stats.py",
        "tests/test_thresholds.py",
        *SAMPLER_STATS_FAST,
    ),
    # A glob key also serves each file it covers (``conformance/checks/sampling.py``).
    "conformance/checks/*": (
        "tests/test_mutation_kills_checks.py",
        "tests/test_mutation_kills_checks_batch.py",
        "tests/test_mutation_kills_checks_stream_cache.py",
        "tests/test_validation_case.py",
        "tests/test_mutation_kills_leftovers.py",
        "tests/test_agreement_case.py",
        "tests/test_resumption.py::test_a_noisy_but_correct_engine_passes_with_its_near_tie_counted",
        "tests/test_conformance_catalogue.py",
        *SAMPLER_STATS_FAST,
    ),
    # test_snapshots.py also runs every model's golden snapshot (minutes): its comparison tests.
    "conformance/snapshots/compare.py": (
        "tests/test_mutation_kills_snapshot_compare.py",
        "tests/test_mutation_kills_leftovers.py",
        "tests/test_snapshots.py::test_last_digit_float_changes_match",
        "tests/test_snapshots.py::test_a_logprob_beyond_the_tolerance_fails_with_the_step",
        "tests/test_snapshots.py::test_a_changed_token_fails_with_case_step_and_both_tokens",
        "tests/test_snapshots.py::test_the_other_branch_of_a_near_tie_matches_with_a_note",
        "tests/test_snapshots.py::test_changed_text_draft_flags_prompts_and_verdicts_fail",
    ),
    "conformance/validation.py": (
        "tests/test_mutation_kills_validation.py",
        "tests/test_conformance_validation.py",
    ),
}

def names_a_test_file(test: str) -> bool:
    """``test`` is a test file, or a node id (``file::function``) as MODULE_TESTS has."""
    return (ROOT / test.partition("::")[0]).is_file()


# mutmut's statuses: which count as caught, which as not, which are left out of the score.
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
NOT_KILLED = {"survived", "no tests", "suspicious"}


@dataclass
class ModuleScore:
    module: str
    tests: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)  # mutmut status -> mutants
    survivors: list[str] = field(default_factory=list)  # mutant names, not killed
    equivalent: list[str] = field(default_factory=list)  # not killed, recorded as equivalent
    seconds: float = 0.0
    complete: bool = True  # False: stopped by the time budget, the rest not checked
    error: str = ""  # why no score (the tests fail without mutants, say)

    @property
    def killed(self) -> int:
        return sum(n for status, n in self.counts.items() if status in KILLED)

    @property
    def checked(self) -> int:
        """Mutants that ran, less the equivalent ones (no test could kill them)."""
        not_killed = sum(n for s, n in self.counts.items() if s in NOT_KILLED)
        return self.killed + not_killed - len(self.equivalent)

    @property
    def score(self) -> float | None:
        """Percent of the checked non-equivalent mutants that a test killed."""
        return 100.0 * self.killed / self.checked if self.checked else None

    def line(self) -> str:
        if self.error:
            return f"{self.module}: no score ({self.error})"
        partial = "" if self.complete else ", stopped by the time budget"
        equivalent = f", {len(self.equivalent)} of them equivalent" if self.equivalent else ""
        return (
            f"{self.module}: {self.score:.1f}% ({self.killed} of {self.checked} killed; "
            f"{_counts(self.counts)}{equivalent}) in {self.seconds:.0f} s{partial}"
        )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def slug(module: str) -> str:
    return re.sub(r"[^\w]+", "_", module.removesuffix(".py")).strip("_")


# -- the scratch copy -----------------------------------------------------------------------


def mutmut_settings(module: str, tests: tuple[str, ...]) -> dict:
    """The shared [tool.mutmut] table with this module's mutants and tests."""
    shared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return {**shared, "only_mutate": [module], "pytest_add_cli_args_test_selection": list(tests)}


def toml_table(name: str, settings: dict) -> str:
    """A TOML table of strings and lists of strings (all [tool.mutmut] holds)."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return "[" + ", ".join(value(x) for x in v) + "]"

    return f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in settings.items())


def prepare(module: str, tests: tuple[str, ...], work: Path) -> Path:
    """A fresh copy of the project's sources and tests, configured for ``module``."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        shutil.copytree(ROOT / name, work / name, ignore=skip)
    for name in COPIED_FILES:
        shutil.copy2(ROOT / name, work / name)
    # Keep pytest's own settings (markers, testpaths); replace [tool.mutmut] by this run's.
    text = re.sub(
        r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", (work / "pyproject.toml").read_text()
    )
    text += "\n" + toml_table("tool.mutmut", mutmut_settings(module, tests))
    (work / "pyproject.toml").write_text(text)
    return work


# -- equivalent mutants ---------------------------------------------------------------------


@dataclass(frozen=True)
class Equivalent:
    """A survivor no input can tell apart from the original, and why.

    mutmut numbers the mutants of a function in order, so a name alone would point at
    another mutant once the function changes; ``line`` (the mutated line as ``mutmut
    show`` prints it, stripped) must match too, or the record no longer applies.
    """

    mutant: str
    line: str
    why: str


def load_equivalents(path: Path = EQUIVALENTS) -> dict[str, Equivalent]:
    """The ``[[mutant]]`` tables of ``path`` by mutant name."""
    if not path.exists():
        return {}
    tables = tomllib.loads(path.read_text()).get("mutant", [])
    return {t["name"]: Equivalent(t["name"], t["line"].strip(), t["why"]) for t in tables}


def mutated_line(diff: str) -> str:
    """The new side of a one-mutant diff: its ``+`` lines, stripped and joined."""
    added = [
        line[1:].strip()
        for line in diff.splitlines()
        if line.startswith("+") and not line.startswith("+++")
    ]
    return " ".join(added)


def set_aside_equivalents(
    score: ModuleScore, show, equivalents: dict[str, Equivalent]
) -> list[str]:
    """Move the survivors recorded as equivalent from ``score.survivors`` to
    ``score.equivalent``; ``show(name)`` gives a mutant's diff. Returns the records whose
    line no longer matches their mutant (stale: the function changed)."""
    stale = []
    for name in [n for n in score.survivors if n in equivalents]:
        if mutated_line(show(name)) == equivalents[name].line:
            score.survivors.remove(name)
            score.equivalent.append(name)
        else:
            stale.append(name)
    return stale


# -- running mutmut -------------------------------------------------------------------------


def mutmut(work: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run mutmut in ``work``; on ``timeout`` end it with every worker it forked (its own
    process group), then raise ``subprocess.TimeoutExpired``."""
    command = ["nice", "-n", "10", sys.executable, "-m", "mutmut", *args]
    with subprocess.Popen(
        command,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def parse_results(text: str) -> dict[str, str]:
    """``mutmut results --all true`` lines ``    name: status`` -> {name: status}."""
    found = {}
    for line in text.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            found[name] = status
    return found


def score_module(
    module: str,
    budget: float | None = None,
    tests: tuple[str, ...] | None = None,
    workers: int = WORKERS,
) -> ModuleScore:
    """Run mutmut on ``module`` in its scratch copy; stop after ``budget`` seconds.
    ``tests`` replaces the module's MODULE_TESTS (to measure a subset, say)."""
    tests = tests or tests_for(module)
    work = prepare(module, tests, WORK / slug(module))
    result = ModuleScore(module, tests)
    start = time.monotonic()
    try:
        run = mutmut(work, "run", "--max-children", str(workers), timeout=budget)
        if run.returncode != 0:
            result.error = _failure(run.stdout + run.stderr)
    except subprocess.TimeoutExpired:
        result.complete = False
    result.seconds = time.monotonic() - start
    statuses = parse_results(mutmut(work, "results", "--all", "true").stdout)
    for status in statuses.values():
        result.counts[status] = result.counts.get(status, 0) + 1
    result.survivors = sorted(n for n, s in statuses.items() if s in NOT_KILLED)
    stale = set_aside_equivalents(
        result, lambda name: mutmut(work, "show", name).stdout, load_equivalents()
    )
    for name in stale:
        print(f"  {EQUIVALENTS.name}: {name} is now another mutant; its record no longer applies")
    if not result.checked and not result.error:
        result.error = "no mutant was checked"
    elif result.checked:
        result.error = ""  # mutmut exits non-zero when mutants survive
    return result


def _failure(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "mutmut failed"


def write_survivors(score: ModuleScore, limit: int = 300) -> Path:
    """Every survivor's diff (``mutmut show``) in ``.mutation/<module>/survivors.diff``."""
    work = WORK / slug(score.module)
    parts = [f"# {name}\n{mutmut(work, 'show', name).stdout}" for name in score.survivors[:limit]]
    path = work / "survivors.diff"
    path.write_text("\n".join(parts))
    return path


# -- which modules ---------------------------------------------------------------------------


def changed_modules(base: str) -> list[str]:
    """Modules of MODULE_TESTS whose source or tests differ from ``base`` (commits since it,
    and uncommitted changes)."""
    names = subprocess.run(
        ["git", "diff", "--name-only", base], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    changed = set(names)
    return [
        module
        for module, tests in MODULE_TESTS.items()
        if any(_matches(module, name) for name in changed) or changed & set(tests)
    ]


def git_revision(text: str) -> str:
    """``--changed BASE``: a revision git knows (a typo would otherwise mutate nothing)."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{text}^{{commit}}"],
                           cwd=ROOT, capture_output=True, text=True, check=False)
    if not text.strip() or found.returncode != 0:
        raise ValueError(f"{text!r}: not a commit of this repository")
    return text


def tests_for(module: str) -> tuple[str, ...] | None:
    """The MODULE_TESTS entry of ``module``, or of the glob key that covers it."""
    if module in MODULE_TESTS:
        return MODULE_TESTS[module]
    return next((t for key, t in MODULE_TESTS.items() if _matches(key, module)), None)


def _matches(module: str, path: str) -> bool:
    if module.endswith("*"):
        return path.startswith(module[:-1]) and path.endswith(".py")
    return path == module


# -- the history -----------------------------------------------------------------------------


def record(scores: list[ModuleScore], db: Path) -> int:
    """Store the scores as one run of the benchmark history; returns its id."""
    from benchmarks import fingerprint, revision
    from benchmarks.history import History

    version = mutmut_version()
    with History(db) as history:
        run_id = history.start_run(
            revision.current(ROOT),
            fingerprint.collect({"mutmut": version}),
            settings={"model": "-", "tool": f"mutmut {version}", "modules": len(scores)},
            source="mutation",
        )
        for s in scores:
            if s.score is None:
                continue
            settings = {"tests": list(s.tests), "complete": s.complete, **s.counts}
            settings["equivalent"] = len(s.equivalent)
            history.add_trial(run_id, 0, "mutmut", "-", s.module, {METRIC: s.score}, settings)
        history.finish_run(run_id)
    return run_id


def mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


# -- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="python -m benchmarks.mutation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "modules",
        nargs="*",
        help="modules (keys of MODULE_TESTS, or files a glob key covers); default all",
    )
    parser.add_argument(
        "--changed",
        metavar="BASE",
        type=arg_type(git_revision, "revision"),
        help="only the modules whose source or tests differ from git BASE",
    )
    parser.add_argument(
        "--budget",
        type=arg_type(seconds, "seconds"),
        default=None,
        help="seconds for the whole run; a module still running then is scored "
        "on the mutants checked so far, later ones are skipped",
    )
    parser.add_argument("--db", type=Path, default=ROOT / ".lmconform" / "history.sqlite")
    parser.add_argument("--no-history", action="store_true", help="do not store the scores")
    parser.add_argument(
        "--tests", nargs="+", help="run these test files instead of the modules' MODULE_TESTS"
    )
    parser.add_argument(
        "--min-score",
        type=arg_type(number(float, 0, 100, what="a percentage"), "percentage"),
        default=0.0,
        help="exit 1 if a module scores below this percentage",
    )
    args = parser.parse_args(argv)

    try:
        distinct("module", args.modules)
    except ValueError as error:
        parser.error(str(error))
    for module in args.modules:
        if tests_for(module) is None:
            parser.error(f"{module}: not in MODULE_TESTS{did_you_mean(module, MODULE_TESTS)}; "
                         f"choose from {', '.join(MODULE_TESTS)}")
    for test in args.tests or []:
        if not names_a_test_file(test):
            parser.error(f"--tests {test}: no such file")
    modules = args.modules or list(MODULE_TESTS)
    if args.changed:
        modules = [m for m in changed_modules(args.changed) if m in modules]
        print(f"modules changed since {args.changed}: {', '.join(modules) or 'none'}")
    deadline = time.monotonic() + args.budget if args.budget else None

    scores = []
    for module in modules:
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left < 30:
            print(f"{module}: skipped (time budget spent)")
            continue
        tests = tuple(args.tests) if args.tests else tests_for(module)
        print(f"{module}: mutating ({', '.join(tests)}) ...", flush=True)
        score = score_module(module, left, tests)
        # One `mutmut show` per survivor takes a second or more: not on borrowed time.
        if score.survivors and (deadline is None or deadline - time.monotonic() > 120):
            write_survivors(score)
        scores.append(score)
        print("  " + score.line(), flush=True)

    if scores and not args.no_history:
        print(f"stored as run {record(scores, args.db)} in {args.db} (lmconform bench show)")
    low = [s for s in scores if s.score is not None and s.score < args.min_score]
    for s in low:
        print(f"below {args.min_score:g}%: {s.line()}")
    errors = [s for s in scores if s.error]
    return 1 if low or errors else 0


if __name__ == "__main__":
    sys.exit(main())
