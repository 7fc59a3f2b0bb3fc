"""JSON laid out for people: one line per small thing, indentation for the rest.

``json.dumps(indent=2)`` puts every number of a token list on its own line,
which makes a file of generation traces thousands of lines long and its diffs
unreadable. Here a container is written on one line when it is short, or
holds only scalars, or its key is listed in ``one_line_items`` (then each of
its items gets a line of its own: one generation step, one embedding
vector). Everything else is indented as usual. The result is plain JSON.
"""

from __future__ import annotations

import json
from typing import Any

SHORT = 100  # characters: a container this short, written on one line, stays on one line


def dumps_readable(value: Any, one_line_items: frozenset[str] = frozenset()) -> str:
    """``value`` as indented JSON (with a final newline); see the module docstring."""
    return _layout(value, "", one_line_items, None) + "\n"


def _inline(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), allow_nan=False)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list, tuple))


def _layout(value: Any, indent: str, one_line_items: frozenset[str], key: str | None) -> str:
    if _is_scalar(value):
        return _inline(value)
    flat = _inline(value)
    items = list(value.values()) if isinstance(value, dict) else list(value)
    if not items or len(flat) <= SHORT or all(_is_scalar(v) for v in items):
        return flat
    inner = indent + "  "
    if isinstance(value, dict):
        lines = [
            f"{inner}{_inline(str(k))}: {_layout(v, inner, one_line_items, str(k))}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(lines) + f"\n{indent}}}"
    if key in one_line_items:
        lines = [f"{inner}{_inline(v)}" for v in items]
    else:
        lines = [f"{inner}{_layout(v, inner, one_line_items, None)}" for v in items]
    return "[\n" + ",\n".join(lines) + f"\n{indent}]"
