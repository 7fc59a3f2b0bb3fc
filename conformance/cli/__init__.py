"""The conformance commands: ``lmconform check``, ``lmconform snapshot`` and ``lmconform agree``."""

from __future__ import annotations

from conformance.cli import agree, check, snapshot


def add_parsers(subparsers) -> None:
    check.add_parser(subparsers)
    snapshot.add_parser(subparsers)
    agree.add_parser(subparsers)
