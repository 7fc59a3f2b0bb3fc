"""Engines over JSON lines: the example passes the catalogue, and every fault is reported.

The example engine (the reference served over ``conformance/PROTOCOL.md``)
must pass the whole dummy catalogue through the ``cmd:`` adapter. Each
deliberately faulty engine (``conformance/examples/faulty_engines.py``) must
fail the case at hand for what it did, with its stderr tail, while the run
goes on; none may hang the suite. Timeouts are short here so the file runs
in about a minute and a half.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import pytest
from conformance_helpers import dummy_case, dummy_oracle

import conformance
from conformance.catalogue import load_cases, select_cases
from conformance.runner import run_case, run_cases
from engines import jsonl_protocol, protocol
from engines.adapters.cmd import CmdEngine
from engines.adapters.line_process import EngineCrashed, EngineHung
from engines.jsonl_protocol import MESSAGES, decode
from engines.models import FORMATS, resolve
from engines.protocol import (
    CAPABILITIES,
    BatchRow,
    DraftSettings,
    GenerateRequest,
    ProcessorSettings,
    ProtocolError,
    SamplerSettings,
)
from engines.registry import EngineUnavailable, engine_class
from engines.serialization import to_json_dict

PYTHON = shlex.quote(sys.executable)
EXAMPLE = f"{PYTHON} -m conformance.examples.jsonl_engine"
PROTOCOL_MD = Path(conformance.__file__).with_name("PROTOCOL.md")


def open_cmd(command: str, **settings) -> CmdEngine:
    cls = CmdEngine.bind(command, **settings)
    return cls(resolve("dummy", cls.model_formats))


def faulty(fault: str, **settings) -> CmdEngine:
    return open_cmd(f"{PYTHON} -m conformance.examples.faulty_engines {fault}", **settings)


def check(case_ids: list[str], engine) -> list:
    oracle = dummy_oracle()
    try:
        return [run_case(dummy_case(c), engine, oracle, oracle.default_profile()) for c in case_ids]
    finally:
        engine.close()


def mini_engine(body: str, **settings) -> CmdEngine:
    """An engine written inline (no model, no MLX): a hello, a loaded, then ``body``."""
    script = (
        "import json, sys, time\n"
        "def say(**m): print(json.dumps(m), flush=True)\n"
        "say(type='hello', protocol=1, engine='mini', capabilities=['greedy'], "
        "model_formats=['builtin'])\n"
        "load = json.loads(sys.stdin.readline())\n"
        "say(type='loaded', id=load['id'], vocab_size=260)\n" + body
    )
    return open_cmd(f"{PYTHON} -c {shlex.quote(script)}", **settings)


# -- the worked example --------------------------------------------------------------------


def test_the_example_engine_passes_the_whole_dummy_catalogue():
    oracle = dummy_oracle()
    engine = engine_class(f"cmd:{EXAMPLE}")(resolve("dummy", CmdEngine.model_formats))
    try:
        results = run_cases(
            select_cases(load_cases(), "dummy"), engine, oracle, oracle.default_profile()
        )
        hello = engine.hello
    finally:
        engine.close()
    problems = {r.case_id: r.reason or [f.summary for f in r.failures()] for r in results}
    problems = {case: why for case, why in problems.items() if why}
    assert problems == {}
    assert {r.verdict for r in results} == {"pass"}
    assert hello.engine == "reference-jsonl" and "batch" in hello.capabilities


def test_the_example_engine_is_checked_against_snapshots_on_a_machine_without_mlx():
    """The suite's process cannot import MLX; the engine (another process) can."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlx", "mlx_lm", "reference"):
            raise ImportError(name + " is blocked: no MLX here")
sys.meta_path.insert(0, Block())
from lmconform.cli import main
rc = main(["check", "--engine", "cmd:{EXAMPLE}", "--model", "dummy", "--against", "snapshots",
           "--cases", "greedy/hello,stopping/stop_token,batch/equals_single,embeddings/from_tokens"])
