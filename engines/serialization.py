"""JSON form of protocol messages, driven by the dataclasses' type hints.

``to_json_dict`` turns a protocol dataclass into JSON-ready data;
``from_json_dict`` checks and rebuilds it (``jsonl_protocol.py`` puts both in
the envelope of a wire message), raising ``ProtocolError`` with the
path of the offending field (``"rows[1].request.max_tokens: expected int, got
'7'"``), so a malformed message from an external engine is reported precisely.

Two details JSON forces on us: object keys are strings (``logit_bias`` token
ids are written as "65" and read back as ints), and JSON has no infinities
(non-finite floats are written as the strings "inf", "-inf", "nan").
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from functools import cache
from typing import Any, TypeVar, Union

from engines import protocol
from engines.protocol import ProtocolError

T = TypeVar("T")

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def to_json_dict(obj: Any) -> Any:
    """Plain JSON data (dicts, lists, str, int, float, bool, None) for ``obj``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_json_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_dict(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def from_json_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Rebuild a ``cls`` from JSON data, checking every field's type."""
    return _decode(cls, data, path or cls.__name__)


def dumps(obj: Any) -> str:
    """One compact line of JSON (the JSON-lines form)."""
    return json.dumps(to_json_dict(obj), separators=(",", ":"), allow_nan=False)


def loads(cls: type[T], line: str) -> T:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ProtocolError(f"malformed JSON ({error}): {line[:200]!r}") from None
    return from_json_dict(cls, data)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(protocol))


def _decode(tp: Any, data: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _decode(option, data, path)
            except ProtocolError as error:
                errors.append(str(error))
        raise ProtocolError(errors[0] if len(errors) == 1 else f"{path}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, data, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        _expect(isinstance(data, list), path, "a list", data)
        return [_decode(item, v, f"{path}[{i}]") for i, v in enumerate(data)]
    if origin is tuple:
        items = typing.get_args(tp)
        _expect(
            isinstance(data, list) and len(data) == len(items), path, f"a {len(items)}-list", data
        )
        return tuple(_decode(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(items, data)))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        _expect(isinstance(data, dict), path, "an object", data)
        out = {}
        for key, value in data.items():
            out[_decode_key(key_type, key, path)] = _decode(value_type, value, f"{path}[{key}]")
        return out
    if tp is float:
        if isinstance(data, str) and data in _NON_FINITE:
            return _NON_FINITE[data]
        _expect(
            isinstance(data, (int, float)) and not isinstance(data, bool), path, "a number", data
        )
        return float(data)
    if tp is int:
        _expect(isinstance(data, int) and not isinstance(data, bool), path, "an integer", data)
        return data
    if tp is bool:
        _expect(isinstance(data, bool), path, "true or false", data)
        return data
    if tp is str:
        _expect(isinstance(data, str), path, "a string", data)
        return data
    raise TypeError(f"{path}: no JSON decoding for type {tp!r}")


def _decode_dataclass(cls: type, data: Any, path: str) -> Any:
    _expect(isinstance(data, dict), path, "an object", data)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ProtocolError(f"{path}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _decode(hints[f.name], data[f.name], f"{path}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{path}: missing required field {f.name!r}")
    return cls(**values)


def _decode_key(key_type: Any, key: str, path: str) -> Any:
    if key_type is int:
        try:
            return int(key)
        except ValueError:
            raise ProtocolError(f"{path}: key {key!r} is not an integer token id") from None
    return key


def _expect(ok: bool, path: str, what: str, data: Any) -> None:
    if not ok:
        raise ProtocolError(f"{path}: expected {what}, got {data!r:.100}")
