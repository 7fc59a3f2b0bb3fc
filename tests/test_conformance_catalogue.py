"""The case catalogue: well-formed data, request building, selection, expectations."""

from __future__ import annotations

import numpy as np
import pytest

from conformance.catalogue import (
    KINDS,
    Case,
    CatalogueError,
    build_request,
    check_expectations,
    load_cases,
    random_prompts,
    select_cases,
)
from conformance.checks import CHECKS
from engines.models import BUILTIN_MODELS, FAMILY_MODELS
from engines.protocol import CAPABILITIES, request_problem


class FakeOracle:
    """Byte tokenizer; embeddings = [token, 2*token]; greedy path = 100, 101, 102, ..."""

    def __init__(self):
        self.greedy_requests = []

    def encode(self, text):
        return list(text.encode())

    def encode_chat(self, text):
        return [1, *text.encode(), 2]

    def embed(self, tokens):
        return np.array([[t, 2 * t] for t in tokens], dtype=np.float32)

    def greedy_tokens(self, request):
        self.greedy_requests.append(request)
        return list(range(100, 100 + request.max_tokens))


def test_every_case_is_well_formed():
    cases = load_cases()
    assert len(cases) >= 40
    assert set(KINDS) == set(CHECKS)
    for case in cases:
        assert case.kind in KINDS and case.about and "/" in case.id
        assert set(case.models) <= set(BUILTIN_MODELS)
    models = {m for c in cases for m in c.models}
    assert models == {"dummy", *FAMILY_MODELS, "smollm2-135m"}


def dummy_cases():
    # The fake byte tokenizer is the dummy's; smollm2 cases name multi-byte tokens.
    return [c for c in load_cases() if "dummy" in c.models]


def test_every_case_builds_a_request_and_needs_only_known_capabilities():
    oracle = FakeOracle()
    for case in dummy_cases():
        request = build_request(case.request, oracle)
        assert request.capabilities_needed() <= set(CAPABILITIES)
        for variant in case.params.get("variants", []):
            assert build_request(case.request, oracle, **variant).capabilities_needed() <= set(
                CAPABILITIES
            )


def test_the_catalogue_covers_every_capability_and_the_design_checks():
    oracle = FakeOracle()
    needed = set()
    for case in dummy_cases():
        needed |= build_request(case.request, oracle).capabilities_needed()
        for variant in case.params.get("variants", []):
            needed |= build_request(case.request, oracle, **variant).capabilities_needed()
    kinds = {c.kind for c in dummy_cases()}
    needed |= {"batch"} if "batch" in kinds else set()
    needed |= {"stream"} if "stream" in kinds else set()
    needed |= {"score"} if "score" in kinds else set()
    needed |= {"prompt_cache"} if "prompt_cache" in kinds else set()
    assert needed >= set(CAPABILITIES) - {"logprobs"}
    ids = {c.id for c in load_cases()}
    for expected in (
        "batch/needle",
        "stopping/max_tokens_exact",
        "sampling/same_seed",
        "prompt_cache/continuation",
        "prefill/chunk_invariance",
        "text/utf8_pieces",
    ):
        assert expected in ids


def test_prompt_forms():
    oracle = FakeOracle()
    assert build_request({"prompt": "Hi"}, oracle).prompt == [72, 105]
    assert build_request({"chat": "Hi"}, oracle).prompt == [1, 72, 105, 2]
    assert build_request({"prompt_tokens": [5, 6]}, oracle).prompt == [5, 6]
    with pytest.raises(CatalogueError, match="exactly one of prompt, chat, prompt_tokens"):
        build_request({"prompt": "a", "chat": "b"}, oracle)


def test_embeddings_replace_the_prompt():
    oracle = FakeOracle()
    request = build_request({"prompt": "AB", "prompt_embeddings": "from_tokens"}, oracle)
    assert request.prompt == [] and request.prompt_embeddings == [[65, 130], [66, 132]]
    blend = build_request({"prompt": "AB", "prompt_embeddings": "blend"}, oracle).prompt_embeddings
    # Mixtures of neighbouring rows: no row equals any token's embedding.
    assert blend[1] == pytest.approx([0.6 * 66 + 0.4 * 65, 0.6 * 132 + 0.4 * 130])
    with pytest.raises(CatalogueError, match="from_tokens' or 'blend'"):
        build_request({"prompt": "AB", "prompt_embeddings": "noise"}, oracle)


