"""Key/value caches: the memory of past positions, and the masks that go with it.

Each attention layer owns one cache. A cache answers three questions:

* ``offset``: the absolute position of the next token (for RoPE);
* ``make_mask(n)``: which stored and new keys each of ``n`` new queries may see;
* ``update_and_fetch(k, v)``: store the new keys/values, return all visible ones.

``KVCache`` keeps everything. ``RotatingKVCache`` keeps the ``keep`` first
positions plus a sliding window; its keys are stored in temporal order, so the
mask follows from positions alone and is the same however the prompt was chunked.

Batched variants (one row per sequence, left padding) live in ``batch_cache.py``.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx


class StoredKeys:
    """What every single-sequence cache shares: rebuilding from saved state, and its size.

    ``meta_state`` holds the offset plus the constructor's arguments, so one
    ``from_state`` serves every cache class.
    """

    keys: mx.array | None
    values: mx.array | None
    offset: int

    @classmethod
    def from_state(cls, state, meta: dict[str, Any]):
        cache = cls(**{k: v for k, v in meta.items() if k != "offset"})
        cache.keys, cache.values = state
        cache.offset = meta["offset"]
        return cache

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class KVCache(StoredKeys):
    """Grows without bound; storage grows in ``step``-sized blocks to avoid copies."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start, end = self.offset, self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        capacity = -(-needed // self.step) * self.step

        def grown(old: mx.array | None, new: mx.array) -> mx.array:
            B, H, _, D = new.shape
            buffer = mx.zeros((B, H, capacity, D), new.dtype)
            if old is not None:
                buffer[..., : self.offset, :] = old[..., : self.offset, :]
            return buffer

        self.keys, self.values = grown(self.keys, keys), grown(self.values, values)

    def make_mask(self, n: int) -> mx.array | None:
        if n == 1:
            return None
        queries = mx.arange(self.offset, self.offset + n)
        return queries[:, None] >= mx.arange(self.offset + n)[None]

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None]:
        if self.keys is None:  # nothing stored yet: saved as a layer without arrays
            return None, None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def meta_state(self) -> dict[str, Any]:
        return {"offset": self.offset}


class RotatingKVCache(StoredKeys):
    """Keeps the first ``keep`` positions and a sliding window of recent ones.

    Semantics (exact, independent of how the input was chunked): the query at
    position p sees key position q iff ``q <= p`` and (``q < keep`` or
    ``p - q < max_size - keep``). Between calls at most ``max_size - 1``
    positions are stored: ``keep`` sinks and ``window - 1`` recent keys, so a
    single new token sees exactly ``max_size`` keys, itself included.

    ``slack`` more recent keys may be stored (masked out, never seen): they let
    the last ``slack`` positions be trimmed exactly after eviction has begun,
    which speculative decoding needs to take back rejected draft tokens.
    """

    def __init__(self, max_size: int, keep: int = 0, slack: int = 0):
        if max_size <= keep:
            raise ValueError(f"max_size ({max_size}) must exceed keep ({keep})")
        self.max_size = max_size
        self.keep = keep
        self.slack = slack
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def window(self) -> int:
        return self.max_size - self.keep

    def stored_positions(self) -> mx.array:
        stored = 0 if self.keys is None else self.keys.shape[2]
        sinks = min(self.keep, stored)
        recent = stored - sinks
        return mx.concatenate(
            [mx.arange(sinks), mx.arange(self.offset - recent, self.offset)]
        ).astype(mx.int32)

    def make_mask(self, n: int) -> mx.array | None:
        keys = mx.concatenate([self.stored_positions(), mx.arange(self.offset, self.offset + n)])
        queries = mx.arange(self.offset, self.offset + n)[:, None]
        visible = (keys[None] <= queries) & (
            (keys[None] < self.keep) | (queries - keys[None] < self.window)
        )
        if n == 1 and visible.all().item():
            return None
        return visible

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.offset += keys.shape[2]
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = self._retain(keys), self._retain(values)
        return keys, values

    def _retain(self, x: mx.array) -> mx.array:
        """Sinks plus the ``window - 1 + slack`` most recent positions of ``x``."""
        recent = self.window - 1 + self.slack
        if x.shape[2] <= self.keep + recent:
            return x
        tail = x[..., x.shape[2] - recent :, :] if recent else x[..., :0, :]
        return mx.concatenate([x[..., : self.keep, :], tail], axis=2)

    def size(self) -> int:
        return min(self.offset, self.max_size - 1 + self.slack)

    def empty(self) -> bool:
        return self.offset == 0

    def is_trimmable(self) -> bool:
        # Once positions have been evicted only the slack can be trimmed.
        return self.offset < self.max_size or self.slack > 0

    def trimmable(self) -> int:
        """How many of the last positions ``trim`` can take back exactly: all of them while
        nothing has been evicted, then those stored beyond the window."""
        stored = 0 if self.keys is None else self.keys.shape[2]
        if stored == self.offset:
            return self.offset
        return stored - self.keep - (self.window - 1)

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        if n > self.trimmable():
            # The window before the new end was partly evicted: refuse rather than be wrong.
            raise ValueError(
                f"cannot trim {n} positions exactly from a sliding window of {self.max_size} "
                f"at offset {self.offset} (slack {self.slack}); at most {self.trimmable()}"
            )
        self.offset -= n
        if self.keys is not None:
            stored = self.keys.shape[2] - n
            self.keys, self.values = self.keys[..., :stored, :], self.values[..., :stored, :]
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.keys, self.values

    @property
    def meta_state(self) -> dict[str, Any]:
        meta = {"offset": self.offset, "max_size": self.max_size, "keep": self.keep}
        # Only speculative decoding's caches have slack; others save as they always did.
        return meta | ({"slack": self.slack} if self.slack else {})


