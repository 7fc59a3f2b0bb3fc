"""Reports: terminal matrix, JSON, Markdown and JUnit XML, from synthetic results."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from conformance.checks.context import Finding
from conformance.comparator import Diagnostic
from conformance.conditioning import Conditioning
from conformance.report import (
    any_failed,
    format_matrix,
    format_problems,
    to_markdown,
    write_json,
    write_junit,
)
from conformance.runner import CaseResult


def results() -> list[CaseResult]:
    ill = Conditioning(0.08, 0, 60, 0.2, ill_conditioned=True)
    tie = Finding(
        "engine vs reference",
        "near-tie",
        "near-tie: at step 0 ...",
        "near-tie: at step 0\n  top-5 ...",
        Diagnostic(kind="token", step=0, context="", expected_token=504, actual_token=60),
    )
    bad = Finding("text", "fail", "FAIL: text pieces join to 'Ā'", "FAIL: text pieces join to 'Ā'")
    return [
        CaseResult(
            "greedy/a", "ref", "dummy", "fp32", "pass", "about a", [Finding("x", "pass", "ok")]
        ),
        CaseResult("greedy/a", "peer", "dummy", "fp32", "fail", "about a", [bad]),
        CaseResult("batch/b", "ref", "dummy", "fp32", "pass"),
        CaseResult(
            "batch/b", "peer", "dummy", "fp32", "unsupported", reason="peer lacks capability batch"
        ),
        CaseResult("greedy/c", "ref", "smollm2-135m", "q4", "pass", conditioning=ill),
        CaseResult(
            "greedy/c", "peer", "smollm2-135m", "q4", "near-tie", findings=[tie], conditioning=ill
        ),
        CaseResult("greedy/c", "gone", "smollm2-135m", "q4", "skipped", reason="pip install gone"),
    ]


def test_the_matrix_has_a_row_per_case_and_a_column_per_engine_and_model():
    text = format_matrix(results())
    lines = text.splitlines()
    assert lines[0].split() == [
        "case",
        "ref",
        "@",
        "dummy",
        "peer",
        "@",
        "dummy",
        "ref",
        "@",
        "smollm2-135m",
        "peer",
        "@",
        "smollm2-135m",
        "gone",
        "@",
        "smollm2-135m",
    ]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:5]}
    assert rows["greedy/a"] == ["pass", "FAIL"]  # blank cells where the case does not run
    assert rows["batch/b"] == ["pass", "unsupported"]
    assert rows["greedy/c"] == ["pass*", "near-tie*", "skipped"]
    assert (
        "0 pass, 1 FAIL, 1 unsup" in text and "0 pass, 1 tie" in text and "0 pass, 1 skip" in text
    )
    assert "ill-conditioned" in text and "greedy/c: ILL-CONDITIONED" in text
    assert "precision profiles: dummy fp32 (near-tie below 0.01 nats" in text
    assert any_failed(results()) and not any_failed(results()[2:])


def test_problems_list_every_fail_and_near_tie_with_details():
    text = format_problems(results())
    assert "FAIL: greedy/a on peer @ dummy" in text and "[text]" in text
    assert "near-tie: greedy/c on peer @ smollm2-135m" in text and "top-5" in text
    assert "batch/b" not in text


def test_json_holds_everything(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, results(), {"engines": {"ref": "v1"}})
    data = json.loads(path.read_text())
    assert data["meta"] == {"engines": {"ref": "v1"}}
    assert data["totals"] == {"pass": 3, "near-tie": 1, "fail": 1, "unsupported": 1, "skipped": 1}
    tie = data["results"][5]
    assert (
        tie["verdict"] == "near-tie" and tie["findings"][0]["diagnostic"]["expected_token"] == 504
    )
    assert tie["conditioning"]["min_margin"] == 0.08


def test_markdown_has_the_matrix_and_the_diagnostics():
    text = to_markdown(results(), {"date": "today"})
    assert "| case | ref @ dummy | peer @ dummy |" in text
    assert "| `greedy/a` | pass | **FAIL** |" in text
    assert "### FAIL: `greedy/a` on peer @ dummy" in text and "text pieces join to" in text
    assert "### near-tie: `greedy/c`" in text
    assert "- `batch/b` on peer @ dummy: peer lacks capability batch" in text


def test_junit_xml_counts_failures_and_skips(tmp_path):
    path = tmp_path / "r.xml"
    write_junit(path, results())
    root = ET.parse(path).getroot()
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {
        "ref@dummy",
        "peer@dummy",
        "ref@smollm2-135m",
        "peer@smollm2-135m",
        "gone@smollm2-135m",
    }
    peer = suites["peer@dummy"]
    assert (peer.get("tests"), peer.get("failures"), peer.get("skipped")) == ("2", "1", "1")
    failing = peer.find("testcase[@name='greedy/a']/failure")
    assert failing.get("message").startswith("FAIL: text pieces") and "[text]" in failing.text
    assert (
        peer.find("testcase[@name='batch/b']/skipped").get("message")
        == "peer lacks capability batch"
    )
    tie = suites["peer@smollm2-135m"].find("testcase/system-out")
    assert tie.text.startswith("near-tie (passes)")
    assert suites["gone@smollm2-135m"].find("testcase/skipped").get("message") == "pip install gone"
