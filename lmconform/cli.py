"""The ``lmconform`` command line. Each package owns its subcommands; this only composes them.

Packages are imported by name so that none of them imports another one's command line,
and a package that cannot be imported here (the reference needs MLX) costs only its own
commands: they remain listed and say why they cannot run.

What every subcommand shares is decided here, once: the exit status of an
internal error (3, with the traceback saved to a file), and what SIGINT and
SIGTERM do (stop the engines' process groups, let the command write the
reports it has, exit 130 or 143).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import tempfile
import threading
import traceback
from datetime import datetime
from pathlib import Path

from engines.deadline import Interrupted
from engines.inputs import Parser, environment_problems

# Module defining ``add_parsers(subparsers)`` -> the commands it adds (each sets ``func``).
COMMAND_MODULES = {
    "conformance.cli": ("check", "snapshot", "agree"),
    "benchmarks.cli": ("bench",),
    "reference.cli": ("generate", "models", "serve"),
}

INTERNAL_ERROR = 3
CRASH_DIR_VARIABLE = "LMCONFORM_CRASH_DIR"  # where tracebacks of internal errors go
EXIT_CODES = """exit status:
  0    success (for check: every checked case passed, and at least one ran)
  1    a finding: an engine failed a case (bench compare: a regression)
  2    a usage or input error (unknown engine, model or case pattern, bad option or
       environment value, unusable snapshot folder or history, unwritable report path),
       found before anything runs
  3    an internal error of lmconform: the traceback is saved to a file, its path printed
  130  stopped by SIGINT, 143 stopped by SIGTERM (engines stopped, reports written)"""


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
    parser = Parser(
        prog="lmconform",
        description="Conformance and benchmarking suite for LLM text generation.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module, commands in COMMAND_MODULES.items():
        try:
            importlib.import_module(module).add_parsers(subparsers)
        except ImportError as error:
            _unavailable(subparsers, module, commands, error)
    for command in subparsers.choices.values():  # a subcommand with its own table keeps it
        if command.epilog is None:
            command.epilog = EXIT_CODES
            command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engines.adapters.line_process import stop_all

    problems = environment_problems()
    if problems:  # every command may open an engine or the reference, which read them
        for problem in problems:
            print(f"lmconform {args.command}: {problem}", file=sys.stderr)
        return 2

    restore = _stop_on_signals()
    try:
        return int(args.func(args) or 0)
    except Interrupted as stop:
        print(f"lmconform {args.command}: {stop}; engines stopped", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:  # a SIGINT that arrived while our handler was not installed
        print(f"lmconform {args.command}: interrupted; engines stopped", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as error:  # noqa: BLE001 - a bug of lmconform: exit 3, traceback on file
        path = save_traceback(error)
        print(
            f"lmconform {args.command}: internal error ({type(error).__name__}: {error}); "
            f"this is a bug in lmconform, not a verdict on an engine. Traceback: {path}",
            file=sys.stderr,
        )
        return INTERNAL_ERROR
    finally:
        restore()
        stop_all()  # no engine process outlives the command, whatever happened


def save_traceback(error: BaseException) -> Path:
    """Write the traceback of ``error`` to a new file and return its path."""
    folder = Path(os.environ.get(CRASH_DIR_VARIABLE) or tempfile.gettempdir())
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"lmconform-crash-{stamp}-", suffix=".txt", dir=folder)
    except OSError:  # the folder asked for is unusable: the system's temporary folder is not
        fd, name = tempfile.mkstemp(prefix=f"lmconform-crash-{stamp}-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as out:
        out.write(f"lmconform {' '.join(sys.argv[1:])}\n\n{text}")
    return Path(name)


def _stop_on_signals():
    """SIGINT/SIGTERM raise ``Interrupted`` (the command writes its reports and returns);
    a second signal kills the engines and exits at once. Returns a function restoring
    the previous handlers. Only the main thread can set handlers; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    from engines.adapters.line_process import stop_all

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in signals}
    stopping = False

    def handle(signum, frame):
        nonlocal stopping
        if stopping:  # the first stop is taking too long (an engine swallowing it): go now
            stop_all()
            os._exit(128 + signum)
        stopping = True
        stop_all()
        raise Interrupted(signum)

    for signum in signals:
        signal.signal(signum, handle)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


if __name__ == "__main__":
    sys.exit(main())
