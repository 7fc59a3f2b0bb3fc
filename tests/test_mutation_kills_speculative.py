"""reference/speculative.py pinned down: every token count (including no limit), logits
processors seeing the same history as plain decoding, sliding windows trimmed exactly
through their slack, the caches it is given, and its refusals word for word."""

from __future__ import annotations

from itertools import islice

import mlx.core as mx
import pytest
from test_mutation_kills_generate import one_token_vocabulary_model

from reference import generate_step, make_logits_processors, make_prompt_cache
from reference.kv_cache import KVCache, RotatingKVCache
from reference.speculative import speculative_generate_step, with_slack


@pytest.fixture(scope="module")
def prompt(dummy):
    return mx.array(dummy[1].encode("The quick brown fox"))


def plain(model, prompt, max_tokens, **kwargs) -> list[int]:
    return [t for t, _ in generate_step(prompt, model, max_tokens=max_tokens, **kwargs)]


def spec(model, draft, prompt, max_tokens, k, **kwargs) -> list[tuple[int, bool]]:
    steps = speculative_generate_step(
        prompt, model, draft, num_draft_tokens=k, max_tokens=max_tokens, **kwargs
    )
    return [(t, from_draft) for t, _, from_draft in steps]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5])
def test_exactly_max_tokens_come_out_whatever_the_round_length(dummy, prompt, k, max_tokens):
    model, _ = dummy
    got = spec(model, model, prompt, max_tokens, k)
    assert [t for t, _ in got] == plain(model, prompt, max_tokens)
    # A self-draft is always right: k proposals then the target's own token, per round.
    assert [d for _, d in got] == [i % (k + 1) != k for i in range(max_tokens)]


def test_no_limit_runs_on_as_plain_decoding(dummy, dummy_draft, prompt):
    model, _ = dummy
    expected = plain(model, prompt, 14)
    for draft in (model, dummy_draft[0]):
        steps = speculative_generate_step(prompt, model, draft, num_draft_tokens=3, max_tokens=-1)
        assert [t for t, _, _ in islice(steps, 14)] == expected


def test_processors_see_the_same_history_as_plain_decoding(dummy, dummy_draft, prompt):
    model, _ = dummy

    def processors():
        return make_logits_processors(repetition_penalty=3.0, repetition_context_size=4)

    expected = plain(model, prompt, 16, logits_processors=processors())
    assert expected != plain(model, prompt, 16)  # the penalty changes the text
    for draft in (model, dummy_draft[0]):
        got = spec(model, draft, prompt, 16, 3, logits_processors=processors())
        assert [t for t, _ in got] == expected


def test_sliding_windows_stay_exact_past_their_window(loaded_models):
    model, tokenizer = loaded_models("dummy-qwen2")  # layer 1 slides a 16-token window
    prompt = mx.array(tokenizer.encode("one two three four five"))
    expected = plain(model, prompt, 30)
    for k in (2, 4):
        assert [t for t, _ in spec(model, model, prompt, 30, k)] == expected


def test_with_slack_gives_windows_room_and_leaves_other_caches_alone():
    window, unbounded = RotatingKVCache(16, keep=2), KVCache()
    slackened = with_slack([window, unbounded], 3)
    assert slackened[1] is unbounded
    assert type(slackened[0]) is RotatingKVCache
    assert (slackened[0].max_size, slackened[0].keep, slackened[0].slack) == (16, 2, 3)


def test_a_given_cache_holds_the_target_then_the_draft(dummy, dummy_draft, prompt):
    model, draft = dummy[0], dummy_draft[0]
    cache = make_prompt_cache(model) + make_prompt_cache(draft)
    got = spec(model, draft, prompt, 6, 2, prompt_cache=cache)
    assert [t for t, _ in got] == plain(model, prompt, 6)
    target, drafted = cache[: len(model.layers)], cache[len(model.layers) :]
    assert len(drafted) == len(draft.layers)
    # Each cache holds the prompt and the text up to the last token, which is not fed yet
    # (the draft may hold one proposal less: it never feeds its last one).
    assert {c.offset for c in target} == {len(prompt) + 5}
    assert {c.offset for c in drafted} <= {len(prompt) + 4, len(prompt) + 5}


