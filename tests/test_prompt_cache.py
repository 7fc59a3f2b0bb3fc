"""Prompt caches: continuation, save/load, trim, and sliding-window caches."""

from __future__ import annotations

import mlx.core as mx
import pytest

from reference import (
    KVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    generate_step,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from reference.dummy import STANDARD_PROMPTS


@pytest.fixture(
    scope="module", params=["dummy", pytest.param("smollm2-135m", marks=pytest.mark.smollm)]
)
def setup(request, loaded_models):
    model, tokenizer = loaded_models(request.param)
    return model, tokenizer.encode(STANDARD_PROMPTS[0])


def run(model, prompt, max_tokens, cache=None, **kwargs):
    return list(
        generate_step(mx.array(prompt), model, max_tokens=max_tokens, prompt_cache=cache, **kwargs)
    )


def assert_same(got, expected, atol=1e-4):
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert mx.abs(a - b).max().item() <= atol


def test_eight_then_eight_more_equals_sixteen(setup):
    model, prompt = setup
    whole = run(model, prompt, 16)
    cache = make_prompt_cache(model)
    first = run(model, prompt, 8, cache)
    # The loop runs one step ahead, so the cache already holds the 8th token:
    # drop it and feed it again to get the logits that follow it.
    assert cache[0].offset == len(prompt) + 8
    assert trim_prompt_cache(cache, 1) == 1
    rest = run(model, [first[-1][0]], 8, cache)
    assert_same(first + rest, whole)


def test_save_load_round_trip(setup, tmp_path):
    model, prompt = setup
    cache = make_prompt_cache(model)
    first = run(model, prompt, 4, cache)
    path = tmp_path / "cache.safetensors"
    save_prompt_cache(path, cache, metadata={"note": "four tokens"})
    loaded, metadata = load_prompt_cache(path, return_metadata=True)
    assert metadata == {"note": "four tokens"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert [c.offset for c in loaded] == [c.offset for c in cache]
    for a, b in zip(loaded, cache):
        assert mx.array_equal(a.state[0], b.state[0]) and mx.array_equal(a.state[1], b.state[1])
    trim_prompt_cache(cache, 1)
    trim_prompt_cache(loaded, 1)
    token = [first[-1][0]]
    assert_same(run(model, token, 4, loaded), run(model, token, 4, cache), atol=0)


def test_trim_then_regenerate_gives_same_tokens(setup):
    model, prompt = setup
    cache = make_prompt_cache(model)
    first = run(model, prompt, 6, cache)
    # Trim the 6 generated tokens and the last prompt token: back to the prompt prefix.
    assert trim_prompt_cache(cache, 7) == 7
    assert cache[0].offset == len(prompt) - 1
    again = run(model, prompt[-1:], 6, cache)
    assert_same(again, first)


def test_load_rejects_foreign_file(tmp_path):
    path = tmp_path / "not_a_cache.safetensors"
    mx.save_safetensors(str(path), {"x": mx.zeros((2,))})
    with pytest.raises(ValueError, match="not a prompt cache"):
        load_prompt_cache(path)


def test_rotating_cache_keeps_sinks_and_window():
    cache = RotatingKVCache(max_size=6, keep=2)
    for position in range(10):
        k = mx.full((1, 1, 1, 1), float(position))
        keys, _ = cache.update_and_fetch(k, k)
        visible = keys[0, 0, :, 0].tolist()
        # Sinks 0 and 1, then the 4 most recent positions, the new one included.
        expected = sorted(
            set(range(min(2, position + 1))) | set(range(max(0, position - 3), position + 1))
        )
        assert visible == expected
    assert not cache.is_trimmable()
    assert not can_trim_prompt_cache([cache, KVCache()])


def test_rotating_mask_follows_positions_for_chunks():
    cache = RotatingKVCache(max_size=4, keep=1)
    mask = cache.make_mask(6)
    # Query 5 sees sink 0 and positions 3, 4, 5; never a future position.
    assert mask[5].tolist() == [True, False, False, True, True, True]
    assert mask[2].tolist() == [True, True, True, False, False, False]


def test_max_kv_size_windows_keep_room_beyond_sinks(loaded_models):
    model, _ = loaded_models("dummy")
    with pytest.raises(ValueError, match="max_kv_size"):
        make_prompt_cache(model, max_kv_size=1)
    small, large = make_prompt_cache(model, max_kv_size=4), make_prompt_cache(model, max_kv_size=64)
    assert (small[0].max_size, small[0].keep) == (4, 2)
    assert (large[0].max_size, large[0].keep) == (64, 4)


def test_rotating_cache_save_load_keeps_window_and_continues_identically(loaded_models, tmp_path):
    model, tokenizer = loaded_models("dummy")
    prompt = tokenizer.encode(" ".join(STANDARD_PROMPTS))[:20]
    cache = make_prompt_cache(model, max_kv_size=8)
    first = run(model, prompt, 4, cache)
    path = tmp_path / "rotating.safetensors"
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert all(isinstance(c, RotatingKVCache) for c in loaded)
    assert [(c.max_size, c.keep, c.offset) for c in loaded] == [
        (c.max_size, c.keep, c.offset) for c in cache
    ]
    token = [first[-1][0]]
    assert_same(run(model, token, 4, loaded), run(model, token, 4, cache), atol=0)
