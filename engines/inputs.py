"""Values that enter from a command line, an engine spec or the environment, checked where
they enter: one validator per kind of value, shared by every command and the pytest plugin.

Each validator returns the parsed value or raises ``ValueError`` with a message that names
what was expected and what was given; argparse types wrap them (``arg_type``) so that a bad
value is argparse's usage error (exit status 2) before anything runs. ``Parser`` refuses a
single-valued option given twice, which argparse would otherwise settle silently by keeping
the last one.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

MAX_SECONDS = 7 * 24 * 3600.0  # a longer time limit is a typo


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""`` when none is close."""
    close = difflib.get_close_matches(word.lower(), [str(c).lower() for c in choices], n=1)
    if not close:
        return ""
    original = {str(c).lower(): str(c) for c in choices}[close[0]]
    return f" (did you mean {original!r}?)"


def number(
    kind: type, low: float, high: float, *, low_open: bool = False, what: str = ""
) -> Callable:
    """A validator of a finite ``kind`` (int or float) in [low, high] (or (low, high]);
    ``what`` names the quantity in messages ("seconds")."""

    def parse(text: str):
        try:
            value = kind(str(text).strip())
        except ValueError:  # judged below with the out-of-range values: one message
            value = math.nan
        inside = low < value if low_open else low <= value
        if not (math.isfinite(value) and inside and value <= high):
            bracket = "(" if low_open else "["
            raise ValueError(
                f"expected {what + ', ' if what else ''}{_kind_name(kind)} in "
                f"{bracket}{low:g}, {high:g}], got {text!r}"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


def _kind_name(kind: type) -> str:
    return "a whole number" if kind is int else "a number"


seconds = number(float, 0.0, MAX_SECONDS, low_open=True, what="seconds")


def flag(text: str) -> bool:
    """``0`` or ``1`` (engine options such as ``chat=1``)."""
    if str(text).strip() not in ("0", "1"):
        raise ValueError(f"expected 0 or 1, got {text!r}")
    return str(text).strip() == "1"


def non_empty(text: str) -> str:
    """A name or path that must be given: empty or blank text is refused (``''`` as a path
    would silently mean the current folder)."""
    if not str(text).strip():
        raise ValueError("expected a value, got an empty string")
    return text


def set_variable(name: str) -> str:
    """The name of an environment variable that holds a value (``api_key_env=NAME``)."""
    if not os.environ.get(non_empty(name)):
        raise ValueError(f"environment variable {name} is not set or empty")
    return name


def output_file(text: str) -> Path:
    """A file to write: not empty, not a folder, in an existing folder that can be written."""
    path = Path(non_empty(text))
    if path.is_dir():
        raise ValueError(f"{text}: is a folder, not a file")
    if not path.parent.is_dir():
        raise ValueError(f"{text}: folder {path.parent} does not exist")
    try:  # the only sure test of "writable": write something there
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{text}: cannot write there ({error.strerror})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{text}: the file exists and is not writable")
    return path


def output_file_anywhere(text: str) -> Path:
    """A file to write whose missing folders are created: not empty, not a folder, and no
    file on the way to it."""
    path = Path(non_empty(text))
    if path.is_dir():
        raise ValueError(f"{text}: is a folder, not a file")
    folder_to_create(str(path.parent))
    return path


def folder_to_create(text: str) -> Path:
    """A folder to write into, created if missing: not empty, and no file on its way."""
    path = Path(non_empty(text))
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise ValueError(f"{text}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{text}: {existing} cannot be written")
    return path


def distinct_files(named: Iterable[tuple[str, str | Path | None]]) -> None:
    """Output files given as (option, path) must not name one file twice."""
    seen: dict[Path, str] = {}
    for option, value in named:
        if value is None:
            continue
        resolved = Path(value).resolve()
        if resolved in seen:
            raise ValueError(f"{option} {value}: the same file as {seen[resolved]}")
        seen[resolved] = option


def distinct(option: str, values: Iterable[str]) -> list[str]:
    """A repeatable option's values, each at most once (a repeat is a typo, not a request)."""
    seen: list[str] = []
    for value in values:
        if value in seen:
            raise ValueError(f"{option} {value}: given twice")
        seen.append(value)
    return seen


def arg_type(validator: Callable, name: str | None = None) -> Callable:
    """``validator`` as an argparse type: its ``ValueError`` becomes a usage error."""

    def parse(text: str):
        try:
            return validator(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name or getattr(validator, "__name__", "value")
    return parse


# -- the environment --------------------------------------------------------------------------


def _existing_or_folder(text: str) -> str:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"expected a folder, but {text} is a file")
    return text


def _blas(text: str) -> str:
    if text.strip().lower() not in ("", "mlx"):
        raise ValueError(f"expected 'mlx' (MLX's own BLAS) or nothing, got {text!r}")
    return text


_threads = number(int, 1, 4096)

# Every LMCONFORM_* variable the code reads, with its validator.
ENVIRONMENT: dict[str, Callable[[str], object]] = {
    "LMCONFORM_CMD_START_TIMEOUT": seconds,
    "LMCONFORM_CMD_REQUEST_TIMEOUT": seconds,
    "LMCONFORM_CMD_TOTAL_TIMEOUT": seconds,
    "LMCONFORM_BLAS": _blas,
    "LMCONFORM_BLAS_THREADS": _threads,
    "LMCONFORM_TORCH_THREADS": _threads,
    "LMCONFORM_LLAMA_THREADS": _threads,
    "LMCONFORM_HOME": _existing_or_folder,
    "LMCONFORM_CRASH_DIR": _existing_or_folder,
}


def environment_problems(environ=os.environ) -> list[str]:
    """One line per set ``LMCONFORM_*`` variable whose value is unusable."""
    problems = []
    for variable, validate in ENVIRONMENT.items():
        text = environ.get(variable)
        if text is None or (not text.strip() and validate is not _blas):
            continue
        try:
            validate(text)
        except ValueError as error:
            problems.append(f"environment variable {variable}={text!r}: {error}")
    return problems


# -- the parser -------------------------------------------------------------------------------


class StoreOnce(argparse._StoreAction):
    """A single-valued option that refuses to be given twice (argparse keeps the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given_options", set())
        if self.dest in given:
            parser.error(f"argument {'/'.join(self.option_strings)}: given twice")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose plain options are ``StoreOnce``; sub-parsers made
    through ``add_subparsers`` are ``Parser`` too (argparse uses the parent's class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, StoreOnce)
        self.register("action", "store", StoreOnce)

    def _check_value(self, action, value):
        """argparse's "invalid choice" with the closest choice named."""
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(
                action,
                f"invalid choice: {value!r}{did_you_mean(value, action.choices)} "
                f"(choose from {choices})",
            )

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        parsed.__dict__.pop("_given_options", None)
        return parsed, rest
