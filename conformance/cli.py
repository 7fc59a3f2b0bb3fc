"""The ``lmconform`` command line: one sub-command per module, registered below."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module defining ``add_parser(subparsers)``; each sub-parser sets ``func``.
COMMANDS = {
    "bench": "conformance.cli_bench",
    "check": "conformance.cli_check",
    "generate": "conformance.cli_generate",
    "models": "conformance.cli_models",
    "snapshot": "conformance.cli_snapshot",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmconform",
        description="Conformance and benchmarking suite for LLM text generation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
