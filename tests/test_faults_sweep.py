"""A sweep of wrong inputs over every command, one test per class of fault, each parametrized
over the commands that share it: a repeated option, an empty value, a near-miss name, a
number out of range, options that contradict each other, an unusable output file, a bad
engine option value, a bad LMCONFORM_* variable. Each is exit status 2 with one line naming
the input, found before any work starts (no case run, no history written, no file exported);
never 0, never a traceback (3 is for lmconform's own bugs).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmconform.cli import main

CHECK = ["check", "--engine", "reference", "--model", "dummy", "--cases", "greedy/hello"]
AGREE = ["agree", "--engine", "reference", "--model", "dummy", "--no-history"]
BENCH = ["bench", "run", "--engines", "synthetic", "--model", "synthetic",
         "--workloads", "decode-16", "--trials", "1", "--no-bandwidth"]
GENERATE = ["generate", "--model", "dummy", "--max-tokens", "2"]
SERVE = ["serve", "--model", "no-such-model"]  # were it parsed, it would fail to load, not serve


def replacing(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with the options that ``extra`` gives again dropped (a repeated single-valued
    option is itself a usage error)."""
    given = {word for word in extra if word.startswith("-")}
    kept, words = [], iter(base)
    for word in words:
        if word in given:
            next(words)
            continue
        kept.append(word)
    return [*kept, *extra]


@pytest.fixture
def where(tmp_path, monkeypatch):
    """A fresh folder as the current one (an empty path must not write here), a file in it,
    and the history a bench command would create there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    return tmp_path


def run(argv, capsys, where) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``lmconform ARGV`` (``{dir}`` is the fresh folder);
    the history bench would write is in the fresh folder."""
    argv = [word.format(dir=where) for word in argv]
    if argv[0] == "bench" and "--db" not in argv:
        argv += ["--db", str(where / "history.sqlite")]
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's usage errors
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def refused_before_work(status, out, err, where, *needles: str, before=("a-file", "a-folder")):
    """Exit 2, the last line of stderr names the fault, and nothing ran or was written (the
    fresh folder holds what it held ``before``)."""
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if last.startswith("lmconform check: exit status"):
        last = err.strip().splitlines()[-2]
    assert status == 2, err
    assert all(needle in last for needle in needles), err
    assert "Traceback" not in err and out == ""
    assert "pass (" not in err and "trial 1/1" not in err and "@ dummy ..." not in err
    left = sorted(p.name for p in where.iterdir())
    assert left == sorted(before), f"written before the fault was found: {left}"


REPEATED = {
    "check --json": [*CHECK, "--json", "{dir}/a.json", "--json", "{dir}/b.json"],
    "check --profile": [*CHECK, "--profile", "fp32", "--profile", "fp16"],
    "snapshot --out": ["snapshot", "--model", "dummy", "--cases", "greedy/hello",
                       "--out", "{dir}/one", "--out", "{dir}/two"],
    "agree --top": [*AGREE, "--top", "5", "--top", "6"],
    "bench run --trials": [*BENCH, "--trials", "2"],
    "bench compare --alpha": ["bench", "compare", "--alpha", "0.05", "--alpha", "0.01"],
    "generate --max-tokens": [*GENERATE, "--max-tokens", "3"],
    "serve --port": [*SERVE, "--port", "8080", "--port", "8081"],
}


@pytest.mark.parametrize("command", list(REPEATED))
def test_a_single_valued_option_given_twice_is_refused(command, capsys, where):
    """argparse keeps the last value silently: a typo'd command line would run another
    configuration than the one its author reads."""
    refused_before_work(*run(REPEATED[command], capsys, where), where, "given twice")


REPEATED_VALUES = {
    "check --engine": ([*CHECK, "--engine", "reference"], "--engine reference: given twice"),
    "check --model": ([*CHECK, "--model", "dummy"], "--model dummy: given twice"),
    "agree --engine": ([*AGREE, "--engine", "reference"], "--engine reference: given twice"),
}


