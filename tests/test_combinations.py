"""Combinations as data: the pairs cases.toml declares become cases of the right kind."""

from __future__ import annotations

import itertools
import tomllib

import pytest
from conformance_helpers import dummy_oracle

from conformance.catalogue import (
    CASES_FILE,
    CatalogueError,
    build_request,
    combination_cases,
    load_cases,
)


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
