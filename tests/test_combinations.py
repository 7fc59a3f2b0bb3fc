"""Combinations as data: the pairs cases.toml declares become cases of the right kind."""

from __future__ import annotations

import itertools
import tomllib

import numpy as np
import pytest
from conformance_helpers import dummy_oracle, make_trace

from conformance.catalogue import (
    CASES_FILE,
    CatalogueError,
    build_request,
    combination_cases,
    load_cases,
)
from conformance.checks.sampled import judge_sampled_path
from conformance.profiles import PROFILES
from engines.protocol import SamplerSettings


def spec():
    with open(CASES_FILE, "rb") as f:
        return tomllib.load(f)["combinations"]


def combos(model):
    return {c.id: c for c in load_cases() if c.id.startswith("combo/") and model in c.models}


def test_every_pair_not_excluded_is_generated_on_dummy():
    data = spec()
    names = [v["name"] for v in data["variant"]]
    excluded = {frozenset(e["pair"]) for e in data["exclude"]}
    expected = {
        f"combo/{a}+{b}"
        for a, b in itertools.combinations(names, 2)
        if frozenset((a, b)) not in excluded
    }
    assert set(combos("dummy")) == expected
    assert len(expected) == len(names) * (len(names) - 1) // 2 - len(excluded)
    assert all(e["why"].strip() for e in data["exclude"])


def test_smollm2_gets_batch_with_a_window_and_batch_with_a_prompt_cache():
    assert set(combos("smollm2-135m")) == {
        "combo/smollm2_batch+sliding_window",
        "combo/smollm2_batch+prompt_cache",
    }


def test_the_kind_follows_the_roles():
    cases = combos("dummy")
    # A check variant decides the kind, its partner enters every row or the request.
    window = cases["combo/batch+sliding_window"]
    assert window.kind == "batch"
    assert {row["max_kv_size"] for row in window.params["rows"]} == {8}
    assert cases["combo/streaming+penalties"].kind == "stream"
    assert cases["combo/prompt_cache+stop_sequence"].params["follow"] == "continue"
    # shape x invariant: the invariant against the shaped request.
    chunked = cases["combo/sliding_window+prefill_chunking"]
    assert chunked.kind == "invariance" and chunked.request["max_kv_size"] == 8
    assert chunked.params["variants"] == [{"prefill_step_size": 3}]
    # Two shapes: both in one request, compared with the reference.
    both = cases["combo/penalties+stop_sequence"]
    assert both.kind == "equivalence" and "processors" in both.request
    assert "stop_sequences" in both.request
    # Two invariants: together, against the plain request.
    plain = cases["combo/prefill_chunking+speculative"]
    assert plain.kind == "invariance" and set(plain.params["variants"][0]) == {
        "prefill_step_size",
        "draft",
    }
    cached = cases["combo/batch+prompt_cache"]
    assert cached.kind == "batch" and all(r["cache_prefix"] == 2 for r in cached.params["rows"])


def test_batch_rows_have_different_lengths_and_all_pass_the_window():
    oracle = dummy_oracle()
    case = combos("dummy")["combo/batch+sliding_window"]
    rows = [build_request(row, oracle) for row in case.params["rows"]]
    lengths = [len(r.prompt) for r in rows]
    assert len(set(lengths)) == len(lengths)
    # Every row's cache rotates before its generation ends.
    assert all(len(r.prompt) + r.max_tokens > r.max_kv_size for r in rows)


def test_malformed_combinations_are_refused():
    data = spec()
    bad_exclude = {**data, "exclude": [{"pair": ["batch", "teleport"], "why": "?"}]}
    with pytest.raises(CatalogueError, match="unknown variants"):
        combination_cases(bad_exclude)
    two_checks = {**data, "exclude": [], "model": [{"name": "dummy", "pairs": "all"}]}
    with pytest.raises(CatalogueError, match="two checks"):
        combination_cases(two_checks)  # batch x streaming is no longer excluded
    asked_excluded = {**data, "model": [{"name": "dummy", "pairs": [["batch", "streaming"]]}]}
    with pytest.raises(CatalogueError, match="excluded"):
        combination_cases(asked_excluded)


def test_the_edge_variants_enter_every_row_and_request():
    cases = combos("dummy")
    batch_one = cases["combo/batch+max_tokens_one"]
    assert {row["max_tokens"] for row in batch_one.params["rows"]} == {1}
    # Each row stops at its own reference token: the stop tokens differ per row.
    oracle = dummy_oracle()
    rows = [build_request(r, oracle) for r in cases["combo/batch+stop_token"].params["rows"]]
    assert len({tuple(r.stop_tokens) for r in rows}) == len(rows)
    assert cases["combo/streaming+top_logprobs"].request["top_logprobs"] > 5
    sampled = cases["combo/batch+sampling"]
    assert all(row["sampler"]["seed"] is not None for row in sampled.params["rows"])
    # A one-token answer has no step 2 for the stop variants to refer to.
    assert "combo/max_tokens_one+stop_token" not in cases
    assert "combo/stop_sequence+max_tokens_one" not in cases
    assert "combo/sampling+speculative" not in cases


def test_a_sampled_path_is_judged_at_each_prefix():
    # Three tokens; after the prefix [0] the reference prefers token 2, elsewhere token 0.
    def logprobs_after(prefix):
        order = [2, 1, 0] if prefix[-1:] == [0] else [0, 1, 2]
        vector = np.full(3, -np.inf)
        vector[order] = np.log([0.6, 0.3, 0.1])
        return vector

    settings = SamplerSettings(temp=1.0, top_k=2)
    profile = PROFILES["fp32"]
    allowed = make_trace([0, 1], logprobs=[np.log(0.6), np.log(0.3)])
    assert judge_sampled_path(allowed, settings, logprobs_after, profile) == []
    # Token 0 after [0] is the reference's third: top_k 2 excludes it there, not at step 0.
    (excluded,) = judge_sampled_path(
        make_trace([0, 0], logprobs=[np.log(0.6), np.log(0.1)]), settings, logprobs_after, profile
    )
    assert excluded.step == 1 and "not among the 2 tokens" in excluded.problem
    (wrong,) = judge_sampled_path(
        make_trace([0, 1], logprobs=[np.log(0.6), np.log(0.5)]), settings, logprobs_after, profile
    )
    assert wrong.step == 1 and "logprob" in wrong.problem
