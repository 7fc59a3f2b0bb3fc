"""reference/batch_cache.py pinned down against its definition: every key is labelled with
its position (the keys here *are* their positions), so after each step of a batch with left
padding, rows joining and leaving, each real query must see exactly the positions the
single-sequence rule allows, a padding query only itself, and each row handed back must be
the single-sequence cache fed the same tokens."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from reference.batch_cache import (
    PAD,
    BatchKVCache,
    incoming_positions,
    packing,
    retained,
    visible,
)
from reference.kv_cache import KVCache, RotatingKVCache

KINDS = [(None, 0), (6, 2), (4, 1), (5, 0), (3, 2)]


def single(max_size, keep):
    return KVCache() if max_size is None else RotatingKVCache(max_size, keep)


def labels(columns: np.ndarray) -> mx.array:
    """Keys (B, 1, n, 1) whose content is each column's position (PAD for padding)."""
    return mx.array(columns.astype(np.float32))[:, None, :, None]


def allowed(p: int, max_size, keep) -> list[int]:
    """The positions query ``p`` sees, by the single-sequence rule."""
    return [q for q in range(p + 1) if max_size is None or q < keep or p - q < max_size - keep]


def content(cache) -> list | None:
    keys = cache.state[0]
    return None if keys is None else keys.tolist()


class Mirror:
    """A batch cache fed step by step, next to one single-sequence cache per row."""

    def __init__(self, max_size, keep, rows: int):
        self.max_size, self.keep = max_size, keep
        self.batch = BatchKVCache(rows, max_size, keep)
        self.singles = [single(max_size, keep) for _ in range(rows)]

    def step(self, lengths: list[int]) -> None:
        """Feed row b ``lengths[b]`` new tokens, left-padded to the longest."""
        n = max(lengths)
        padding = [n - length for length in lengths]
        self.batch.prepare(padding)
        starts = [s.offset for s in self.singles]
        assert self.batch.offset.tolist() == [s - p for s, p in zip(starts, padding)]
        columns = np.array([[PAD] * p + list(range(s, s + n - p)) for s, p in zip(starts, padding)])
        mask = self.batch.make_mask(n)
        keys, _ = self.batch.update_and_fetch(labels(columns), labels(columns))
        stored = np.array(keys[:, 0, :, 0]).astype(int)
        sees = np.ones((len(lengths), n, stored.shape[1]), bool) if mask is None else mask[:, 0]
        sees = np.array(sees)
        for b, (start, pad) in enumerate(zip(starts, padding)):
            for i in range(n):
                seen = sorted(stored[b, sees[b, i]].tolist())
                if i < pad:  # a padding query sees only its own slot
                    assert seen == [PAD] and sees[b, i].sum() == 1
                else:
                    assert seen == allowed(start + i - pad, self.max_size, self.keep)
            new = mx.array(columns[b, pad:].astype(np.float32))[None, None, :, None]
            self.singles[b].update_and_fetch(new, new)
        self.check()

    def check(self) -> None:
        for b, one in enumerate(self.singles):
            row = self.batch.extract(b)
            assert type(row) is type(one) and row.offset == one.offset
            if self.max_size is not None:
                assert (row.max_size, row.keep) == (self.max_size, self.keep)
            assert content(row) == content(one)
        assert self.batch.size() == self.batch.positions.shape[1]
        assert self.batch.next_position.tolist() == [s.offset for s in self.singles]
        assert not self.batch.padding.any()


@pytest.mark.parametrize("max_size, keep", KINDS)
def test_a_batch_sees_and_keeps_what_each_row_would_alone(max_size, keep):
    mirror = Mirror(max_size, keep, 3)
    mirror.step([3, 7, 1])  # prompts of different lengths
    for _ in range(4):
        mirror.step([1, 1, 1])
    mirror.step([2, 1, 3])  # chunks of different lengths
    # Row 1 leaves, the others continue.
    mirror.batch.filter([2, 0])
    mirror.singles = [mirror.singles[2], mirror.singles[0]]
    mirror.check()
    mirror.step([1, 1])
    # A new row joins with its own cache of 5 tokens.
    joining = single(max_size, keep)
    five = mx.arange(5, dtype=mx.float32)[None, None, :, None]
    joining.update_and_fetch(five, five)
    mirror.batch.extend(BatchKVCache.from_single(joining))
    mirror.singles.append(joining)
    mirror.check()
    for _ in range(3):
        mirror.step([1, 1, 1])