@pytest.mark.parametrize("command", list(REPEATED_VALUES))
def test_a_repeatable_option_given_the_same_value_twice_is_refused(command, capsys, where):
    argv, message = REPEATED_VALUES[command]
    refused_before_work(*run(argv, capsys, where), where, message)


EMPTY = {
    "check --profile": [*CHECK, "--profile", ""],
    "check --against": [*CHECK, "--against", ""],
    "check --json": [*CHECK, "--json", ""],
    "snapshot --out": ["snapshot", "--model", "dummy", "--cases", "greedy/hello", "--out", ""],
    "agree --markdown": [*AGREE, "--markdown", ""],
    "bench run --db": [*BENCH, "--db", ""],
    "generate --model": ["generate", "--model", "", "--max-tokens", "2"],
    "models export DIR": ["models", "export", "dummy", ""],
}


@pytest.mark.parametrize("command", list(EMPTY))
def test_an_empty_value_is_refused_not_taken_as_the_current_folder_or_a_default(
    command, capsys, where
):
    """``''`` as a path is the current folder (a snapshot or an export written there), and
    as a profile it read as "none given"."""
    status, out, err = run(EMPTY[command], capsys, where)
    refused_before_work(status, out, err, where)
    assert "empty" in err or "unknown precision profile ''" in err


NEAR_MISSES = {
    "check --engine": ([*CHECK, "--engine", "refrence"], "reference"),
    "check --model": (["check", "--model", "dumy"], "dummy"),
    "check --profile": ([*CHECK, "--profile", "fp33"], "fp32"),
    "check --against": ([*CHECK, "--against", "snapshot"], "snapshots"),
    "snapshot --model": (["snapshot", "--model", "dumy", "--out", "{dir}/s"], "dummy"),
    "agree --model": (["agree", "--engine", "reference", "--model", "dumy", "--no-history"],
                      "dummy"),
    "bench --engines": (["bench", "--engines", "refrence"], "reference"),
    "bench --model": (["bench", "--engines", "synthetic", "--model", "dumy"], "dummy"),
    "bench --workloads": (["bench", "--engines", "synthetic", "--workloads", "decod-16"],
                          "decode-16"),
    "bench compare --format": (["bench", "compare", "--format", "jsn"], "json"),
    "generate --model": (["generate", "--model", "dumy"], "dummy"),
    "a command": (["chek"], "check"),
}


@pytest.mark.parametrize("command", list(NEAR_MISSES))
def test_an_unknown_name_is_refused_with_the_closest_known_one(command, capsys, where):
    argv, closest = NEAR_MISSES[command]
    refused_before_work(*run(argv, capsys, where), where, f"did you mean {closest!r}?")


NUMBERS = {
    "check -j huge": ([*CHECK, "-j", "1000000"], "-j/--jobs"),
    "agree --positions huge": ([*AGREE, "--positions", "1000000000000"], "--positions"),
    "bench slowdown NaN": (replacing(BENCH, ["--engines", "synthetic:slowdown=nan"]), "slowdown"),
    "bench --time-budget NaN": ([*BENCH, "--time-budget", "nan"], "--time-budget"),
    "bench --time-budget 0": ([*BENCH, "--time-budget", "0"], "--time-budget"),
    "bench --seed negative": ([*BENCH, "--seed", "-1"], "--seed"),
    "bench --target-width 0": ([*BENCH, "--target-width", "0"], "--target-width"),
    "serve --port beyond 65535": ([*SERVE, "--port", "70000"], "--port"),
    "serve --port negative": ([*SERVE, "--port", "-1"], "--port"),
}


@pytest.mark.parametrize("command", list(NUMBERS))
def test_a_number_out_of_range_or_not_finite_is_refused(command, capsys, where):
    argv, option = NUMBERS[command]
    refused_before_work(*run(argv, capsys, where), where, option)


