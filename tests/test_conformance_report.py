"""Reports: terminal matrix, JSON, Markdown and JUnit XML, from synthetic results; the
progress lines and the last line of `lmconform check`."""

from __future__ import annotations

import io
import json
import time
import xml.etree.ElementTree as ET

from conformance_helpers import dummy_case

from conformance.checks.context import Finding
from conformance.cli.check import Progress, exit_line
from conformance.comparator import Diagnostic
from conformance.conditioning import Conditioning
from conformance.report import (
    any_failed,
    format_matrix,
    format_problems,
    to_json,
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


def tables(text: str) -> dict[str, list[list[str]]]:
    """The matrix's tables by model: each a list of rows, each a list of cells."""
    found, model = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "(profile" in line:
            model = line.split()[0]
            found[model] = []
        elif model and line.strip() and not line.startswith("-"):
            found[model].append([c for c in line.split("  ") if c.strip()])
        elif not line.strip():
            model = None
    return {m: [[c.strip() for c in row] for row in rows] for m, rows in found.items()}


def test_the_matrix_has_a_table_per_model_with_a_row_per_case_and_a_column_per_engine():
    text = format_matrix(results())
    dummy, smollm = tables(text)["dummy"], tables(text)["smollm2-135m"]
    assert dummy[0] == ["case", "ref", "peer"]
    assert dummy[1:3] == [["greedy/a", "pass", "FAIL"], ["batch/b", "pass", "unsupported"]]
    # Per engine, a count of each verdict that occurs: ref 2 pass; peer 1 FAIL, 1 unsupported.
    assert dummy[3:] == [
        ["total pass", "2", "0"],
        ["total FAIL", "0", "1"],
        ["total unsupported", "0", "1"],
    ]
    assert smollm[0] == ["case", "ref", "peer", "gone"]
    assert smollm[1] == ["greedy/c", "pass*", "near-tie*", "skipped"]
    assert smollm[2:] == [
        ["total pass", "1", "0", "0"],
        ["total near-tie", "0", "1", "0"],
        ["total skipped", "0", "0", "1"],
    ]
    assert "dummy (profile fp32: near-tie below 0.01 nats" in text
    assert "smollm2-135m (profile q4: near-tie below 0.1 nats" in text
    assert "*: ill-conditioned" in text and "greedy/c: ILL-CONDITIONED" in text
    assert "unsupported: the engine lacks a capability" in text
    assert "blank:" not in text  # every engine has a result for every case of its model
    assert max(len(line) for line in text.splitlines()) <= 100
    assert any_failed(results()) and not any_failed(results()[2:])


def test_a_blank_cell_is_explained_where_a_result_is_missing():
    stopped = results()[:3]  # the run stopped before peer's batch/b
    text = format_matrix(stopped)
    assert tables(text)["dummy"][2] == ["batch/b", "pass"]
    assert "blank: no result" in text


def test_engines_are_shown_by_label_and_equal_labels_are_told_apart():
    """Two cmd: engines whose hellos both say "my-engine": short distinct labels in the
    tables and diagnostics, the full command lines in the legend and in JSON."""
    one, two = "cmd:./v1/my-engine --fast", "cmd:./v2/my-engine --fast"
    rows = [
        CaseResult("greedy/a", one, "dummy", "fp32", "pass", label="my-engine"),
        CaseResult("greedy/a", two, "dummy", "fp32", "fail", label="my-engine"),
    ]
    text = format_matrix(rows)
    assert tables(text)["dummy"][:2] == [
        ["case", "my-engine", "my-engine#2"],
        ["greedy/a", "pass", "FAIL"],
    ]
    assert f"engines by label:\n  my-engine = {one}\n  my-engine#2 = {two}" in text
    assert "FAIL: greedy/a on my-engine#2 @ dummy" in format_problems(rows)
    assert to_json(rows, {})["results"][1]["engine"] == two


def test_engines_that_do_not_fit_100_columns_go_to_a_second_table():
    names = [f"engine-with-a-long-name-{n}" for n in range(6)]  # 6 x (2 + 25) + 8 > 100
    rows = [CaseResult("greedy/a", name, "dummy", "fp32", "pass") for name in names]
    text = format_matrix(rows)
    headers = [line.split() for line in text.splitlines() if line.startswith("case ")]
    assert len(headers) == 2 and [h[1:] for h in headers] == [names[:3], names[3:]]
    assert max(len(line) for line in text.splitlines()) <= 100


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


# -- what the terminal shows while and after a run (lmconform check) ------------------------


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_a_long_case_shows_a_heartbeat_and_a_short_one_does_not():
    stream = Stream(tty=False)
    progress = Progress(stream, heartbeat_s=0.2)
    case = dummy_case("greedy/hello")
    progress("my-engine", "dummy", 0, 2, case, None)
    time.sleep(0.75)  # heartbeats near 0.2, 0.4, 0.6 s (the thread polls every 0.05 s)
    progress("my-engine", "dummy", 0, 2, case, CaseResult(case.id, "e", "dummy", "fp32", "pass"))
    progress("my-engine", "dummy", 1, 2, case, None)
    progress("my-engine", "dummy", 1, 2, case, CaseResult(case.id, "e", "dummy", "fp32", "fail"))
    time.sleep(0.5)  # nothing is running now: no heartbeat
    progress.finish()
    lines = stream.getvalue().splitlines()
    beats = [line for line in lines if "still running" in line]
    assert 1 <= len(beats) <= 4, lines  # 3 on an idle machine
    assert all(b.startswith("[my-engine @ dummy 1/2] greedy/hello still running (") for b in beats)
    assert lines[len(beats):] == [
        "[my-engine @ dummy 1/2] greedy/hello pass (0.00 s)",
        "[my-engine @ dummy 2/2] greedy/hello FAIL (0.00 s)",
    ]
    assert not progress._heartbeat.is_alive()


def test_the_last_line_states_the_exit_status_and_its_meaning():
    assert exit_line(1) == (
        "lmconform check: exit status 1: an engine failed a case (a finding, not an error of "
        "the run)"
    )
    assert "exit status 0: every checked case passed" in exit_line(0)
    assert "exit status 2: an input error" in exit_line(2)
