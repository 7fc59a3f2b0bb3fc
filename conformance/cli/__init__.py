"""The conformance commands: ``lmconform check`` and ``lmconform snapshot``."""

from __future__ import annotations

from conformance.cli import check, snapshot


def add_parsers(subparsers) -> None:
    check.add_parser(subparsers)
    snapshot.add_parser(subparsers)
