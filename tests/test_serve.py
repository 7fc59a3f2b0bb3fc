"""``lmconform serve``: the reference behind an OpenAI-compatible server, checked through
the suite's own ``openai:`` adapter.

The server is a real process on 127.0.0.1 at a free port (``--port 0``), started once
for the module, bounded in time, and stopped at the end. Through the adapter it must
pass every catalogue case the API can express, and the others must be "unsupported".
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from conformance.comparator import NEAR_TIE, PASS
from conformance.runner import UNSUPPORTED, run_matrix

START_TIMEOUT_S = 120
SERVING = re.compile(r"serving \S+ at (http://\S+/v1)")

# Cases the OpenAI API can express (through lmconform serve). Of the sampling cases, whose
# hundreds of draws cost about 20 s each over HTTP, two: seeds, and every filter at once.
EXPRESSIBLE = (
    "greedy/",
    "stream/",
    "stopping/",
    "logit_bias/",
    "sampling/same_seed",
    "sampling/combined",
    "score/",
    "text/",
)
# ... and groups it cannot (no drafts, embeddings, batches, caches, chunking, windows).
INEXPRESSIBLE = (
    "speculative/",
    "sampling/speculative",
    "embeddings/",
    "batch/",
    "sliding_window/",
    "prompt_cache/",
    "prefill/",
    "penalties/",
)


@contextmanager
def running(argv: list[str], ready: Callable[[str], str | None]) -> Iterator[str]:
    """Start ``argv``; ``ready(stderr so far)`` returns the server's URL once it answers.

    Fails the test if the process dies or is not ready within ``START_TIMEOUT_S``;
    the process is always stopped (terminate, then kill) on the way out."""
    with tempfile.NamedTemporaryFile("w+", prefix="server-", suffix=".log") as log:
        yield from _run(argv, ready, log)


def _run(argv, ready, log) -> Iterator[str]:
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = None
        while url is None:
            log.seek(0)
            output = log.read()
            if process.poll() is not None:
                pytest.fail(f"{argv[:4]} exited with {process.returncode}:\n{output[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{argv[:4]} not ready within {START_TIMEOUT_S} s:\n{output[-2000:]}")
            url = ready(output)
            if url is None:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def answers(url: str) -> bool:
    """Whether the server at ``url`` (ending in /v1) answers ``/v1/models``."""
    try:
        with urllib.request.urlopen(url + "/models", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def lmconform_serve(model: str):
    argv = [sys.executable, "-m", "lmconform.cli", "serve", "--model", model, "--port", "0"]

    def ready(output: str) -> str | None:
        found = SERVING.search(output)
        return found.group(1) if found and answers(found.group(1)) else None

    return running(argv, ready)


@pytest.fixture(scope="module")
def served_dummy() -> Iterator[str]:
    with lmconform_serve("dummy") as url:
        yield url


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_serve_passes_every_case_the_api_can_express(served_dummy):
    groups = ",".join(EXPRESSIBLE + INEXPRESSIBLE)
    results = run_matrix([f"openai:{served_dummy}"], ["dummy"], pattern=groups, timeout=120)
    verdicts = {r.case_id: (r.verdict, r.reason) for r in results}
    expressible = {c: v for c, v in verdicts.items() if c.startswith(EXPRESSIBLE)}
    inexpressible = {c: v for c, v in verdicts.items() if c.startswith(INEXPRESSIBLE)}
    assert len(expressible) >= 12 and len(inexpressible) >= 10, verdicts
    failed = {c: v for c, v in expressible.items() if v[0] not in (PASS, NEAR_TIE)}
    assert not failed, failed
    assert all(v[0] == UNSUPPORTED for v in inexpressible.values()), inexpressible


def test_serve_answers_token_prompts_with_the_references_greedy_tokens(served_dummy, dummy):
    """The same request as text and as token ids gives the reference's own greedy tokens,
    named by id, with the prompt counted by the reference tokenizer."""
    import mlx.core as mx

    from reference import generate_step

    model, tokenizer = dummy
    prompt = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    expected = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=6)]
    assert not set(expected) & tokenizer.eos_token_ids  # so the answer must run to max_tokens
    body = {"max_tokens": 6, "temperature": 0, "logprobs": 1, "return_tokens_as_token_ids": True}
    answer = post(served_dummy + "/completions", body | {"prompt": prompt})
    names = answer["choices"][0]["logprobs"]["tokens"]
    assert [int(n.removeprefix("token_id:")) for n in names] == expected
    assert answer["usage"]["prompt_tokens"] == len(prompt)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["choices"][0]["text"] == tokenizer.decode(expected)


def test_serve_rejects_invalid_requests_with_400(served_dummy):
    bad = [
        {"prompt": [], "max_tokens": 2},
        {"prompt": [10**6], "max_tokens": 2},
        {"prompt": "hi", "max_tokens": -1},
        {"prompt": "hi", "logit_bias": {"not-an-id": 1}},
        {"prompt": "hi", "n": 2},
    ]
    for body in bad:
        with pytest.raises(urllib.error.HTTPError) as caught:
            post(served_dummy + "/completions", body)
        assert caught.value.code == 400, body
        assert json.loads(caught.value.read())["error"]["message"], body


def test_chat_prompts_go_through_the_servers_chat_template_with_chat_1(served_dummy):
    """With ``chat=1`` a templated prompt is sent as a message to /chat/completions, and the
    server's template must rebuild exactly the reference's tokens for the case to pass."""
    from conformance.catalogue import load_cases
    from conformance.oracle import ReferenceOracle
    from conformance.profiles import profile_for_model
    from conformance.runner import run_case
    from engines.registry import open_engine

    engine = open_engine(f"openai:{served_dummy}:chat=1", "dummy")
    oracle = ReferenceOracle("dummy")
    try:
        message = "What is the capital of France?"
        assert engine.chat_message(oracle.encode_chat(message)) == message
        assert engine.chat_message(oracle.encode("plain text")) is None
        case = next(c for c in load_cases() if c.id == "greedy/chat")
        assert run_case(case, engine, oracle, profile_for_model("dummy")).verdict == PASS
    finally:
        engine.close()
        oracle.close()