CACHE_CLASSES = {cls.__name__: cls for cls in (KVCache, RotatingKVCache)}


def make_prompt_cache(model, max_kv_size: int | None = None) -> list:
    """One cache per layer: the model's own kind, or a sliding window of ``max_kv_size``.

    As in mlx-lm, a window from ``max_kv_size`` keeps the first 4 positions as
    attention sinks; windows under 8 keep half of their size instead, so that a
    window always has room for recent positions (mlx-lm's ``max_kv_size=4``
    would keep nothing but the sinks). Unlike mlx-lm, ``max_kv_size`` is
    honoured even when the model has its own ``make_cache`` (mlx-lm silently
    ignores it there).
    """
    if max_kv_size is not None:
        if not isinstance(max_kv_size, int) or max_kv_size < 2:
            raise ValueError(f"max_kv_size must be an integer >= 2, got {max_kv_size!r}")
        keep = min(4, max_kv_size // 2)
        return [RotatingKVCache(max_size=max_kv_size, keep=keep) for _ in model.layers]
    if hasattr(model, "make_cache"):
        return model.make_cache()
    return [KVCache() for _ in model.layers]


def can_trim_prompt_cache(cache: list) -> bool:
    return all(c.is_trimmable() for c in cache)


def trim_prompt_cache(cache: list, num_tokens: int) -> int:
    """Drop the last ``num_tokens`` positions from every layer; return how many were dropped."""
    if not cache or not can_trim_prompt_cache(cache):
        return 0
    trimmed = [c.trim(num_tokens) for c in cache]  # every layer, not just the first
    return trimmed[0]


def save_prompt_cache(file_name: str, cache: list, metadata: dict[str, str] | None = None) -> None:
    """Write a cache to ``.safetensors``: arrays per layer, classes and offsets as metadata."""
    arrays = {}
    for i, layer in enumerate(cache):
        keys, values = layer.state
        if keys is not None:
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = keys, values
    layers = [{"class": type(c).__name__, **c.meta_state} for c in cache]
    header = {"lmconform.layers": json.dumps(layers), "lmconform.user": json.dumps(metadata or {})}
    mx.save_safetensors(str(file_name), arrays, header)


def load_prompt_cache(file_name: str, return_metadata: bool = False):
    """A cache written by ``save_prompt_cache``; its metadata is checked before use, so a
    damaged or foreign file is a ``ValueError`` naming the file and the field."""
    try:
        arrays, header = mx.load(str(file_name), return_metadata=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"{file_name}: not a readable .safetensors file ({error})") from None
    if "lmconform.layers" not in header:
        raise ValueError(f"{file_name}: not a prompt cache written by save_prompt_cache")
    layers = _json_field(file_name, header, "lmconform.layers", list)
    user = _json_field(file_name, header, "lmconform.user", dict, default="{}")
    cache = []
    for i, meta in enumerate(layers):
        state = (arrays.get(f"{i}.keys"), arrays.get(f"{i}.values"))
        problem = _layer_problem(meta, state)
        if problem:
            raise ValueError(f"{file_name}: layer {i}: {problem}")
        meta = dict(meta)
        cls = CACHE_CLASSES[meta.pop("class")]
        cache.append(cls.from_state(state, meta))
    names = {f"{i}.{kind}" for i in range(len(layers)) for kind in ("keys", "values")}
    extra = sorted(set(arrays) - names)
    if extra:
        raise ValueError(f"{file_name}: arrays {extra[:3]} belong to no layer")
    if return_metadata:
        return cache, user
    return cache


def _json_field(file_name, header: dict, name: str, kind: type, default: str | None = None):
    try:
        value = json.loads(header.get(name, default) if default is not None else header[name])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{file_name}: metadata {name!r} is not valid JSON ({error})") from None
    if not isinstance(value, kind):
        raise ValueError(  # noqa: TRY004 - a malformed file, not a wrong argument
            f"{file_name}: metadata {name!r} must be a JSON {kind.__name__}"
        )
    return value


def _layer_problem(meta, state) -> str | None:
    """What is wrong with one layer's saved metadata and arrays, or None."""
    if not isinstance(meta, dict) or meta.get("class") not in CACHE_CLASSES:
        found = meta.get("class") if isinstance(meta, dict) else meta
        return f"class {found!r} is not one of {sorted(CACHE_CLASSES)}"
    name = meta["class"]
    fields = {k: v for k, v in meta.items() if k != "class"}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in fields.values()):
        return f"fields {fields} must be integers >= 0"
    try:
        empty = CACHE_CLASSES[name](**{k: v for k, v in fields.items() if k != "offset"})
    except (TypeError, ValueError) as error:
        return f"fields {sorted(fields)} do not describe a {name} ({error})"
    if set(fields) != set(empty.meta_state):
        return f"fields {sorted(fields)}; a {name} has {sorted(empty.meta_state)}"
    empty.offset = fields["offset"]
    keys, values = state
    if (keys is None) != (values is None):
        return "keys and values must be saved together"
    if keys is None:
        return None if empty.offset == 0 else f"offset {empty.offset} but no keys stored"
    if keys.ndim != 4 or values.ndim != 4 or keys.shape[:3] != values.shape[:3]:
        return f"keys {tuple(keys.shape)} and values {tuple(values.shape)} do not match"
    if keys.shape[2] != empty.size():  # size(): the positions a cache at this offset stores
        return f"offset {empty.offset} does not match the {keys.shape[2]} stored positions"
    return None
