"""The ``lmconform`` command line. Each package owns its subcommands; this only composes them.

Packages are imported by name so that none of them imports another one's command line,
and a package that cannot be imported here (the reference needs MLX) costs only its own
commands: they remain listed and say why they cannot run.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module defining ``add_parsers(subparsers)`` -> the commands it adds (each sets ``func``).
COMMAND_MODULES = {
    "conformance.cli": ("check", "snapshot"),
    "benchmarks.cli": ("bench",),
    "reference.cli": ("generate", "models"),
}


def _unavailable(subparsers, module: str, commands: tuple[str, ...], error: Exception) -> None:
    def explain(args: argparse.Namespace) -> int:
        print(
            f"lmconform {args.command}: unavailable here ({module} cannot be imported: {error})",
            file=sys.stderr,
        )
        return 2

    for name in commands:
        parser = subparsers.add_parser(name, help=f"(unavailable here: {error})")
        parser.add_argument("rest", nargs=argparse.REMAINDER)
        parser.set_defaults(func=explain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmconform",
        description="Conformance and benchmarking suite for LLM text generation.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module, commands in COMMAND_MODULES.items():
        try:
            importlib.import_module(module).add_parsers(subparsers)
        except ImportError as error:
            _unavailable(subparsers, module, commands, error)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