ENGINE_OPTIONS = {
    "check, openai timeout NaN": ["check", "--model", "dummy", "--cases", "greedy/hello",
                                  "--engine", "openai:http://127.0.0.1:9/v1:timeout=nan"],
    "check, openai chat=yes": ["check", "--model", "dummy", "--cases", "greedy/hello",
                               "--engine", "openai:http://127.0.0.1:9/v1:chat=yes"],
    "check, openai api_key_env unset": [
        "check", "--model", "dummy", "--cases", "greedy/hello",
        "--engine", "openai:http://127.0.0.1:9/v1:api_key_env=LMCONFORM_TEST_NO_SUCH_KEY",
    ],
    "agree, openai timeout -1": ["agree", "--model", "dummy", "--no-history",
                                 "--engine", "openai:http://127.0.0.1:9/v1:timeout=-1"],
    "snapshot, openai top_logprobs=2": [
        "snapshot", "--model", "dummy", "--cases", "greedy/hello", "--out", "{dir}/s",
        "--engine", "openai:http://127.0.0.1:9/v1:top_logprobs=2",
    ],
    "bench, synthetic step_ms NaN": replacing(BENCH, ["--engines", "synthetic:step_ms=nan"]),
}


@pytest.mark.parametrize("command", list(ENGINE_OPTIONS))
def test_an_engine_option_value_is_checked_before_the_engine_opens(command, capsys, where):
    """The engine's own options, checked from its ``option_checks`` by the registry: before
    this, a bad value surfaced mid-run as a failed case (exit 1) or not at all."""
    refused_before_work(*run(ENGINE_OPTIONS[command], capsys, where), where, "option")


CONTRADICTIONS = {
    "agree --db with --no-history": ([*AGREE, "--db", "{dir}/h.sqlite"], "--no-history"),
    "bench show --metric without --changes": (["bench", "show", "--metric", "decode_tps"],
                                              "only with --changes"),
    "bench run options before show": (["bench", "--trials", "3", "show"], "only with bench run"),
    "generate --top-p at temperature 0": ([*GENERATE, "--top-p", "0.9"], "--temp"),
    "generate --num-draft-tokens without a draft": ([*GENERATE, "--num-draft-tokens", "3"],
                                                    "--draft-model"),
}


@pytest.mark.parametrize("command", list(CONTRADICTIONS))
def test_options_that_would_be_ignored_silently_are_refused(command, capsys, where):
    argv, message = CONTRADICTIONS[command]
    refused_before_work(*run(argv, capsys, where), where, message)


OUTPUTS = {
    "check --junit a folder": [*CHECK, "--junit", "{dir}/a-folder"],
    "agree --json under a file": [*AGREE, "--json", "{dir}/a-file/r.json"],
    "bench run --markdown a folder": [*BENCH, "--markdown", "{dir}/a-folder"],
    "bench run --markdown under a file": [*BENCH, "--markdown", "{dir}/a-file/x.md"],
    "bench plot --out a folder": ["bench", "plot", "--metric", "decode_tps",
                                  "--out", "{dir}/a-folder"],
}


@pytest.mark.parametrize("command", list(OUTPUTS))
def test_an_output_file_that_cannot_be_written_is_refused_before_any_work(
    command, capsys, where
):
    """Before this, bench measured for minutes and then crashed (exit 3) on its --markdown,
    and plot wrote its PNG next to the folder it was given."""
    if command.startswith("bench plot"):  # a history with the metric, as plot needs
        assert run(BENCH, capsys, where)[0] == 0
    before = [p.name for p in where.iterdir()]
    refused_before_work(*run(OUTPUTS[command], capsys, where), where, str(where), before=before)


ENVIRONMENT = {
    "LMCONFORM_BLAS=mkl, check": ("LMCONFORM_BLAS", "mkl", CHECK),
    "LMCONFORM_BLAS_THREADS=two, generate": ("LMCONFORM_BLAS_THREADS", "two", GENERATE),
    "LMCONFORM_TORCH_THREADS=0, agree": ("LMCONFORM_TORCH_THREADS", "0", AGREE),
    "LMCONFORM_HOME=a file, snapshot": (
        "LMCONFORM_HOME", "{dir}/a-file",
        ["snapshot", "--model", "dummy", "--cases", "greedy/hello", "--out", "{dir}/s"],
    ),
    "LMCONFORM_CMD_TOTAL_TIMEOUT=nan, bench": ("LMCONFORM_CMD_TOTAL_TIMEOUT", "nan", BENCH),
    "LMCONFORM_CMD_REQUEST_TIMEOUT=-1, check": ("LMCONFORM_CMD_REQUEST_TIMEOUT", "-1", CHECK),
}


