"""The pytest plugin: cheap to load, namespaced options, inert without --lmconform-engine, the
CLI's verdicts, near-ties in the terminal summary."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from child_process import child_env

ROOT = Path(__file__).resolve().parents[1]
CASES = "greedy/hello,stopping/max_tokens_exact,batch/needle,sampling/top_k"


def run(args, tmp_path):
    env = child_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def plugin_args() -> list[str]:
    """Load the plugin explicitly only where the pytest11 entry point is not installed."""
    installed = any(
        ep.value == "conformance.pytest_plugin"
        for ep in importlib.metadata.entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "conformance.pytest_plugin"]


def test_loading_the_plugin_imports_no_engine():
    heavy = ("mlx", "numpy", "torch", "transformers", "reference")
    code = (
        "import sys, conformance.pytest_plugin; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_every_option_is_namespaced(tmp_path):
    """Each option the plugin adds starts with --lmconform- (no clash with --profile & co.)."""
    from conformance import pytest_plugin

    result = run(["-m", "pytest", "--help", "-p", "no:cacheprovider", *plugin_args()], tmp_path)
    assert result.returncode == 0, result.stderr
    group = result.stdout.split("lmconform conformance suite:")[1].split("\n\n")[0]
    options = [line.split()[0].split("=")[0] for line in group.splitlines() if line[:3] == "  -"]
    constants = [v for k, v in vars(pytest_plugin).items() if k.startswith("OPTION_")]
    assert sorted(options) == sorted(constants)
    assert all(o.startswith("--lmconform-") for o in constants) and len(constants) == 6
    old = run(["-m", "pytest", "--engine", "reference", *plugin_args()], tmp_path)
    assert old.returncode == 4 and "unrecognized arguments: --engine" in old.stderr


def test_without_engine_the_conformance_package_collects_nothing(tmp_path):
    result = run(
        ["-m", "pytest", "--pyargs", "conformance", "-p", "no:cacheprovider", *plugin_args()],
        tmp_path,
    )
    assert result.returncode == 5, result.stdout + result.stderr  # 5: no tests collected
    assert "no tests ran" in result.stdout


def test_pytest_gives_the_same_verdicts_as_the_cli(tmp_path):
    engines = ["reference", "mutants:TopKOffByOne", "conformance_helpers:GreedyOnlyEngine"]
    pytest_run = run(
        [
            "-m",
            "pytest",
            "--pyargs",
            "conformance",
            "-p",
            "no:cacheprovider",
            *plugin_args(),
            *[arg for engine in engines for arg in ("--lmconform-engine", engine)],
            "--lmconform-model",
            "dummy",
            "--lmconform-cases",
            CASES,
            "--junitxml",
            str(tmp_path / "p.xml"),
            "-q",
        ],
        tmp_path,
    )
    assert pytest_run.returncode == 1, pytest_run.stdout[-3000:] + pytest_run.stderr[-3000:]
    cli_args = [arg for engine in engines for arg in ("--engine", engine)]
    cli_args += ["--model", "dummy", "--cases", CASES, "--json", str(tmp_path / "c.json")]
    cli_run = run(["-m", "lmconform.cli", "check", *cli_args], tmp_path)
    assert cli_run.returncode == 1, cli_run.stderr[-3000:]

    outcome = {"pass": "passed", "near-tie": "passed", "fail": "failed", "unsupported": "skipped"}
    engine_names = {
        "reference": "reference",
        "mutant-top-k": "mutants:TopKOffByOne",
        "greedy-only": "conformance_helpers:GreedyOnlyEngine",
    }
    from_cli = {
        f"{engine_names[r['engine']]}@dummy:{r['case_id']}": outcome[r["verdict"]]
        for r in json.loads((tmp_path / "c.json").read_text())["results"]
    }
    from_pytest = {}
    for case in ET.parse(tmp_path / "p.xml").getroot().iter("testcase"):
        test_id = case.get("name")[len("test_case[") : -1]
        failed = case.find("failure") is not None or case.find("error") is not None
        from_pytest[test_id] = (
            "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
        )
    assert from_pytest == from_cli
    assert len(from_cli) == 12
    assert from_cli["mutants:TopKOffByOne@dummy:sampling/top_k"] == "failed"
    assert from_cli["conformance_helpers:GreedyOnlyEngine@dummy:batch/needle"] == "skipped"
    assert "top_k 5 allows 5 tokens" in pytest_run.stdout


def test_near_ties_pass_and_are_listed_in_the_terminal_summary(tmp_path):
    """``NoisyLogits`` (tests/mutants.py) flips the reference's 0.00045-nat near-tie at step 5
    of resumption/near_tie; greedy/hello has no near-tie and passes plainly."""
    result = run(
        [
            "-m",
            "pytest",
            "--pyargs",
            "conformance",
            "-p",
            "no:cacheprovider",
            *plugin_args(),
            "--lmconform-engine",
            "mutants:NoisyLogits",
            "--lmconform-model",
            "dummy",
            "--lmconform-cases",
            "resumption/near_tie,greedy/hello",
            "--junitxml",
            str(tmp_path / "p.xml"),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.split("lmconform: 1 near-tie(s) (passed)")[1]
    assert "mutants:NoisyLogits@dummy:resumption/near_tie" in summary
    assert "near-tie: resumption/near_tie on" in summary and "step 5" in summary
    assert "greedy/hello" not in summary
    verdicts = {
        case.get("name").split(":")[-1].rstrip("]"): case.find("properties/property").get("value")
        for case in ET.parse(tmp_path / "p.xml").getroot().iter("testcase")
    }
    assert verdicts == {"resumption/near_tie": "near-tie", "greedy/hello": "pass"}
