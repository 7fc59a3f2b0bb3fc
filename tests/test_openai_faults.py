"""Faulty servers behind ``openai:``: each fault fails the case at hand with a clear
message, within the adapter's timeout, and the run goes on.

A tiny standard-library HTTP server plays the faults, one per URL prefix
(``/500/v1``, ``/garbage/v1``, ...). The engine is opened against the real
``lmconform serve`` (so its start-up probe succeeds), then pointed at a fault;
after the failing case it is pointed back and the next case passes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_serve import lmconform_serve

from conformance.catalogue import load_cases
from conformance.comparator import FAIL, PASS
from conformance.oracle import ReferenceOracle
from conformance.profiles import profile_for_model
from conformance.runner import run_case, run_matrix
from engines.adapters.openai import Endpoint, HttpClient, ServerUnreachable
from engines.registry import open_engine

TIMEOUT_S = 1.0  # the adapter's timeout for these tests: a hang must cost about this much
HANG_S = 30.0


class FaultHandler(BaseHTTPRequestHandler):
    """Answers every request with the fault its path starts with."""

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        fault = self.path.strip("/").split("/")[0]
        getattr(self, "fault_" + fault.replace("-", "_"))()

    def fault_500(self) -> None:
        self._send(500, b'{"error": {"message": "the model exploded"}}')

    def fault_garbage(self) -> None:
        self._send(200, b"<html>this is not JSON</html>")

    def fault_hang(self) -> None:
        time.sleep(HANG_S)

    def fault_truncated_json(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b'{"choices": [{"text": "abc", "logpr')
        self.wfile.flush()
        self.close_connection = True

    def fault_truncated_sse(self) -> None:
        """One good chunk, then the connection closes: no finish_reason, no [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = {
            "choices": [
                {
                    "index": 0,
                    "text": "a",
                    "finish_reason": None,
                    "logprobs": {"tokens": ["token_id:97"], "token_logprobs": [-0.5]},
                }
            ]
        }
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()
        self.close_connection = True

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def fault_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served_dummy():
    with lmconform_serve("dummy") as url:
        yield url


@pytest.fixture(scope="module")
def oracle():
    oracle = ReferenceOracle("dummy")
    yield oracle
    oracle.close()


def case(case_id: str):
    return next(c for c in load_cases() if c.id == case_id)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_is_named_as_such():
    with pytest.raises(ServerUnreachable) as caught:
        open_engine(f"openai:http://127.0.0.1:{free_port()}/v1", "dummy")
    assert "not reachable" in str(caught.value)
    assert "connection refused" in str(caught.value).lower()


@pytest.mark.parametrize(
    "fault, case_id, message",
    [
        ("500", "greedy/hello", "HTTP 500"),
        ("500", "greedy/hello", "the model exploded"),  # the server's own answer is quoted
        ("garbage", "greedy/hello", "this is not JSON"),  # streamed: quoted, not parsed
        ("garbage", "score/teacher_forced", "malformed JSON"),
        ("hang", "greedy/hello", f"within {TIMEOUT_S:g} s"),
        ("truncated-json", "score/teacher_forced", "broke mid-answer"),
        ("truncated-sse", "stream/equals_nonstream", "ended without"),
    ],
)
def test_fault_fails_the_case_with_a_clear_message_and_the_run_goes_on(
    fault, case_id, message, fault_server, served_dummy, oracle
):
    engine = open_engine(f"openai:{served_dummy}:timeout={TIMEOUT_S}", "dummy")
    profile = profile_for_model("dummy")
    try:
        good = engine.client
        engine.client = HttpClient(Endpoint.parse(f"{fault_server}/{fault}/v1"), TIMEOUT_S)
        start = time.monotonic()
        result = run_case(case(case_id), engine, oracle, profile, timeout=60)
        assert time.monotonic() - start < 10 * TIMEOUT_S + 5  # never the hang's 30 s
        assert result.verdict == FAIL
        assert message in result.reason, result.reason
        engine.client = good  # the server is back: the next case is judged normally
        assert run_case(case("greedy/fox"), engine, oracle, profile, timeout=60).verdict == PASS
    finally:
        engine.close()


def test_probe_failure_fails_every_case_with_the_servers_answer(fault_server):
    results = run_matrix([f"openai:{fault_server}/500/v1"], ["dummy"], pattern="greedy/")
    assert results and all(r.verdict == FAIL for r in results)
    assert all("HTTP 500" in r.reason and "the model exploded" in r.reason for r in results)