@pytest.mark.parametrize("case", list(ENVIRONMENT))
def test_a_bad_environment_value_is_refused_by_every_command(case, capsys, where, monkeypatch):
    """Checked when the command starts, whether or not this run would have read it: before
    this, a bad value was ignored until an engine that reads it was opened, mid-run."""
    variable, value, argv = ENVIRONMENT[case]
    monkeypatch.setenv(variable, value.format(dir=where))
    refused_before_work(*run(argv, capsys, where), where, f"environment variable {variable}=")


PLUGIN = {
    "engine": (["--lmconform-engine", "refrence"], "did you mean 'reference'?"),
    "engine option": (["--lmconform-engine", "reference:bogus=1"], "has no option bogus"),
    "model": (["--lmconform-engine", "reference", "--lmconform-model", "dumy"],
              "did you mean 'dummy'?"),
    "case pattern": (["--lmconform-engine", "reference", "--lmconform-cases", "greedy/helo"],
                     "matches no case"),
    "profile": (["--lmconform-engine", "reference", "--lmconform-profile", "fp33"],
                "did you mean 'fp32'?"),
    "against": (["--lmconform-engine", "reference", "--lmconform-against", "nowhere"],
                "is neither"),
}


@pytest.mark.parametrize("option", list(PLUGIN))
def test_the_pytest_plugin_refuses_a_bad_option_before_collecting(option, tmp_path):
    """pytest's usage error (exit status 4), not tests skipped or deselected one by one."""
    argv, message = PLUGIN[option]
    if "--lmconform-model" not in argv:
        argv = [*argv, "--lmconform-model", "dummy"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs", "conformance",
         *argv, "-q"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
    )
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert message in result.stderr and "passed" not in result.stdout


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--repetitions", "-1"], "--repetitions"),
        (["--slowdowns", "0,abc"], "--slowdowns"),
        (["--engine", "synthetic:step_ms=nan"], "option step_ms"),
        (["--model", "dumy"], "did you mean 'dummy'?"),
    ],
)
def test_the_power_study_refuses_a_bad_option_before_measuring(argv, option, capsys, where):
    """``python -m benchmarks.power``: before, -1 repetitions exited 0 having measured nothing
    and a bad slowdown was a traceback."""
    from benchmarks import power

    with pytest.raises(SystemExit) as exit:
        power.main(argv)
    out, err = capsys.readouterr()
    refused_before_work(exit.value.code, out, err, where, option)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``dummy`` as a Hugging Face folder, to spoil copies of."""
    folder = tmp_path_factory.mktemp("export") / "dummy"
    assert main(["models", "export", "dummy", str(folder)]) == 0
    return folder


@pytest.mark.parametrize("value", [-5, 0, 2.5, "64"])
@pytest.mark.parametrize("command", ["generate", "serve", "models export"])
def test_a_model_folder_with_an_unusable_size_is_named_by_every_loading_command(
    command, value, exported, capsys, where
):
    """Before, a negative hidden_size surfaced as "math domain error" (naming nothing)."""
    import json
    import shutil

    spoiled = where.parent / f"spoiled-{where.name}"
    shutil.copytree(exported, spoiled)
    config = json.loads((spoiled / "config.json").read_text())
    (spoiled / "config.json").write_text(json.dumps({**config, "hidden_size": value}))
    argv = {
        "generate": ["generate", "--model", str(spoiled), "--max-tokens", "2"],
        "serve": ["serve", "--model", str(spoiled), "--port", "0"],
        "models export": ["models", "export", str(spoiled), "{dir}/out"],
    }[command]
    refused_before_work(*run(argv, capsys, where), where, "hidden_size must be a positive")
