"""``lmconform check``: matrix on stdout, progress on stderr, reports, exit codes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from conformance import runner
from engines import registry
from engines.models import FAMILY_MODELS
from lmconform.cli import main


def test_check_prints_the_matrix_and_writes_all_reports(tmp_path, capsys):
    paths = {kind: tmp_path / f"r.{kind}" for kind in ("json", "md", "xml")}
    rc = main(
        [
            "check",
            "--engine",
            "reference",
            "--engine",
            "conformance_helpers:GreedyOnlyEngine",
            "--model",
            "dummy",
            "--cases",
            "greedy/hello,batch/needle",
            "--json",
            str(paths["json"]),
            "--markdown",
            str(paths["md"]),
            "--junit",
            str(paths["xml"]),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    # One table for the model, a column per engine, and the exit status explained last.
    assert ["case", "reference", "greedy-only"] in [line.split() for line in out.splitlines()]
    assert err.splitlines()[-1].startswith("lmconform check: exit status 0: ")
    assert "batch/needle" in out and "unsupported" in out
    assert "[reference @ dummy 1/2] greedy/hello pass" in err  # progress on stderr
    data = json.loads(paths["json"].read_text())
    verdicts = {(r["engine"], r["case_id"]): r["verdict"] for r in data["results"]}
    assert verdicts == {
        ("reference", "greedy/hello"): "pass",
        ("reference", "batch/needle"): "pass",
        ("greedy-only", "greedy/hello"): "pass",
        ("greedy-only", "batch/needle"): "unsupported",
    }
    assert data["meta"]["profiles"] == {"dummy": ["fp32"]}
    assert "## Matrix" in paths["md"].read_text()
    assert ET.parse(paths["xml"]).getroot().tag == "testsuites"


def test_a_failing_engine_gives_exit_status_1_and_its_diagnostic(capsys):
    rc = main(
        [
            "check",
            "--engine",
            "mutants:TopKOffByOne",
            "--model",
            "dummy",
            "--cases",
            "sampling/top_k",
        ]
    )
    out, _ = capsys.readouterr()
    assert rc == 1
    assert "FAIL" in out and "top_k 5 allows 5 tokens, but the engine drew" in out


def test_an_engine_asked_for_but_not_installed_is_an_input_error(monkeypatch, capsys):
    monkeypatch.setattr(
        registry, "missing_requirements", lambda name: ["torch"] if name == "transformers" else []
    )
    rc = main(["check", "--engine", "transformers", "--model", "dummy", "--cases", "greedy/hello"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "--engine transformers" in err and "pip install" in err and "missing: torch" in err
    assert out == ""  # refused before any case ran


def test_an_unknown_engine_is_reported_not_raised(capsys):
    assert main(["check", "--engine", "nosuch", "--model", "dummy", "--cases", "greedy/hello"]) == 2
    assert "unknown engine 'nosuch'" in capsys.readouterr().err
    assert main(["check", "--engine", "no_such_module:Engine", "--model", "dummy"]) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err


def test_without_arguments_the_default_matrix_runs_reference_and_installed_peers(
    monkeypatch, capsys
):
    seen = {}

    def fake_run_matrix(engines, models, **kwargs):
        seen.update(engines=engines, models=models)
        return []

    monkeypatch.setattr(runner, "run_matrix", fake_run_matrix)
    monkeypatch.setattr(registry, "installed_peers", lambda: ["mlx-lm"])
    assert main(["check"]) == 2  # nothing was checked (the fake ran no case): not a success
    assert "no case was checked" in capsys.readouterr().err
    # dummy, the tiny model of every other family, then the real model
    models = ["dummy", *FAMILY_MODELS, "smollm2-135m"]
    assert seen == {"engines": ["reference", "mlx-lm"], "models": models}


def test_list_shows_the_selected_cases(capsys):
    assert main(["check", "--list", "--model", "dummy", "--cases", "stopping"]) == 0
    out = capsys.readouterr().out
    assert "stopping/max_tokens_exact" in out and "greedy/hello" not in out


def test_an_unknown_profile_is_refused(capsys):
    assert main(["check", "--profile", "fp7", "--model", "dummy"]) == 2
    assert "unknown precision profile 'fp7'" in capsys.readouterr().err
