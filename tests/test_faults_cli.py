"""Faults at the command line: each bad input is exit 2 with a one-line message naming the
option, found before any case runs (no report written); an internal error is exit 3 with
the traceback on file; a stopped run still writes the reports of its finished cases.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
from test_faults_sweep import replacing

from conformance import runner
from lmconform.cli import main

PYTHON = shlex.quote(sys.executable)
FAULTY = f"{PYTHON} -m conformance.examples.faulty_engines"
CHECK = ["check", "--engine", "mutants:Control", "--model", "dummy", "--cases", "greedy/hello"]


def run(argv, capsys):
    """``main(argv)``'s exit status and stderr; argparse's own errors exit through SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as exit:
        rc = exit.code
    out, err = capsys.readouterr()
    return rc, out, err


CHECK_ERRORS = {
    "unknown model": (["--model", "nosuch"], "--model 'nosuch': no case"),
    "case pattern matching nothing": (["--cases", "greedy/nosuch"], "matches no case"),
    "empty case pattern": (["--cases", " , "], "no pattern given"),
    "NaN timeout": (["--timeout", "nan"], "--timeout: expected seconds"),
    "negative timeout": (["--timeout", "-1"], "--timeout: expected seconds"),
    "absurd timeout": (["--timeout", "1e12"], "--timeout: expected seconds"),
    "unknown profile": (["--profile", "fp7"], "--profile: unknown precision profile"),
    "unknown engine": (["--engine", "nosuch"], "--engine nosuch: unknown engine"),
    "unimportable engine": (["--engine", "no_such_module:Engine"], "cannot import"),
    "empty cmd engine": (["--engine", "cmd:"], "needs a command line"),
    "missing cmd program": (["--engine", "cmd:/no/such/engine"], "command not found"),
    "unknown engine option": (["--engine", "mutants:Control:bogus=1"], "has no option bogus"),
    "against a missing folder": (["--against", "/no/such/folder"], "is neither"),
}


@pytest.mark.parametrize("error", list(CHECK_ERRORS))
def test_a_bad_check_option_is_exit_2_before_any_case(error, capsys, tmp_path):
    extra, message = CHECK_ERRORS[error]
    report = tmp_path / "r.json"
    rc, out, err = run([*replacing(CHECK, extra), "--json", str(report)], capsys)
    assert rc == 2
    assert message in err and len(err.strip().splitlines()[-1]) < 400
    assert "Traceback" not in err and not report.exists() and out == ""


@pytest.mark.parametrize(
    ("reports", "message"),
    [
        (["--json", "{tmp}/no/such/folder/r.json"], "does not exist"),
        (["--junit", "{tmp}"], "is a folder, not a file"),
        (["--json", "{tmp}/r.out", "--markdown", "{tmp}/r.out"], "the same file as --json"),
    ],
)
def test_an_unwritable_report_path_is_exit_2_before_any_case(reports, message, capsys, tmp_path):
    reports = [r.format(tmp=tmp_path) for r in reports]
    rc, out, err = run([*CHECK, *reports], capsys)
    assert rc == 2 and message in err and out == ""


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LMCONFORM_CMD_REQUEST_TIMEOUT", "soon"), ("LMCONFORM_CMD_START_TIMEOUT", "0")],
)
def test_a_bad_environment_setting_is_exit_2_naming_it(variable, value, monkeypatch, capsys):
    monkeypatch.setenv(variable, value)
    rc, out, err = run([*CHECK[:1], "--engine", f"cmd:{FAULTY} garbage", *CHECK[3:]], capsys)
    assert rc == 2 and f"{variable}={value!r}" in err and out == ""


GENERATE_ERRORS = {
    "temp nan": (["--temp", "nan"], "argument --temp: 'nan' is not in"),
    "negative temp": (["--temp", "-1"], "argument --temp"),
    "top-p above 1": (["--top-p", "1.5"], "argument --top-p"),
    "min-p nan": (["--min-p", "nan"], "argument --min-p"),
    "zero max tokens": (["--max-tokens", "0"], "argument --max-tokens"),
    "absurd max tokens": (["--max-tokens", "10000000000"], "argument --max-tokens"),
    "negative seed": (["--seed", "-1"], "argument --seed"),
    "no draft tokens": (["--num-draft-tokens", "0"], "argument --num-draft-tokens"),
    "top-k as text": (["--top-k", "five"], "argument --top-k: expected int"),
    "top-k beyond the vocabulary": (["--temp", "1", "--top-k", "300"], "--top-k: top_k must be"),
}


