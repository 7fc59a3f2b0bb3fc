"""Batched KV caches: one row per sequence, every key labelled with its position.

A batch holds sequences of different lengths, so the rows of a cache cannot
share one ``offset``. The design here is the obvious one:

* Every stored key slot carries the **absolute position** of its token in its
  own sequence, or ``PAD`` (-1) for a slot that holds no token of the row.
  These labels live on the host (NumPy), next to the keys and values (MLX).
* The **mask** is a pure function of those labels: a query at position p sees
  a key at position q iff q is a real position, ``q <= p``, and (for a sliding
  window) ``q < keep`` or ``p - q < max_size - keep``. This is exactly the rule
  of ``KVCache`` / ``RotatingKVCache``, so a row sees the same keys it would see
  alone, however the batch is laid out and however the prompt was chunked.
* After each update, each row keeps the slots a *future* query can still see
  (for a window: the ``keep`` first positions and the recent ones), packed to
  the right end in temporal order. Shorter rows are padded on the left.

Prompts of different lengths are left-padded: ``prepare(left_padding)`` says
how many incoming columns of each row are padding. Those columns are labelled
``PAD`` and never seen by real queries; a padding query sees only itself, so
its (discarded) output stays finite.

Rows can join (``merge`` from single caches, ``extend``), leave (``filter``) and
be handed back as a plain ``KVCache`` / ``RotatingKVCache`` (``extract``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .kv_cache import KVCache, RotatingKVCache

PAD = -1


def incoming_positions(next_position: np.ndarray, padding: np.ndarray, n: int) -> np.ndarray:
    """Positions of ``n`` new columns per row: ``padding`` PAD columns, then the next tokens."""
    column = np.arange(n)[None]
    positions = next_position[:, None] + column - padding[:, None]
    return np.where(column < padding[:, None], PAD, positions)


def visible(queries: np.ndarray, keys: np.ndarray, keep: int, window: int | None) -> np.ndarray:
    """``visible[b, i, j]``: may query i of row b attend to key j? (causal, window, sinks)."""
    q, k = queries[:, :, None], keys[:, None, :]
    sees = (k != PAD) & (k <= q)
    if window is not None:
        sees &= (k < keep) | (q - k < window)
    return sees


def retained(positions: np.ndarray, next_position: np.ndarray, keep: int, window: int | None):
    """Slots that some future query (at ``next_position`` or later) can still see."""
    keys = positions != PAD
    if window is not None:
        keys &= (positions < keep) | (next_position[:, None] - positions < window)
    return keys


def packing(kept: np.ndarray) -> np.ndarray | None:
    """Column indices that move each row's kept slots to the right end, in order.

    Returns None when the layout is already packed (the common case in decoding).
    Rows with fewer kept slots get filler columns on the left (re-labelled PAD).
    """
    count = kept.sum(axis=1)
    width, total = int(count.max(initial=0)), kept.shape[1]
    if width == total and (kept == (np.arange(total)[None] >= total - count[:, None])).all():
        return None
    # A stable sort on "kept" puts dropped slots first and keeps temporal order.
    order = np.argsort(kept, axis=1, kind="stable")
    return order[:, total - width :]


class BatchKVCache:
    """Keys/values (B, heads, T, dim) of a batch, with position labels (B, T) on the host.

    ``max_size=None`` is the batch version of ``KVCache``; otherwise of
    ``RotatingKVCache(max_size, keep)``, with the same window and ``keep`` rule for
    every row. (mlx-lm 0.32.2's batched rotating cache ignores ``keep``; here the
    sinks are kept, so batched output equals single-sequence output.)
    """

    def __init__(self, batch_size: int, max_size: int | None = None, keep: int = 0):
        self.max_size, self.keep = max_size, keep
        self.window = None if max_size is None else max_size - keep
        self.keys = self.values = None  # None until some row holds a token
        self.positions = np.full((batch_size, 0), PAD)
        self.next_position = np.zeros(batch_size, np.int64)  # position of each row's next token
        self.padding = np.zeros(batch_size, np.int64)  # PAD columns still to come, per row

    # -- rows joining and leaving ----------------------------------------------------------
    @classmethod
    def merge(cls, caches: list) -> BatchKVCache:
        """One row per single-sequence cache (all of one kind); the caches are not modified."""
        merged = cls.from_single(caches[0])
        for cache in caches[1:]:
            merged.extend(cls.from_single(cache))
        return merged

    @classmethod
    def from_single(cls, cache: KVCache | RotatingKVCache) -> BatchKVCache:
        rotating = isinstance(cache, RotatingKVCache)
        batch = cls(1, cache.max_size, cache.keep) if rotating else cls(1)
        if cache.keys is not None and cache.offset > 0:
            positions = np.array(cache.stored_positions()) if rotating else np.arange(cache.offset)
            stored = len(positions)
            batch.keys, batch.values = cache.keys[..., :stored, :], cache.values[..., :stored, :]
            batch.positions = positions[None]
        batch.next_position[0] = cache.offset
        return batch

    def extend(self, other: BatchKVCache) -> None:
        """Append the rows of ``other`` (same kind of cache) below these rows."""
        width = max(self.size(), other.size())
        like = self.keys if self.keys is not None else other.keys
        top, bottom = self._padded(width, like), other._padded(width, like)
        if like is not None:
            self.keys = mx.concatenate([top[0], bottom[0]])
            self.values = mx.concatenate([top[1], bottom[1]])
        self.positions = np.concatenate([top[2], bottom[2]])
        self.next_position = np.concatenate([self.next_position, other.next_position])
        self.padding = np.concatenate([self.padding, other.padding])

    def _padded(self, width: int, like: mx.array | None):
        """Keys, values and positions with PAD slots added on the left up to ``width``."""
        positions = np.pad(self.positions, ((0, 0), (width - self.size(), 0)), constant_values=PAD)
        if like is None:
            return None, None, positions
        if self.keys is None:
            zeros = mx.zeros((len(positions), like.shape[1], width, like.shape[3]), like.dtype)
            return zeros, zeros, positions
        slots = [(0, 0), (0, 0), (width - self.size(), 0), (0, 0)]
        return mx.pad(self.keys, slots), mx.pad(self.values, slots), positions

    def filter(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order)."""
        if self.keys is not None:
            index = mx.array(rows, dtype=mx.int32)
            self.keys, self.values = self.keys[index], self.values[index]
        self.positions, self.next_position = self.positions[rows], self.next_position[rows]
        self.padding = self.padding[rows]
        self._pack()  # the rows that left may have been the longest

    def extract(self, row: int) -> KVCache | RotatingKVCache:
        """Row ``row`` as a single-sequence cache (e.g. for ``stream_generate``).

        A packed row holds its tokens in temporal order, sinks first: exactly the
        layout of a ``KVCache`` or ``RotatingKVCache`` at the same offset.
        """
        cache = KVCache() if self.max_size is None else RotatingKVCache(self.max_size, self.keep)
        count = int((self.positions[row] != PAD).sum())
        if self.keys is not None and count:
            start = self.size() - count
            cache.keys = mx.contiguous(self.keys[row : row + 1, :, start:])
            cache.values = mx.contiguous(self.values[row : row + 1, :, start:])
        cache.offset = int(self.next_position[row])
        return cache

    # -- what the model calls ------------------------------------------------------------
    def prepare(self, left_padding: list[int]) -> None:
        """The next incoming columns of row b start with ``left_padding[b]`` PAD columns."""
        self.padding = np.asarray(left_padding, dtype=np.int64)

    @property
    def offset(self) -> mx.array:
        """RoPE position of the first incoming column of each row (padding runs up to it)."""
        return mx.array(self.next_position - self.padding, dtype=mx.int32)

    def make_mask(self, n: int) -> mx.array | None:
        queries = incoming_positions(self.next_position, self.padding, n)
        keys = np.concatenate([self.positions, queries], axis=1)
        sees = visible(queries, keys, self.keep, self.window)
        # Every query sees its own slot: a padding query then attends to something
        # (its output is thrown away, but it must not be NaN).
        sees[:, :, -n:] |= np.eye(n, dtype=bool)
        return None if sees.all() else mx.array(sees)[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        new = incoming_positions(self.next_position, self.padding, n)
        self.next_position = self.next_position + (new != PAD).sum(axis=1)
        self.padding = np.maximum(self.padding - n, 0)
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        self.positions = np.concatenate([self.positions, new], axis=1)
        self._pack()
        return keys, values  # this step attends over the unpacked layout, as make_mask says

    def _pack(self) -> None:
        """Drop slots no future query can see; pack each row's kept slots to the right."""
        kept = retained(self.positions, self.next_position, self.keep, self.window)
        index = packing(kept)
        if index is None:
            return
        self.positions = np.where(
            np.take_along_axis(kept, index, axis=1),
            np.take_along_axis(self.positions, index, axis=1),
            PAD,
        )
        if self.keys is not None:
            gather = mx.array(index)[:, None, :, None]
            self.keys = mx.take_along_axis(self.keys, gather, axis=2)
            self.values = mx.take_along_axis(self.values, gather, axis=2)

    # -- bookkeeping, as for single caches -------------------------------------------------
    @property
    def state(self):
        return self.keys, self.values

    def size(self) -> int:
        return self.positions.shape[1]

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
