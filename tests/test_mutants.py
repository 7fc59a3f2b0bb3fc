"""Suite power: every mutant is caught by the case that names its bug; no false alarms.

A mutant is the reference adapter with one realistic bug (``tests/mutants.py``).
For each, the cases it names must fail, and for a reason a human would accept
(a comparison, a protocol rule, a statistical test), not a catalogue or
timeout problem. The unbroken wrapper must pass the whole catalogue; mlx-lm
must pass everything except its known, explained deviations, which are
themselves checked to be what the explanation says.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from conformance_helpers import dummy_case, dummy_engine, dummy_oracle, reference_oracle
from mutants import MUTANTS, Control

from conformance.catalogue import build_request, load_cases, select_cases
from conformance.comparator import PASS, compare_traces
from conformance.runner import FAIL, run_case, run_cases
from engines.adapters.cmd import CmdEngine
from engines.models import ModelSource
from engines.protocol import Trace

SOURCE = ModelSource("dummy", "builtin")

# Cases mlx-lm 0.32.2 fails on dummy, each a real deviation of mlx-lm from the
# protocol (see the README's conformance matrix for the diagnosis).
MLX_LM_KNOWN_DEVIATIONS = {
    # BPEStreamingDetokenizer._decode_bytes tests `if res:` for the byte value of a
    # character, so byte 0x00 (spelled "Ā" in byte-level vocabularies) is treated as
    # unknown and its UTF-8 form "Ā" is emitted instead of the byte.
    "text/utf8_pieces": "\u0100",
    # RotatingKVCache's multi-token update masks a chunk with a plain window of
    # max_size over the concatenated keys: sinks fall out of view and one extra
    # recent position is visible, so chunked prefill beyond the window differs. Every
    # combination with the 8-position window and the 13-token prompt that decodes past
    # its first token meets it (max_tokens_one does not).
    "sliding_window/long_prompt": "logprob",
    "combo/streaming+sliding_window": "window",
    "combo/sliding_window+penalties": "window",
    "combo/sliding_window+stop_sequence": "window",
    "combo/sliding_window+prefill_chunking": "window",
    "combo/sliding_window+embeddings": "window",
    "combo/sliding_window+stop_token": "window",
    "combo/sliding_window+top_logprobs": "window",
    "combo/sliding_window+sampling": "window",
    # BatchRotatingKVCache keeps no sink positions (keep is ignored in batches).
    "combo/batch+sliding_window": "batch window",
    # speculative_generate_step's logits processors see the generated tokens only
    # (prev_tokens starts empty), so penalties ignore the prompt under speculation.
    "combo/penalties+speculative": "penalty history",
    # mlx-lm refuses max_tokens 0 and an empty prompt itself, but nothing refuses a stop
    # token outside the vocabulary, an empty stop sequence or top_logprobs -1 (the adapter
    # passes them on unchecked), and its sampler draws with top_p 1.5 and a negative
    # temperature (which inverts the distribution). Its embedding lookup crashes the process
    # on a prompt token outside the vocabulary, so that probe goes to cmd: engines only.
    "validation/invalid_requests": "accepted",
}
# The requests of validation/invalid_requests mlx-lm serves instead of refusing.
MLX_LM_SERVES = [
    "stop_tokens=[1000000]",
    "stop_sequences=[[]]",
    "top_logprobs=-1",
    'sampler={"temp":1.0,"top_p":1.5}',
    'sampler={"temp":-0.5}',
]


# The finding that must fail, where a case makes several: a sampler bug must be caught
# by the check that concerns it (frequencies, or the hard support check naming the rule).
FAILING_CHECK = {
    "TemperatureTwice": ("frequencies", "Holm-adjusted"),
    "TopKOffByOne": ("support", "excluded by top_k"),
    "TopPOneTooMany": ("support", "excluded by top_p"),
    "TopPOneTooFew": ("frequencies", "Holm-adjusted"),
    "MinPRelativeToOne": ("frequencies", "Holm-adjusted"),
    "SeedIgnored": ("same seed, same tokens", "gave different tokens on a second run"),
    "MinTokensToKeepIgnored": ("frequencies", "Holm-adjusted"),
}


def test_there_are_at_least_35_mutants_each_with_a_bug_and_a_case():
    assert len(MUTANTS) >= 35
    ids = {c.id for c in load_cases()}
    for mutant in MUTANTS:
        assert mutant.caught_by and set(mutant.caught_by) <= ids, mutant.__name__
        assert mutant.bug != Control.bug


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.__name__)
def test_every_mutant_is_caught_by_the_case_that_names_its_bug(mutant):
    oracle = dummy_oracle()
    engine = mutant(SOURCE)
    for case_id in mutant.caught_by:
        result = run_case(dummy_case(case_id), engine, oracle, oracle.default_profile())
        assert result.verdict == FAIL, f"{mutant.__name__} passed {case_id}"
        assert not result.reason.startswith(("catalogue", "timeout")), result.reason
        # The failure comes with an account: a failing finding, or the protocol rule broken.
        assert result.failures() or result.reason.startswith("protocol violation"), result.reason
        if mutant.__name__ in FAILING_CHECK:
            check, words = FAILING_CHECK[mutant.__name__]
            failed = {f.check: f.summary for f in result.failures()}
            assert check in failed and words in failed[check], failed
            if check == "frequencies":  # a reweighted support is not a support violation
                assert "support" not in failed, failed
    if isinstance(engine, CmdEngine):
        engine.close()  # its own process (a lenient JSON-lines server)


def test_the_unbroken_wrapper_passes_the_whole_dummy_catalogue():
    oracle = dummy_oracle()
    results = run_cases(
        select_cases(load_cases(), "dummy"), Control(SOURCE), oracle, oracle.default_profile()
    )
    problems = {
        r.case_id: r.reason or [f.summary for f in r.failures()]
        for r in results
        if r.verdict == FAIL
    }
    assert problems == {}
    assert {r.verdict for r in results} <= {PASS, "near-tie", "unsupported"}


@pytest.mark.peer
def test_mlx_lm_passes_everything_but_its_known_deviations():
    oracle = dummy_oracle()
    engine = dummy_engine("mlx-lm")
    results = run_cases(
        select_cases(load_cases(), "dummy"), engine, oracle, oracle.default_profile()
    )
    failed = {r.case_id: r for r in results if r.verdict == FAIL}
    assert set(failed) == set(MLX_LM_KNOWN_DEVIATIONS)
    text = failed["text/utf8_pieces"].failures()
    assert (
        [f.check for f in text] == ["text"]
        and "\u0100" in text[0].summary
        and "\\x00" in text[0].summary
    )
    (window,) = failed["sliding_window/long_prompt"].failures()
    assert window.diagnostic.kind in ("logprob", "token")
    served = failed["validation/invalid_requests"].failures()
    assert [f.check for f in served] == MLX_LM_SERVES
    assert all("accepted it silently" in f.summary for f in served)


@pytest.mark.peer
def test_mlx_lm_window_combinations_deviate_only_through_chunked_prefill():
    # Each window combination's request prefilled one token at a time in mlx-lm gives
    # the reference's answer: the deviation is the chunked update, not the combination.
    oracle = dummy_oracle()
    engine = dummy_engine("mlx-lm")
    for case_id, why in MLX_LM_KNOWN_DEVIATIONS.items():
        if why != "window":
            continue
        request = build_request(dummy_case(case_id).request, oracle)
        expected = oracle.answer(request)
        one_by_one = Trace(list(engine.generate(replace(request, prefill_step_size=1))))
        result = compare_traces(expected, one_by_one, oracle.default_profile(), oracle.decode)
        assert result.verdict == PASS, (case_id, result.summary)


@pytest.mark.peer
def test_mlx_lm_speculative_penalties_ignore_the_prompt():
    # mlx-lm's speculative answer with a penalty is the answer of a penalty blind to the
    # prompt: the reference's answer to the same prompt given as embeddings (no token ids
    # for the penalty to count), and not the reference's answer to the token prompt.
    oracle = dummy_oracle()
    engine = dummy_engine("mlx-lm")
    case = dummy_case("combo/penalties+speculative")
    request = build_request({**case.request, **case.params["variants"][0]}, oracle)
    speculative = Trace(list(engine.generate(replace(request, top_logprobs=5))))
    blind = oracle.answer(
        build_request({**case.request, "prompt_embeddings": "from_tokens"}, oracle)
    )
    profile = oracle.default_profile()
    assert compare_traces(blind, speculative, profile, oracle.decode).verdict == PASS
    plain = oracle.answer(build_request(case.request, oracle))
    assert compare_traces(plain, speculative, profile, oracle.decode).verdict == FAIL


@pytest.mark.peer
def test_mlx_lm_sliding_window_deviation_comes_from_chunked_prefill():
    # The same request prefilled one token at a time (no multi-token cache updates)
    # gives the reference's answer: the deviation is in mlx-lm's chunked update.
    oracle = dummy_oracle()
    engine = dummy_engine("mlx-lm")
    case = dummy_case("sliding_window/long_prompt")
    chunked = build_request(case.request, oracle)
    unchunked = build_request(case.request, oracle, prefill_step_size=1)
    expected = oracle.answer(chunked)

    answer = Trace(list(engine.generate(unchunked)))
    assert compare_traces(expected, answer, oracle.default_profile(), oracle.decode).verdict == PASS
    answer = Trace(list(engine.generate(chunked)))
    assert compare_traces(expected, answer, oracle.default_profile(), oracle.decode).verdict == FAIL


@pytest.mark.smollm
@pytest.mark.peer
def test_mlx_lm_on_smollm2_deviates_only_by_dropping_the_leading_space():
    from engines.registry import open_engine

    oracle = reference_oracle("smollm2-135m")
    engine = open_engine("mlx-lm", "smollm2-135m")
    cases = select_cases(load_cases(), "smollm2-135m")
    results = run_cases(cases, engine, oracle, oracle.default_profile())
    failed = {r.case_id: r for r in results if r.verdict == FAIL}
    # The batched window without sinks (MLX_LM_KNOWN_DEVIATIONS on dummy) shows here too:
    # a comparison finding, not a text one.
    window = failed.pop("combo/smollm2_batch+sliding_window")
    assert "text" not in {f.check for f in window.failures()}
    assert set(failed) == {"stream/smollm2", "text/smollm2_pieces"}
    for result in failed.values():
        assert {f.check for f in result.failures()} == {"text"}
    # The explanation, checked: mlx-lm's BPE streaming detokenizer trims the space that
    # starts the first generated token; tokens and the rest of the text are the reference's.
    request = build_request(case_by_id("text/smollm2_pieces").request, oracle)
    streamed = Trace(list(engine.generate(request)))
    decoded = oracle.decode(streamed.tokens)
    assert decoded.startswith(" ") and streamed.text == decoded[1:]
    assert streamed.tokens == oracle.answer(request).tokens


def case_by_id(case_id: str):
    return next(c for c in load_cases() if c.id == case_id)
