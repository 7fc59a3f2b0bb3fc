"""Faulty engines: each fails the case it spoils (never the next one, never the run), no
engine process survives, and whatever text an engine prints cannot break a report.

The ``cmd:`` engines are ``conformance/examples/faulty_engines.py`` on the dummy model, with
short timeouts; "no survivor" is checked by process group (``os.killpg(pgid, 0)`` must raise
``ProcessLookupError``).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
from conformance_helpers import dummy_case, dummy_oracle, make_trace

from conformance.report import to_junit, to_markdown
from conformance.runner import run_case, run_matrix
from conformance.validation import validate_generation
from engines.adapters.cmd import CmdEngine
from engines.adapters.line_process import stop_all
from engines.deadline import CaseTimeout, Interrupted, deadline
from engines.models import resolve
from engines.protocol import GenerateRequest, ProtocolError
from engines.registry import EngineUnavailable, engine_class

PYTHON = shlex.quote(sys.executable)
FAULTY = f"{PYTHON} -m conformance.examples.faulty_engines"
QUICK = {"start_timeout": 60.0, "request_timeout": 20.0}


def faulty(fault: str) -> CmdEngine:
    cls = CmdEngine.bind(f"{FAULTY} {fault}", **QUICK)
    return cls(resolve("dummy", cls.model_formats))


def check(case_ids, engine, timeout=60.0):
    oracle = dummy_oracle()
    try:
        return [
            run_case(dummy_case(c), engine, oracle, oracle.default_profile(), timeout)
            for c in case_ids
        ]
    finally:
        engine.close()


def group_gone(pgid: int, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# -- protocol rules ---------------------------------------------------------------------------


def test_declared_logprobs_sent_as_null_fail_the_case():
    [result] = check(["greedy/hello"], faulty("null-logprobs"))
    assert result.verdict == "fail"
    assert "no logprob (null), though the engine declared 'logprobs'" in result.reason


def test_output_after_a_finished_request_fails_that_case_not_the_next(monkeypatch, tmp_path):
    monkeypatch.setenv("LMCONFORM_FAULTY_ONCE_FILE", str(tmp_path / "once"))
    engine = faulty("stray-after-finish")
    first, second = check(["greedy/hello", "greedy/fox"], engine)
    assert first.verdict == "fail"
    # Seen as output after the finish, or where the timing extension's usage was due.
    assert re.search(r"wrote after request r\d+ had finished|got a 'event' message", first.reason)
    assert second.verdict == "pass", second.reason  # a fresh process, a clean slate


def test_an_engine_that_exits_is_noticed_at_once_and_its_child_is_killed():
    engine = faulty("exits-leaving-child")
    pgid = engine._process.process.pid
    [result] = check(["greedy/hello"], engine)
    assert result.verdict == "fail" and "closed its output" in result.reason
    assert result.duration_s < 5.0  # not the 20 s request timeout: the child holds stdout
    assert group_gone(pgid)


def test_an_engine_ignoring_shutdown_is_killed_with_its_group():
    engine = faulty("ignores-shutdown")
    pgid = engine._process.process.pid
    engine.close()
    assert group_gone(pgid)


def test_stop_all_kills_every_engine_group_still_running():
    engines = [faulty("ignores-shutdown") for _ in range(2)]
    groups = [e._process.process.pid for e in engines]
    assert stop_all() >= 2
    assert all(group_gone(g) for g in groups)


def test_an_engine_dies_with_the_suite_even_when_the_suite_is_killed(tmp_path):
    pid_file = tmp_path / "pids"
    code = (
        "from engines.adapters.cmd import CmdEngine\n"
        "from engines.models import resolve\n"
        f"cls = CmdEngine.bind({FAULTY + ' ignores-shutdown'!r})\n"
        "engine = cls(resolve('dummy', cls.model_formats))\n"
        "print('ready', flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    env = os.environ | {"LMCONFORM_FAULTY_PID_FILE": str(pid_file)}
    suite = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert suite.stdout.readline().strip() == "ready"
        engine_pid = int(pid_file.read_text().split()[0])
        suite.kill()  # SIGKILL: no handler runs; only the parent-death signal can act
        suite.wait(timeout=10)
        assert group_gone(engine_pid)
    finally:
        suite.kill()


@pytest.mark.parametrize(
    ("value", "variable"),
    [
        ("abc", "REQUEST_TIMEOUT"),
        ("-5", "START_TIMEOUT"),
        ("inf", "TOTAL_TIMEOUT"),
        ("nan", "REQUEST_TIMEOUT"),
    ],
)
def test_a_bad_timeout_setting_names_the_variable(monkeypatch, value, variable):
    monkeypatch.setenv(f"LMCONFORM_CMD_{variable}", value)
    with pytest.raises(EngineUnavailable, match=f"LMCONFORM_CMD_{variable}={value!r}"):
        engine_class(f"cmd:{FAULTY} garbage")


def test_validation_requires_logprobs_when_they_were_asked_for():
    request = GenerateRequest(prompt=[1], max_tokens=1)
    trace = make_trace([5], logprobs=None, tops=[[(5, -0.1)]])
    validate_generation(trace, request, vocab_size=260, end_tokens=set(), top_logprobs=0)
    with pytest.raises(ProtocolError, match="no logprob"):
        validate_generation(trace, request, vocab_size=260, end_tokens=set(), top_logprobs=1)


# -- hostile text in reports ---------------------------------------------------------------------


def test_hostile_engine_text_cannot_break_a_report():
    [result] = check(["greedy/hello"], faulty("hostile-text"))
    assert result.verdict == "fail" and "red" in result.reason
    longest = max(len(line) for line in result.reason.splitlines())
    assert 1000 < longest < 3000  # the 1 MB stderr line was cut
    result.engine = result.label = "cmd:a | b"  # a pipe in its name, as a command line may have
    root = ET.fromstring(ET.tostring(to_junit([result]).getroot()))  # parses: valid XML
    failure = root.find(".//failure").text
    assert "\\x1b[31m" in failure and "\x1b" not in failure and "\x00" not in failure
    markdown = to_markdown([result], {"date": "today"})
    assert "\x1b" not in markdown and "\x08" not in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| case"))
    assert header.count(" | ") == 1 and "a \\| b" in header  # still two columns
    fence = next(line for line in markdown.splitlines() if set(line) == {"`"})
    assert len(fence) > 3  # longer than the ``` the engine printed


# -- in-process engines: escapes fail cases, not the run -------------------------------------


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ("ExitsInConstructor", "could not open the engine: exits-in-constructor raised SystemExit"),
        ("ExitsInGenerate", "raised SystemExit: 5"),
        ("InterruptsInGenerate", "raised KeyboardInterrupt"),
        ("SwallowsTimeout", "timeout: the case ran longer than its limit of 1 s"),
    ],
)
def test_an_in_process_engine_escaping_fails_its_cases_and_the_run_goes_on(engine, message):
    spec = f"conformance.examples.faulty_engines:{engine}"
    if engine == "ExitsInConstructor":
        message = message.replace("exits-in-constructor", spec)
    results = run_matrix([spec, "mutants:Control"], ["dummy"], pattern="greedy/hello", timeout=1.0)
    verdicts = {r.engine: r for r in results}
    faulty_result = next(r for r in results if r.engine != "control")
    assert faulty_result.verdict == "fail" and message in faulty_result.reason
    assert verdicts["control"].verdict == "pass"  # the run went on


def test_the_deadline_cannot_be_swallowed():
    def swallow_everything():
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                time.sleep(0.05)
            except Exception:  # noqa: BLE001, S110 - what a careless engine does
                pass

    start = time.monotonic()
    with pytest.raises(CaseTimeout, match="limit of 0.2 s"), deadline(0.2):
        swallow_everything()
    assert time.monotonic() - start < 1.0

    with pytest.raises(CaseTimeout, match="caught the time-limit exception"), deadline(0.2):
        try:
            time.sleep(1)
        except BaseException:  # noqa: BLE001, S110 - swallowed, then returns normally
            pass


def test_a_stop_signal_is_not_judged_as_an_engine_fault():
    class Stopped:
        name = label = "stopped"
        capabilities = frozenset({"greedy", "stream", "logprobs"})
        vocab_size = 260

        def generate(self, request):
            raise Interrupted(signal.SIGTERM)

    oracle = dummy_oracle()
    with pytest.raises(Interrupted):
        run_case(dummy_case("greedy/hello"), Stopped(), oracle, oracle.default_profile())
