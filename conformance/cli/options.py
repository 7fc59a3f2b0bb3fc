"""Options that ``check``, ``snapshot`` and ``agree`` share, declared and checked once.

Each ``check_*`` raises ``InputError`` (exit status 2, one line naming the option) before
any case runs; values that argparse can judge alone are argparse types from
``engines.inputs``.
"""

from __future__ import annotations

import argparse

from engines.inputs import arg_type, did_you_mean, distinct, distinct_files, output_file

REPORTS = (("json", "--json"), ("markdown", "--markdown"), ("junit", "--junit"))


class InputError(Exception):
    """A bad option or input: exit status 2, with a one-line message."""


def add_report_options(parser: argparse.ArgumentParser, what: str = "the full results") -> None:
    """``--json``, ``--markdown`` and ``--junit``: each a file that can be written now."""
    parser.add_argument("--json", metavar="FILE", type=arg_type(output_file, "file"),
                        help=f"write {what} as JSON")
    parser.add_argument("--markdown", metavar="FILE", type=arg_type(output_file, "file"),
                        help="write a Markdown report")
    parser.add_argument("--junit", metavar="FILE", type=arg_type(output_file, "file"),
                        help="write JUnit XML (for CI)")


def check_report_paths(args: argparse.Namespace) -> None:
    """The report files (each already checked writable by its type) must be distinct."""
    try:
        distinct_files((option, getattr(args, attribute)) for attribute, option in REPORTS)
    except ValueError as error:
        raise InputError(str(error)) from None


def check_profile(name: str | None) -> None:
    """``--profile``: absent, or a known precision profile (an empty name is not absent)."""
    from conformance.profiles import PROFILES

    if name is not None and name not in PROFILES:
        raise InputError(
            f"--profile: unknown precision profile {name!r}{did_you_mean(name, PROFILES)}; "
            f"choose from {', '.join(sorted(PROFILES))}"
        )


def check_models(models: list[str], known: list[str],
                 unknown: str = "no case of the catalogue runs on it") -> list[str]:
    """``--model`` values: each known, each once; ``unknown`` says why one is refused."""
    try:
        models = distinct("--model", models)
    except ValueError as error:
        raise InputError(str(error)) from None
    for model in models:
        if model not in known:
            raise InputError(
                f"--model {model!r}: {unknown}{did_you_mean(model, known)}; models: {', '.join(known)}"
            )
    return models


def case_patterns(text: str | None) -> list[str] | None:
    """``--cases``: comma-separated patterns; given but empty is an error, not "all"."""
    if text is None:
        return None
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise InputError(f"--cases {text!r}: no pattern given")
    return patterns


def check_engines(specs: list[str] | None) -> list[str]:
    """Engines asked for by name must all be usable, options included, and each asked for
    once; the default (None) is the reference and every installed peer."""
    from engines.registry import EngineUnavailable, check_spec, installed_peers

    if specs is None:
        return ["reference", *installed_peers()]
    try:
        specs = distinct("--engine", specs)
    except ValueError as error:
        raise InputError(str(error)) from None
    for spec in specs:
        try:
            check_spec(spec)
        except EngineUnavailable as error:
            raise InputError(f"--engine {spec}: {error}") from None
    return specs