def test_token_references():
    oracle = FakeOracle()
    spec = {
        "prompt": "x",
        "max_tokens": 8,
        "stop_tokens": ["@greedy[5]", 7],
        "stop_sequences": [["@greedy[1]", "@token:A"]],
        "processors": {"logit_bias": {"@greedy[0]": -100.0, "@token:e": 6.0, "3": 1.5}},
    }
    request = build_request(spec, oracle)
    assert request.stop_tokens == [105, 7]
    assert request.stop_sequences == [[101, 65]]
    assert request.processors.logit_bias == {100: -100.0, 101: 6.0, 3: 1.5}
    # The greedy path comes from the request without every field that refers to it.
    (plain,) = oracle.greedy_requests
    assert plain.stop_tokens == [] and plain.stop_sequences == [] and not plain.processors.active
    with pytest.raises(CatalogueError, match="encodes to 2 tokens"):
        build_request({"prompt": "x", "stop_tokens": ["@token:ab"]}, oracle)
    with pytest.raises(CatalogueError, match="has only 2 tokens"):
        build_request({"prompt": "x", "max_tokens": 2, "stop_tokens": ["@greedy[5]"]}, oracle)


def test_selection_by_model_and_pattern():
    cases = load_cases()
    dummy = select_cases(cases, "dummy")
    assert dummy and all("dummy" in c.models for c in dummy)
    assert {c.id for c in select_cases(cases, "dummy", "stopping")} == {
        c.id for c in dummy if c.id.startswith("stopping/")
    }
    picked = select_cases(cases, "dummy", "greedy/hello, sampling/top_*")
    assert {c.id for c in picked} == {
        "greedy/hello",
        "sampling/top_k",
        "sampling/top_p",
    }
    assert select_cases(cases, "smollm2-135m", "greedy/hello") == []


def test_expectations_catch_a_stale_case():
    case = Case(
        "x/y", "equivalence", ["dummy"], "", {}, expect={"finish_reason": "stop", "min_length": 3}
    )
    check_expectations(case, [1, 2, 3], "stop", "abc")
    with pytest.raises(
        CatalogueError, match="no longer tests what it says.*finish_reason 'length'"
    ):
        check_expectations(case, [1, 2, 3], "length", "abc")
    with pytest.raises(CatalogueError, match="1 tokens, expected at least 3"):
        check_expectations(case, [1], "stop", "a")
    utf8 = Case("t/u", "equivalence", ["dummy"], "", {}, expect={"multibyte_text": True})
    check_expectations(utf8, [1], "length", "caf\u00e9")
    with pytest.raises(CatalogueError, match="no multi-byte character"):
        check_expectations(utf8, [1], "length", "caf\ufffd")


def test_random_prompts_are_seeded():
    oracle = FakeOracle()
    a = random_prompts(oracle, 5, seed=3, min_chars=2, max_chars=9)
    assert a == random_prompts(oracle, 5, seed=3, min_chars=2, max_chars=9)
    assert a != random_prompts(oracle, 5, seed=4, min_chars=2, max_chars=9)
    assert all(2 <= len(p) <= 9 for p in a)


@pytest.mark.smollm
def test_every_smollm2_case_builds_with_the_real_tokenizer(loaded_models):
    from conformance_helpers import reference_oracle

    oracle = reference_oracle("smollm2-135m")
    for case in select_cases(load_cases(), "smollm2-135m"):
        request = build_request(case.request, oracle)
        assert request.prompt or request.prompt_embeddings
    bias = build_request(
        next(c for c in load_cases() if c.id == "logit_bias/smollm2_no_paris").request, oracle
    ).processors.logit_bias
    # DESIGN.md: the greedy reply is [504 "The", 3575, 282, 4649, 314, 7042 " Paris", 30, 2].
    assert bias == {7042: -100.0, 504: 3.0}


def test_every_request_the_validation_case_sends_is_invalid_and_its_base_is_valid():
    oracle = FakeOracle()
    case = next(c for c in load_cases() if c.kind == "request_validation")
    vocab = 260  # the dummy's
    assert request_problem(build_request(case.request, oracle), vocab) is None
    probes = case.params["invalid"] + case.params["process_only"]
    for overrides in probes:
        request = build_request(case.request, oracle, **overrides)
        assert request_problem(request, vocab) is not None, overrides
    # One probe for each way the data can break the rule, not the same one twice.
    problems = [request_problem(build_request(case.request, oracle, **o), vocab) for o in probes]
    assert len({p.split(" ")[0] for p in problems}) >= 6
