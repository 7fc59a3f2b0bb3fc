"""The pytest plugin: cheap to load, inert without --engine, same verdicts as the CLI."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = "greedy/hello,stopping/max_tokens_exact,batch/needle,sampling/top_k"


def run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
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


def test_without_engine_the_conformance_package_collects_nothing(tmp_path):
    result = run(
        ["-m", "pytest", "--pyargs", "conformance", "-p", "no:cacheprovider", *plugin_args()],
        tmp_path,
    )
    assert result.returncode == 5, result.stdout + result.stderr  # 5: no tests collected
    assert "no tests ran" in result.stdout


def test_pytest_gives_the_same_verdicts_as_the_cli(tmp_path):
    engines = [
        "--engine",
        "reference",
        "--engine",
        "mutants:TopKOffByOne",
        "--engine",
        "conformance_helpers:GreedyOnlyEngine",
    ]
    common = [*engines, "--model", "dummy", "--cases", CASES]
    pytest_run = run(
        [
            "-m",
            "pytest",
            "--pyargs",
            "conformance",
            "-p",
            "no:cacheprovider",
            *plugin_args(),
            *common,
            "--junitxml",
            str(tmp_path / "p.xml"),
            "-q",
        ],
        tmp_path,
    )
    assert pytest_run.returncode == 1, pytest_run.stdout[-3000:] + pytest_run.stderr[-3000:]
    cli_run = run(
        ["-m", "lmconform.cli", "check", *common, "--json", str(tmp_path / "c.json")], tmp_path
    )
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