@pytest.mark.parametrize("max_size, keep", KINDS)
def test_merged_single_caches_continue_as_they_would_alone(max_size, keep):
    caches = [single(max_size, keep) for _ in range(3)]
    for cache, n in zip(caches, (0, 2, 9)):  # an empty one too
        if n:
            keys = mx.arange(n, dtype=mx.float32)[None, None, :, None]
            cache.update_and_fetch(keys, keys)
    mirror = Mirror(max_size, keep, 3)
    mirror.batch = BatchKVCache.merge(caches)
    mirror.singles = caches
    mirror.check()
    mirror.step([1, 1, 1])
    mirror.step([2, 1, 1])


def test_empty_batches_and_rows():
    batch = BatchKVCache.merge([KVCache(), KVCache()])
    assert batch.empty() and batch.nbytes == 0 and batch.state == (None, None)
    assert batch.size() == 0 and batch.window is None
    assert isinstance(batch.extract(1), KVCache) and batch.extract(1).keys is None
    batch.extend(BatchKVCache(1))  # nobody holds a token yet
    assert batch.keys is None and batch.positions.shape == (3, 0)
    rotating = BatchKVCache(2, max_size=5, keep=1)
    assert rotating.window == 4 and rotating.next_position.tolist() == [0, 0]
    keys = mx.zeros((2, 3, 2, 4), mx.float16)
    rotating.update_and_fetch(keys, keys)
    assert not rotating.empty() and rotating.nbytes == 2 * keys.nbytes
    assert rotating.state[0].dtype == mx.float16
    # A row joining without tokens gets zero keys of the batch's shape and dtype.
    rotating.extend(BatchKVCache(1, max_size=5, keep=1))
    assert rotating.keys.shape == (3, 3, 2, 4) and rotating.keys.dtype == mx.float16
    assert rotating.positions[2].tolist() == [PAD, PAD]


def test_the_pure_functions_on_a_small_example():
    assert incoming_positions(np.array([5, 0]), np.array([0, 2]), 4).tolist() == [
        [5, 6, 7, 8],
        [PAD, PAD, 0, 1],
    ]
    queries = np.array([[4]])
    keys = np.array([[0, 1, 2, 3, 4, PAD, 5]])
    assert visible(queries, keys, keep=0, window=None)[0, 0].tolist() == [
        True, True, True, True, True, False, False
    ]  # fmt: skip
    assert visible(queries, keys, keep=1, window=2)[0, 0].tolist() == [
        True, False, False, True, True, False, False
    ]  # fmt: skip
    positions = np.array([[PAD, 0, 1, 2, 3, 4]])
    assert retained(positions, np.array([5]), keep=1, window=3).tolist() == [
        [False, True, False, False, True, True]
    ]
    assert retained(positions, np.array([5]), keep=0, window=None).tolist() == [
        [False, True, True, True, True, True]
    ]
    # Packed: each row's kept slots at the right end, in order (a shorter row's filler left).
    assert packing(np.array([[False, True, True], [True, True, True]])) is None
    assert packing(np.array([[True, False, True], [True, True, True]])).tolist() == [
        [1, 0, 2],
        [0, 1, 2],
    ]
    assert packing(np.array([[True, True], [True, True]])) is None
    assert packing(np.array([[False, True], [False, True]])).tolist() == [[1], [1]]
    assert packing(np.array([[True, False, True], [False, False, True]])).tolist() == [
        [0, 2],
        [1, 2],
    ]
    assert packing(np.zeros((2, 0), bool)) is None


def test_no_mask_when_every_query_sees_every_key():
    batch = BatchKVCache(2)
    keys = mx.zeros((2, 1, 3, 2))
    batch.update_and_fetch(keys, keys)
    assert batch.make_mask(1) is None  # one decoding step, no padding: nothing to hide
    batch.prepare([1, 0])
    assert batch.make_mask(1) is not None  # row 0's next column is padding


def test_a_single_cache_holding_one_position_joins_the_batch_with_it():
    cache = KVCache()
    keys = mx.arange(8, dtype=mx.float32).reshape(1, 2, 1, 4)
    cache.update_and_fetch(keys, keys + 1)
    batch = BatchKVCache.from_single(cache)
    assert batch.positions.tolist() == [[0]] and batch.next_position.tolist() == [1]
    assert mx.array_equal(batch.keys, keys) and mx.array_equal(batch.values, keys + 1)


def test_a_bounded_batch_cache_keeps_no_sink_positions_unless_told():
    """As RotatingKVCache: ``keep`` defaults to 0, so the window is the whole max_size."""
    batch = BatchKVCache(2, max_size=8)
    assert (batch.keep, batch.window) == (0, 8)
