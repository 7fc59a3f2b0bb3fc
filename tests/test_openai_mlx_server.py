"""``mlx_lm.server`` (the installed peer) checked through ``openai:`` gives the verdicts of
the in-process ``mlx-lm`` adapter on every case the API can express.

mlx_lm.server 0.32.2 names the wrong chosen token when top logprobs are asked for (it
reports the first entry of an unsorted ``argpartition`` as the chosen one), so the
comparison runs with ``top_logprobs=0``; the last test shows the suite catching that bug.
"""

from __future__ import annotations

import socket
import sys

import pytest
from test_serve import answers, running

from conformance.comparator import FAIL
from conformance.runner import UNSUPPORTED, run_matrix
from engines.models import exported_folder

pytest.importorskip("mlx_lm")
pytestmark = pytest.mark.peer

# The cases the API expresses, less the sampling distributions (hundreds of draws each,
# twice here); seeds are compared, and lmconform serve's test covers a distribution.
COMPARED = "greedy/,stream/,stopping/,logit_bias/,sampling/same_seed,score/,text/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlx_server():
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    folder = exported_folder("dummy")
    argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    with running(argv, lambda output: url if answers(url) else None):
        yield url


def test_mlx_server_through_openai_matches_in_process_mlx_lm(mlx_server):
    spec = f"openai:{mlx_server}:top_logprobs=0"
    results = run_matrix([spec, "mlx-lm"], ["dummy"], pattern=COMPARED, timeout=120)
    served = {r.case_id: r for r in results if r.engine == "openai"}
    local = {r.case_id: r for r in results if r.engine == "mlx-lm"}
    compared = {c: r for c, r in served.items() if r.verdict != UNSUPPORTED}
    assert len(compared) >= 10, {c: r.reason for c, r in served.items()}
    differ = {
        c: (r.verdict, local[c].verdict, r.reason)
        for c, r in compared.items()
        if r.verdict != local[c].verdict
    }
    assert not differ, differ
    # mlx-lm's byte-0 detokenizer bug shows through the server as it does in process.
    assert served["text/utf8_pieces"].verdict == local["text/utf8_pieces"].verdict == FAIL


def test_mlx_server_misnames_the_chosen_token_when_asked_for_top_logprobs(mlx_server):
    results = run_matrix([f"openai:{mlx_server}"], ["dummy"], pattern="greedy/hello")
    assert [r.verdict for r in results] == [FAIL]
    assert "greedy step 0 chose token" in results[0].reason, results[0].reason