@pytest.mark.parametrize("error", list(GENERATE_ERRORS))
def test_a_bad_generate_option_is_exit_2(error, capsys):
    extra, message = GENERATE_ERRORS[error]
    rc, out, err = run(replacing(["generate", "--model", "dummy", "--max-tokens", "2"], extra), capsys)
    assert rc == 2 and message in err and out == ""


SNAPSHOT_ERRORS = {
    "unknown model": (["--model", "nosuch"], "--model 'nosuch'"),
    "case pattern matching nothing": (["--cases", "nosuch"], "matches no case"),
    "infinite timeout": (["--timeout", "inf"], "--timeout: expected seconds"),
    "out under a file": (["--out", "{file}/snaps"], "is not a folder"),
    "unknown engine": (["--engine", "nosuch"], "--engine nosuch"),
}


@pytest.mark.parametrize("error", list(SNAPSHOT_ERRORS))
def test_a_bad_snapshot_option_is_exit_2(error, capsys, tmp_path):
    extra, message = SNAPSHOT_ERRORS[error]
    (tmp_path / "file").write_text("")
    extra = [e.format(file=tmp_path / "file") for e in extra]
    argv = replacing(["snapshot", "--out", str(tmp_path / "out"), "--cases", "greedy/hello"], extra)
    rc, _, err = run(argv, capsys)
    assert rc == 2 and message in err and not (tmp_path / "out").exists()


def test_an_internal_error_is_exit_3_with_the_traceback_on_file_and_reports_kept(
    monkeypatch, capsys, tmp_path
):
    def broken_run_matrix(*args, progress, **kwargs):
        from conformance.catalogue import load_cases

        case = next(c for c in load_cases() if c.id == "greedy/hello")
        finished = runner.CaseResult(case.id, "control", "dummy", "fp32", "pass", case.about)
        progress("control", "dummy", 0, 2, case, finished)  # one case finished, then a bug
        raise RuntimeError("a bug in lmconform")

    monkeypatch.setattr(runner, "run_matrix", broken_run_matrix)
    monkeypatch.setenv("LMCONFORM_CRASH_DIR", str(tmp_path / "crashes"))
    paths = {kind: tmp_path / f"r.{kind}" for kind in ("json", "md", "xml")}
    rc, _, err = run(
        [
            *CHECK,
            "--json",
            str(paths["json"]),
            "--markdown",
            str(paths["md"]),
            "--junit",
            str(paths["xml"]),
        ],
        capsys,
    )
    assert rc == 3 and "internal error (RuntimeError: a bug in lmconform)" in err
    [crash] = (tmp_path / "crashes").iterdir()
    assert str(crash) in err and "RuntimeError: a bug in lmconform" in crash.read_text()
    data = json.loads(paths["json"].read_text())
    assert [r["case_id"] for r in data["results"]] == ["greedy/hello"]
    assert "stopped early" in data["meta"]["stopped"]
    assert "greedy/hello" in paths["md"].read_text()
    assert ET.parse(paths["xml"]).getroot().find(".//testcase").get("name") == "greedy/hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashes", "r.json", "r.md", "r.xml"]


def test_nothing_checked_is_not_a_success(capsys):
    rc, _, err = run(
        [
            "check",
            "--engine",
            "conformance_helpers:GreedyOnlyEngine",
            "--model",
            "dummy",
            "--cases",
            "batch/needle",
        ],
        capsys,
    )
    assert rc == 2 and "no case was checked" in err


def test_exit_codes_are_documented_in_help(capsys):
    for command in (["check"], ["snapshot"], ["generate"], []):
        rc, out, _ = run([*command, "--help"], capsys)
        assert rc == 0 and "exit status:" in out and "internal error" in out


def test_sigterm_stops_the_engines_and_writes_the_reports_it_has(tmp_path):
    pid_file = tmp_path / "pids"
    report = tmp_path / "r.json"
    command = [
        sys.executable,
        "-m",
        "lmconform.cli",
        "check",
        "--engine",
        f"cmd:{FAULTY} sleep-forever",
        "--model",
        "dummy",
        "--against",
        "snapshots",
        "--cases",
        "greedy/hello,greedy/fox",
        "--json",
        str(report),
    ]
    env = os.environ | {"LMCONFORM_FAULTY_PID_FILE": str(pid_file)}
    suite = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        end = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(3)  # the engine loads its model, then sleeps on the first request
        engine_pid = int(pid_file.read_text().split()[0])
        suite.send_signal(signal.SIGTERM)
        _, err = suite.communicate(timeout=30)
    finally:
        suite.kill()
    assert suite.returncode == 143 and "stopped by SIGTERM" in err
    assert "stopped early" in json.loads(report.read_text())["meta"]["stopped"]
    with pytest.raises(ProcessLookupError):
        os.killpg(engine_pid, 0)
