"""reference/kv_cache.py pinned down: the sliding window's rule checked against its
definition for every position, its trimming and slack, the unbounded cache's growth, and
every refusal of a damaged prompt-cache file, word for word (the message is what a user
reads to find the damaged field)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from reference.kv_cache import (
    KVCache,
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)


def positions(*values: int) -> mx.array:
    """Keys (and values) of shape (1, 1, n, 1) whose content is their absolute position."""
    return mx.array(values, dtype=mx.float32).reshape(1, 1, len(values), 1)


def feed(cache, start: int, n: int):
    keys = positions(*range(start, start + n))
    return cache.update_and_fetch(keys, keys)


def seen(keys: mx.array) -> list[int]:
    return [int(p) for p in keys[0, 0, :, 0].tolist()]


def visible_by_definition(p: int, q: int, max_size: int, keep: int) -> bool:
    """The documented rule: query p sees key q iff q <= p and (q < keep or p - q < window)."""
    return q <= p and (q < keep or p - q < max_size - keep)


# -- the sliding window ------------------------------------------------------------------


@pytest.mark.parametrize("max_size, keep", [(6, 2), (4, 1), (3, 2), (5, 0)])
@pytest.mark.parametrize("chunks", [(1,) * 12, (5, 1, 3, 1, 1, 2), (12,)])
def test_the_window_mask_and_stored_keys_follow_the_definition(max_size, keep, chunks):
    cache = RotatingKVCache(max_size=max_size, keep=keep)
    offset = 0
    for n in chunks:
        mask = cache.make_mask(n)
        keys, _ = feed(cache, offset, n)
        columns = seen(keys)
        expected = [
            [visible_by_definition(p, q, max_size, keep) for q in columns]
            for p in range(offset, offset + n)
        ]
        if mask is None:  # only a single query that sees every key returned
            assert n == 1 and all(expected[0])
        else:
            assert mask.tolist() == expected
        offset += n
        # Between calls: the sinks and window - 1 recent positions, nothing else.
        stored = seen(cache.keys)
        recent = list(range(max(keep, offset - (max_size - keep - 1)), offset))
        assert stored == list(range(min(keep, offset))) + recent
        assert cache.size() == len(stored) == min(offset, max_size - 1)


def test_a_single_query_seeing_everything_needs_no_mask_and_one_that_does_not_gets_one():
    cache = RotatingKVCache(max_size=4, keep=1)
    feed(cache, 0, 3)
    assert cache.make_mask(1) is None  # 0, 1, 2 stored; 3 sees all four
    # Several queries always get a mask, even when each of them sees every stored key.
    assert RotatingKVCache(max_size=4, keep=1).make_mask(2).tolist() == [
        [True, False],
        [True, True],
    ]
    fresh = RotatingKVCache(max_size=4, keep=1)
    feed(fresh, 0, 6)  # now 0, 4, 5 stored; query 6 cannot see 4 any more? it can: 6-4 < 3
    assert fresh.make_mask(1) is None
    assert fresh.make_mask(2).tolist() == [
        [True, True, True, True, False],
        [True, False, True, True, True],
    ]


def test_a_window_of_one_keeps_only_the_sinks_between_calls():
    cache = RotatingKVCache(max_size=3, keep=2)  # window 1: a token sees the sinks and itself
    for position in range(5):
        keys, _ = feed(cache, position, 1)
        assert seen(keys) == sorted({q for q in (0, 1, position) if q <= position})
        assert seen(cache.keys) == list(range(min(2, position + 1)))


def test_max_size_must_exceed_keep_and_keep_defaults_to_none():
    with pytest.raises(ValueError) as raised:
        RotatingKVCache(max_size=4, keep=4)
    assert str(raised.value) == "max_size (4) must exceed keep (4)"
    assert RotatingKVCache(max_size=5, keep=4).window == 1
    default = RotatingKVCache(max_size=3)
    assert (default.keep, default.slack, default.keys, default.values) == (0, 0, None, None)
    assert (default.offset, default.nbytes) == (0, 0)


def test_empty_is_offset_zero_for_both_caches():
    for cache in (KVCache(), RotatingKVCache(max_size=4)):
        assert cache.empty()
        feed(cache, 0, 1)
        assert not cache.empty()


# -- trimming and slack ------------------------------------------------------------------


def test_a_window_is_trimmable_until_its_first_eviction():
    cache = RotatingKVCache(max_size=4, keep=1)
    feed(cache, 0, 3)
    assert cache.is_trimmable() and cache.trimmable() == 3  # offset 3 = max_size - 1
    feed(cache, 3, 1)
    assert cache.offset == 4 and not cache.is_trimmable()  # position 1 was evicted
    assert cache.trimmable() == 0
    with pytest.raises(ValueError) as raised:
        cache.trim(1)
    assert str(raised.value) == (
        "cannot trim 1 positions exactly from a sliding window of 4 at offset 4 (slack 0); "
        "at most 0"
    )


def test_slack_stores_extra_recent_keys_that_can_be_trimmed_exactly():
    cache = RotatingKVCache(max_size=4, keep=1, slack=2)
    feed(cache, 0, 9)
    assert cache.is_trimmable()
    # Sink 0, window - 1 = 2 recent (7, 8) and 2 slack positions (5, 6) before them.
    assert seen(cache.keys) == [0, 5, 6, 7, 8]
    assert cache.size() == 5 and cache.trimmable() == 2
    # Query 9 sees sink 0, 7, 8 and itself; the slack positions 5 and 6 are stored but masked.
    assert cache.make_mask(1).tolist() == [[True, False, False, True, True, True]]
    assert cache.trim(2) == 2
    assert cache.offset == 7 and seen(cache.keys) == [0, 5, 6]
    # Query 7 sees exactly what it saw before positions 7 and 8 were added.
    assert cache.make_mask(1) is None
    assert cache.trimmable() == 0
    with pytest.raises(ValueError, match=r"cannot trim 1 .* \(slack 2\); at most 0"):
        cache.trim(1)
    one = RotatingKVCache(max_size=4, keep=1, slack=1)
    feed(one, 0, 9)
    assert one.is_trimmable() and one.trimmable() == 1


def test_trimming_more_than_the_offset_trims_the_offset():
    for cache in (KVCache(), RotatingKVCache(max_size=8, keep=2)):
        feed(cache, 0, 3)
        assert cache.trim(10) == 3 and cache.offset == 0
    assert RotatingKVCache(max_size=8).trim(2) == 0


def test_trim_prompt_cache_trims_every_layer_or_none():
    assert trim_prompt_cache([], 3) == 0
    layers = [KVCache(), KVCache()]
    for layer in layers:
        feed(layer, 0, 5)
    assert trim_prompt_cache(layers, 2) == 2
    assert [layer.offset for layer in layers] == [3, 3]
    full = RotatingKVCache(max_size=4, keep=1)
    feed(full, 0, 6)
    mixed = [KVCache(), full]
    feed(mixed[0], 0, 6)
    assert trim_prompt_cache(mixed, 2) == 0  # one layer cannot: nothing is trimmed
    assert [layer.offset for layer in mixed] == [6, 6]


# -- the unbounded cache ------------------------------------------------------------------


def test_the_unbounded_cache_grows_in_steps_and_keeps_its_dtype_and_content():
    cache = KVCache()
    keys = mx.ones((1, 2, 3, 4), dtype=mx.float16)
    cache.update_and_fetch(keys, keys)
    assert cache.keys.shape == (1, 2, KVCache.step, 4) and cache.keys.dtype == mx.float16
    assert cache.values.dtype == mx.float16
    fill = KVCache.step - 3
    more = mx.zeros((1, 2, fill, 4), dtype=mx.float16)
    cache.update_and_fetch(more, more)
    assert cache.keys.shape[2] == KVCache.step  # exactly full: no growth yet
    got, _ = cache.update_and_fetch(keys[..., :1, :], keys[..., :1, :])
    assert cache.keys.shape[2] == 2 * KVCache.step
    assert got.shape == (1, 2, KVCache.step + 1, 4)
    column = got[0, 0, :, 0].tolist()
    assert column[:3] == [1, 1, 1] and set(column[3:-1]) == {0} and column[-1] == 1


def test_the_unbounded_cache_mask_is_causal_from_its_offset():
    cache = KVCache()
    assert cache.make_mask(1) is None
    feed(cache, 0, 2)
    assert cache.make_mask(2).tolist() == [[True, True, True, False], [True, True, True, True]]


# -- which cache a model gets ------------------------------------------------------------


@pytest.mark.parametrize("size, keep", [(2, 1), (3, 1), (4, 2), (5, 2), (7, 3), (8, 4), (9, 4)])
def test_a_max_kv_size_window_keeps_half_its_size_up_to_four_sinks(dummy, size, keep):
    model, _ = dummy
    cache = make_prompt_cache(model, max_kv_size=size)
    assert len(cache) == len(model.layers)
    assert all(type(c) is RotatingKVCache for c in cache)
    assert [(c.max_size, c.keep) for c in cache] == [(size, keep)] * len(cache)
    assert all(type(c.keep) is int for c in cache)


@pytest.mark.parametrize("bad", [1, 0, 2.0, "8"])
def test_a_max_kv_size_below_two_or_not_an_integer_is_refused(dummy, bad):
    with pytest.raises(ValueError) as raised:
        make_prompt_cache(dummy[0], max_kv_size=bad)
    assert str(raised.value) == f"max_kv_size must be an integer >= 2, got {bad!r}"


def test_a_model_with_its_own_cache_gets_it(loaded_models):
    model, _ = loaded_models("dummy-qwen2")  # layer 1 slides a 16-token window
    cache = make_prompt_cache(model)
    assert [type(c).__name__ for c in cache] == [type(c).__name__ for c in model.make_cache()]
    assert any(type(c) is RotatingKVCache for c in cache)


# -- prompt-cache files -------------------------------------------------------------------


def write(path, layers, arrays=None, user=None):
    header = {"lmconform.layers": json.dumps(layers) if not isinstance(layers, str) else layers}
    if user is not None:
        header["lmconform.user"] = user
    mx.save_safetensors(str(path), arrays or {}, header)
    return str(path)


GOOD = {"class": "KVCache", "offset": 2}
KEYS = mx.zeros((1, 1, 2, 4))


def refusal(path) -> str:
    with pytest.raises(ValueError) as raised:
        load_prompt_cache(path)
    return str(raised.value)


@pytest.mark.parametrize(
    "layer, arrays, problem",
    [
        (5, {}, "class 5 is not one of ['KVCache', 'RotatingKVCache']"),
        ({"class": "Pickle"}, {}, "class 'Pickle' is not one of ['KVCache', 'RotatingKVCache']"),
        ({"offset": 0}, {}, "class None is not one of ['KVCache', 'RotatingKVCache']"),
        ({"class": "KVCache", "offset": -1}, {}, "fields {'offset': -1} must be integers >= 0"),
        ({"class": "KVCache", "offset": True}, {}, "fields {'offset': True} must be integers >= 0"),
        ({"class": "KVCache", "offset": 1.5}, {}, "fields {'offset': 1.5} must be integers >= 0"),
        ({"class": "KVCache"}, {}, "fields []; a KVCache has ['offset']"),
        (
            {"class": "RotatingKVCache", "offset": 0, "max_size": 2, "keep": 4},
            {},
            (
                "fields ['keep', 'max_size', 'offset'] do not describe a RotatingKVCache "
                "(max_size (2) must exceed keep (4))"
            ),
        ),
        (
            {"class": "RotatingKVCache", "offset": 0, "max_size": 4, "keep": 1, "slack": 0},
            {},
            (
                "fields ['keep', 'max_size', 'offset', 'slack']; a RotatingKVCache has "
                "['keep', 'max_size', 'offset']"
            ),
        ),
        ({"class": "KVCache", "offset": 3}, {}, "offset 3 but no keys stored"),
        (GOOD, {"1.keys": KEYS}, "keys and values must be saved together"),
        (
            GOOD,
            {"1.keys": KEYS, "1.values": mx.zeros((1, 1, 2))},
            "keys (1, 1, 2, 4) and values (1, 1, 2) do not match",
        ),
        (
            GOOD,
            {"1.keys": mx.zeros((1, 1, 2)), "1.values": KEYS},
            "keys (1, 1, 2) and values (1, 1, 2, 4) do not match",
        ),
        (
            GOOD,
            {"1.keys": KEYS, "1.values": mx.zeros((1, 1, 3, 4))},
            "keys (1, 1, 2, 4) and values (1, 1, 3, 4) do not match",
        ),
        (
            {"class": "KVCache", "offset": 5},
            {"1.keys": KEYS, "1.values": KEYS},
            "offset 5 does not match the 2 stored positions",
        ),
    ],
)
def test_a_damaged_layer_is_refused_naming_file_layer_and_field(tmp_path, layer, arrays, problem):
    """Layer 0 is sound; layer 1 carries the damage."""
    sound = {"0.keys": KEYS, "0.values": KEYS}
    path = write(tmp_path / "c.safetensors", [GOOD, layer], {**sound, **arrays})
    assert refusal(path) == f"{path}: layer 1: {problem}"


def test_header_fields_are_refused_naming_the_field(tmp_path):
    path = write(tmp_path / "a.safetensors", "not json")
    assert refusal(path).startswith(f"{path}: metadata 'lmconform.layers' is not valid JSON (")
    path = write(tmp_path / "b.safetensors", '{"a": 1}')
    assert refusal(path) == f"{path}: metadata 'lmconform.layers' must be a JSON list"
    path = write(tmp_path / "c.safetensors", [], user="[1]")
    assert refusal(path) == f"{path}: metadata 'lmconform.user' must be a JSON dict"
    path = write(tmp_path / "d.safetensors", [], user="{")
    assert refusal(path).startswith(f"{path}: metadata 'lmconform.user' is not valid JSON (")
    path = tmp_path / "e.safetensors"
    mx.save_safetensors(str(path), {"x": mx.zeros((1,))})
    assert refusal(str(path)) == f"{path}: not a prompt cache written by save_prompt_cache"
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"garbage")
    assert refusal(str(path)).startswith(f"{path}: not a readable .safetensors file (")


def test_arrays_of_no_layer_are_refused_and_named(tmp_path):
    arrays = {"0.keys": KEYS, "0.values": KEYS, **{f"{i}.keys": KEYS for i in range(5, 9)}}
    path = write(tmp_path / "c.safetensors", [GOOD], arrays)
    assert refusal(path) == f"{path}: arrays ['5.keys', '6.keys', '7.keys'] belong to no layer"


def test_a_sound_file_loads_with_or_without_its_metadata(tmp_path):
    cache = [KVCache(), RotatingKVCache(max_size=4, keep=1, slack=1), KVCache()]
    feed(cache[0], 0, 3)
    feed(cache[1], 0, 7)
    path = str(tmp_path / "c.safetensors")
    save_prompt_cache(path, cache)
    loaded, user = load_prompt_cache(path, return_metadata=True)
    assert user == {}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert [c.offset for c in loaded] == [3, 7, 0]
    assert (loaded[1].max_size, loaded[1].keep, loaded[1].slack) == (4, 1, 1)
    assert seen(loaded[0].keys) == [0, 1, 2] and seen(loaded[1].keys) == [0, 4, 5, 6]
    assert loaded[2].keys is None and loaded[2].empty()
    plain = load_prompt_cache(path)
    assert isinstance(plain, list) and [c.offset for c in plain] == [3, 7, 0]
    write(tmp_path / "u.safetensors", [], user='{"note": "x"}')
    assert load_prompt_cache(str(tmp_path / "u.safetensors"), True) == ([], {"note": "x"})


def test_growth_follows_positions_not_the_head_size():
    """A head wider than the storage step must not be mistaken for room to grow into."""
    cache = KVCache()
    wide = mx.ones((1, 1, 3, 2 * KVCache.step))
    cache.update_and_fetch(wide, wide)
    more = mx.full((1, 1, KVCache.step - 2, 2 * KVCache.step), 2.0)
    keys, _ = cache.update_and_fetch(more, more)
    assert cache.keys.shape[2] == 2 * KVCache.step
    assert keys.shape[2] == KVCache.step + 1
    assert keys[0, 0, :, 0].tolist() == [1.0] * 3 + [2.0] * (KVCache.step - 2)
