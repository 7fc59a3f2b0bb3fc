"""transformers fails the dummy catalogue only where the README explains why.

Like mlx-lm's known deviations in ``test_mutants.py``: a new fail, or an explained one
that stops failing, must change the README's explanation too.
"""

from __future__ import annotations

import pytest
from conformance_helpers import dummy_engine, dummy_oracle

from conformance.catalogue import load_cases, select_cases
from conformance.runner import FAIL, run_cases

pytest.importorskip("transformers")
pytestmark = pytest.mark.peer

TRANSFORMERS_KNOWN_DEVIATIONS = {
    # transformers tempers the distribution before its top-p / min-p filters; the protocol
    # (and mlx-lm, the reference) filters the untempered one.
    "sampling/combined": "filter order",
    # Its generate() crashes on an empty prompt and serves the other invalid requests
    # the adapter passes on: nothing refuses them.
    "validation/invalid_requests": "accepted",
}
# The probes of validation/invalid_requests transformers does not refuse, and how.
TRANSFORMERS_SERVES = {
    "prompt_tokens=[]": "failed with RuntimeError",
    "stop_tokens=[1000000]": "accepted it silently",
    "stop_sequences=[[]]": "accepted it silently",
    "top_logprobs=-1": "accepted it silently",
    'sampler={"temp":1.0,"top_p":1.5}': "accepted it silently",
}


def test_transformers_passes_everything_but_its_known_deviations():
    oracle = dummy_oracle()
    results = run_cases(select_cases(load_cases(), "dummy"), dummy_engine("transformers"),
                        oracle, oracle.default_profile())
    failed = {r.case_id: r for r in results if r.verdict == FAIL}
    assert set(failed) == set(TRANSFORMERS_KNOWN_DEVIATIONS)

    (frequencies,) = failed["sampling/combined"].failures()
    # At temperature 0.7 on "abc", min-p of the tempered distribution keeps one token.
    assert "worst context 'abc'" in frequencies.summary

    served = {f.check: f.summary for f in failed["validation/invalid_requests"].failures()}
    assert list(served) == list(TRANSFORMERS_SERVES)
    for probe, how in TRANSFORMERS_SERVES.items():
        assert how in served[probe], (probe, served[probe])