assert not [m for m in sys.modules if m.split(".")[0] in ("mlx", "reference")]
sys.exit(rc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    table = [line.split() for line in out.stdout.splitlines()]
    # The column is labelled with the name the engine's hello gives, not its command line.
    assert ["case", "reference-jsonl"] in table and ["total", "pass", "4"] in table


def test_an_engine_that_does_not_exist_is_unavailable():
    with pytest.raises(EngineUnavailable, match="command not found"):
        engine_class("cmd:/no/such/engine --serve")


def test_shutdown_ends_the_process():
    engine = open_cmd(EXAMPLE)
    process = engine._process.process
    engine.close()
    assert process.returncode == 0  # it read "shutdown" and exited by itself


# -- faulty engines: each fails the case at hand, for what it did -----------------------------


def test_a_crash_fails_that_case_with_the_stderr_tail_and_the_run_goes_on():
    results = check(
        ["greedy/hello", "greedy/fox", "greedy/chat", "greedy/long_prompt"],
        faulty("crash-on-third"),
    )
    assert [r.verdict for r in results] == ["pass", "pass", "fail", "pass"]
    reason = results[2].reason
    assert reason.startswith("engine failure:")
    assert "status 3" in reason
    assert "simulated crash while answering request" in reason  # the stderr tail


def test_garbage_output_fails_each_case_as_malformed_json():
    start = time.monotonic()
    results = check(["greedy/hello", "greedy/fox"], faulty("garbage"))
    assert [r.verdict for r in results] == ["fail", "fail"]
    for r in results:
        assert r.reason.startswith("protocol violation:")
        assert "malformed JSON" in r.reason and "<html>" in r.reason
        assert "about to print garbage" in r.reason
    assert time.monotonic() - start < 60


def test_a_hanging_engine_times_out_and_is_replaced():
    start = time.monotonic()
    results = check(["greedy/hello", "greedy/fox"], faulty("sleep-forever", request_timeout=2))
    assert [r.verdict for r in results] == ["fail", "fail"]
    for r in results:
        assert r.reason.startswith("timeout:")
        assert "sleeping instead of answering request" in r.reason
    assert time.monotonic() - start < 30


def test_the_total_time_budget_ends_every_later_request_at_once():
    engine = faulty("sleep-forever", request_timeout=30, total_timeout=6)
    request = GenerateRequest(prompt=[72, 105], max_tokens=2)
    try:
        with pytest.raises(EngineHung):
            list(engine.generate(request))  # cut short by the total budget, not at 30 s
        start = time.monotonic()
        with pytest.raises(EngineHung, match="used up"):
            list(engine.generate(request))
        assert time.monotonic() - start < 1
    finally:
        engine.close()


def test_truncated_logprobs_are_a_protocol_violation():
    (result,) = check(["greedy/hello"], faulty("truncated-logprobs"))
    assert result.verdict == "fail"
    assert "2 top logprobs at step 0; 5 were requested" in result.reason


def test_a_token_outside_the_vocabulary_is_reported_with_the_stderr_tail():
    (result,) = check(["greedy/hello"], faulty("token-out-of-range"))
    assert result.verdict == "fail" and result.reason.startswith("protocol violation:")
    assert "step 1: token 267 is outside the vocabulary [0, 260)" in result.reason
    assert "emitting a token past the vocabulary" in result.reason


def test_an_answer_to_another_request_is_a_protocol_violation():
    (result,) = check(["greedy/hello"], faulty("wrong-id"))
    assert result.verdict == "fail"
    assert re.search(r"got a 'event' message for request 'not-r\d+'", result.reason)


def test_an_unsupported_error_makes_the_case_unsupported_and_keeps_the_process():
    engine = faulty("unsupported")
    process = engine._process
    oracle = dummy_oracle()
    try:
        results = [
            run_case(dummy_case(c), engine, oracle, oracle.default_profile())
            for c in ("greedy/hello", "greedy/fox")
        ]
        assert engine._process is process  # an error message leaves the conversation in step
    finally:
        engine.close()
    assert [r.verdict for r in results] == ["unsupported", "unsupported"]
    assert "this engine generates nothing" in results[0].reason


def test_an_engine_that_dies_before_its_hello_cannot_be_opened():
    with pytest.raises(EngineCrashed, match="status 1") as caught:
        faulty("dies-at-start")
    assert "cannot find my weights" in str(caught.value)


def test_an_engine_of_another_protocol_version_is_refused():
    script = "import json; print(json.dumps({'type': 'hello', 'protocol': 99, 'engine': 'x', "
    script += "'capabilities': [], 'model_formats': ['builtin']}), flush=True)"
    with pytest.raises(ProtocolError, match="protocol version 99"):
        open_cmd(f"{PYTHON} -c {shlex.quote(script)}")


def test_an_engine_that_stops_reading_cannot_block_a_large_request():
    engine = mini_engine("time.sleep(3600)\n", request_timeout=2)
    request = GenerateRequest(prompt=list(range(100)) * 2000, max_tokens=1)  # ~800 kB of JSON
    start = time.monotonic()
    try:
        with pytest.raises(EngineHung, match="stopped reading its input"):
            list(engine.generate(request))
    finally:
        engine.close()
    assert time.monotonic() - start < 10


def test_an_engine_that_never_finishes_is_cut_off_at_max_tokens():
    body = (
        "req = json.loads(sys.stdin.readline())\n"
        "while True:\n"
        "    say(type='event', id=req['id'], token=65, text='A')\n"
    )
    engine = mini_engine(body)
    try:
        with pytest.raises(ProtocolError, match="more than max_tokens=3 events"):
            list(engine.generate(GenerateRequest(prompt=[1], max_tokens=3)))
    finally:
        engine.close()


# -- the specification ------------------------------------------------------------------------


DOCUMENTED_TYPES = {
    **MESSAGES,
    "SamplerSettings": SamplerSettings,
    "ProcessorSettings": ProcessorSettings,
    "DraftSettings": DraftSettings,
    "BatchRow": BatchRow,
}


def documented_fields(name: str) -> dict[str, tuple[str, str]]:
    """Field -> (type, default), from the table under the heading ``name`` in PROTOCOL.md."""
    text = PROTOCOL_MD.read_text()
    section = re.search(rf"^#### `{name}`\n(.*?)(?=^#|\Z)", text, re.MULTILINE | re.DOTALL)
    assert section, f"PROTOCOL.md has no section for {name!r}"
    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \| ([^|]+) \|", section.group(1), re.MULTILINE)
    return {field: (tp.replace("\\|", "|"), default.strip()) for field, tp, default in rows}


def type_name(tp) -> str:
    """A type as PROTOCOL.md writes it: ``list[int]``, ``str | None``, ``SamplerSettings``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return "None" if tp is type(None) else tp.__name__


def default_text(f) -> str:
    if f.default is MISSING and f.default_factory is MISSING:
        return "required"
    value = f.default if f.default is not MISSING else f.default_factory()
    if is_dataclass(value):
        return "`{}`"  # an object with every field at its default
    return f"`{json.dumps(to_json_dict(value))}`"


@pytest.mark.parametrize("name", sorted(DOCUMENTED_TYPES))
def test_the_specification_documents_every_field_with_its_type_and_default(name):
    cls = DOCUMENTED_TYPES[name]
    documented = documented_fields(name)
    assert set(documented) == {f.name for f in fields(cls)}
    hints = typing.get_type_hints(cls, {**vars(protocol), **vars(jsonl_protocol)})
    for f in fields(cls):
        assert documented[f.name] == (type_name(hints[f.name]), default_text(f)), (name, f.name)


def test_the_specification_lists_every_capability_and_model_format():
    text = PROTOCOL_MD.read_text()
    for capability in CAPABILITIES:
        assert f"| `{capability}` |" in text, capability
    for fmt in FORMATS:
        assert f"| `{fmt}` |" in text, fmt


def test_every_example_in_the_specification_is_a_valid_message():
    text = PROTOCOL_MD.read_text()
    blocks = re.findall(r"```jsonl\n(.*?)```", text, re.DOTALL)
    lines = [
        line.split(" ", 1)[1] for block in blocks for line in block.splitlines() if line.strip()
    ]
    assert len(lines) >= 15
    seen = set()
    for line in lines:
        message = decode(line)  # raises on any field the protocol does not have
        seen.add(message.type)
        assert json.loads(line)["type"] == message.type
    assert seen == set(MESSAGES)