def test_a_cache_that_evicted_is_refused(dummy, prompt):
    model, _ = dummy
    cache = make_prompt_cache(model, max_kv_size=4)
    plain(model, prompt, 1, prompt_cache=cache)  # the prompt is longer than the window
    for given in (cache + make_prompt_cache(model), make_prompt_cache(model) + cache):
        with pytest.raises(ValueError) as raised:
            spec(model, model, prompt, 2, 2, prompt_cache=given)
        assert str(raised.value) == (
            "speculative decoding needs trimmable caches (no evicted positions)"
        )


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2"])
def test_num_draft_tokens_must_be_a_positive_integer(dummy, prompt, bad):
    model, _ = dummy
    with pytest.raises(ValueError) as raised:
        spec(model, model, prompt, 2, bad)
    assert str(raised.value) == f"num_draft_tokens must be a positive integer, got {bad!r}"
    assert len(spec(model, model, prompt, 2, 1)) == 2


def test_a_self_draft_is_always_accepted_over_long_rounds(dummy, prompt):
    """Each proposal is fed to the draft alone, after the one before it: the draft then
    sees exactly the target's context and a self-draft never misses."""
    model, _ = dummy
    cache = make_prompt_cache(model) + make_prompt_cache(model)
    got = spec(model, model, prompt, 15, 4, prompt_cache=cache)
    assert [t for t, _ in got] == plain(model, prompt, 15)
    assert [d for _, d in got] == [True, True, True, True, False] * 3
    n = len(model.layers)
    # The target holds the prompt and 14 tokens; the draft one fewer: after a full
    # acceptance it has not yet fed its last proposal.
    assert {c.offset for c in cache[:n]} == {len(prompt) + 14}
    assert {c.offset for c in cache[n:]} == {len(prompt) + 13}


def test_the_defaults_are_mlx_lms(dummy, prompt):
    model, _ = dummy
    steps = list(speculative_generate_step(prompt, model, model))
    assert len(steps) == 256
    # Two proposals per round, then the target's own token.
    assert [d for _, _, d in steps[:6]] == [True, True, False] * 2


def test_the_last_round_proposes_no_more_than_is_left_so_the_caches_hold_only_the_text(
    dummy, prompt
):
    """5 tokens with 3 proposals per round: a full round (3 proposals and the target's
    token), then a round of one proposal. Neither cache may hold tokens never emitted, or
    a generation continued from them would see text that is not there."""
    model, _ = dummy
    cache = make_prompt_cache(model) + make_prompt_cache(model)
    got = spec(model, model, prompt, 5, 3, prompt_cache=cache)
    assert [d for _, d in got] == [True, True, True, False, True]
    n = len(model.layers)
    # The target fed all 5 (the last is a proposal); the draft all but its last proposal.
    assert {c.offset for c in cache[:n]} == {len(prompt) + 5}
    assert {c.offset for c in cache[n:]} == {len(prompt) + 4}


def test_with_a_one_token_vocabulary_each_logprobs_is_a_vector_of_one_zero():
    """Each yielded logprobs is the vocabulary's vector even when that has one entry (a
    squeeze of every unit axis would hand out a scalar)."""
    model = one_token_vocabulary_model()
    steps = list(speculative_generate_step(mx.array([0, 0, 0]), model, model, max_tokens=3))
    # one round: both proposals (the default 2) accepted, then the target's own token
    assert [(token, from_draft) for token, _, from_draft in steps] == [
        (0, True), (0, True), (0, False)
    ]
    for _, logprobs, _ in steps:
        assert logprobs.shape == (1,) and logprobs.tolist() == [0.0]
