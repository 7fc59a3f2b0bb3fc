"""``lmconform snapshot``: store an engine's answers to the catalogue, for regression checks.

Runs every selected case with the engine playing both parts (engine under
test and oracle) and writes what the cases asked and got to
``OUT/<model>/<group>.json`` (see ``snapshots.py``). Later,
``lmconform check --engine E --against OUT`` compares the engine (or a new
version of it) with those answers, tie-aware, without running anything else.

For ``--engine reference`` this is how the committed golden snapshots are
made (the reference tokenizes and embeds the prompts). For any other engine
the prompts' token ids and embeddings come from the committed golden
snapshots, so the engine is snapshotted on exactly the requests the
reference answered, and neither MLX nor the reference is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.models import DEFAULT_CASE_TIMEOUT_S

SNAPSHOT_MODELS = ("dummy",)  # recorded when no --model is given


EXIT_CODES = """exit status:
  0    every selected case was recorded
  2    a usage or input error, found before anything runs: unknown engine, a --model or
       --cases pattern matching no case, a bad option value, an --out folder that cannot
       be written; also: the engine could not be opened for a model
  3    an internal error of lmconform (traceback saved to a file, its path printed)
  130  stopped by SIGINT, 143 by SIGTERM (files already written stay whole)"""


def add_parser(subparsers) -> None:
    from conformance.cli.check import seconds_option
    from engines.inputs import arg_type, folder_to_create

    parser = subparsers.add_parser(
        "snapshot",
        help="store an engine's answers to the case catalogue (for check --against DIR)",
        description=" ".join(__doc__.split("\n\n")[1].split()),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--engine",
        default="reference",
        help="reference (default), mlx-lm, transformers, module:Class or 'cmd:COMMAND LINE'",
    )
    parser.add_argument(
        "--model",
        action="append",
        help=f"model name (repeatable; default: {', '.join(SNAPSHOT_MODELS)})",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=arg_type(folder_to_create, "folder"),
        metavar="DIR",
        help="folder to write to (created if missing)",
    )
    parser.add_argument("--cases", help="case ids: substrings or globs, comma-separated")
    parser.add_argument("--profile", help="precision profile recorded with the snapshots")
    parser.add_argument(
        "--timeout",
        type=seconds_option,
        default=DEFAULT_CASE_TIMEOUT_S,
        help=f"time limit per case in seconds (default {DEFAULT_CASE_TIMEOUT_S:g})",
    )
    parser.set_defaults(func=run)


def check_inputs(args: argparse.Namespace, catalogue) -> str | None:
    """The first bad option, as a one-line message; None if all are usable."""
    from conformance.catalogue import select_cases
    from conformance.cli.options import (
        InputError,
        case_patterns,
        check_engines,
        check_models,
        check_profile,
    )

    known = sorted({m for case in catalogue for m in case.models})
    try:
        models = check_models(args.model or list(SNAPSHOT_MODELS), known)
        for pattern in case_patterns(args.cases) or []:
            if not any(select_cases(catalogue, m, pattern) for m in models):
                return f"--cases: {pattern!r} matches no case on {', '.join(models)}"
        check_profile(args.profile)
        check_engines([args.engine])
    except InputError as error:
        return str(error)
    return None


def run(args: argparse.Namespace) -> int:
    from conformance.catalogue import load_cases, select_cases
    from conformance.runner import not_covered
    from conformance.snapshots.oracle import SnapshotOracle
    from conformance.snapshots.recorder import (
        EngineOracle,
        RecordingOracle,
        record_group,
        vocabulary_of,
    )
    from conformance.snapshots.store import (
        GOLDEN_DIR,
        SnapshotError,
        read_vocabulary,
        write_group,
        write_vocabulary,
    )
    from engines.deadline import Interrupted
    from engines.registry import EngineUnavailable, open_engine

    out = Path(args.out)
    catalogue = load_cases()
    problem = check_inputs(args, catalogue)
    if problem:
        print(f"lmconform snapshot: {problem}", file=sys.stderr)
        return 2
    status = 0
    for model in args.model or list(SNAPSHOT_MODELS):
        cases = select_cases(catalogue, model, args.cases)
        if not cases:
            continue
        try:
            if args.engine == "reference":
                from conformance.oracle import ReferenceOracle

                inner = ReferenceOracle(model)
                vocabulary = vocabulary_of(inner)
            else:
                inputs = SnapshotOracle(model, GOLDEN_DIR)
                skipped = not_covered(inputs, cases)
                for case_id, why in skipped.items():
                    print(f"lmconform snapshot: skipping {case_id}: {why}", file=sys.stderr)
                cases = [c for c in cases if c.id not in skipped]
                inner = EngineOracle(inputs, open_engine(args.engine, model))
                vocabulary = read_vocabulary(GOLDEN_DIR, model)
        except (EngineUnavailable, SnapshotError) as error:
            print(f"lmconform snapshot: {args.engine} @ {model}: {error}", file=sys.stderr)
            status = 2
            continue
        except Interrupted:
            raise
        except BaseException as error:  # noqa: BLE001 - the engine's fault, not lmconform's
            print(
                f"lmconform snapshot: {args.engine} @ {model}: the engine could not be opened "
                f"({type(error).__name__}: {error})",
                file=sys.stderr,
            )
            status = 2
            continue
        oracle = RecordingOracle(inner)
        profile = oracle.default_profile(args.profile)
        print(f"lmconform snapshot: {args.engine} @ {model}, {len(cases)} cases", file=sys.stderr)
        try:
            write_vocabulary(out, vocabulary)
            for group in dict.fromkeys(c.group for c in cases):
                snapshot = record_group(
                    model, group, cases, oracle, args.engine, profile, args.timeout, _progress
                )
                print(write_group(out, snapshot))
        finally:
            oracle.close()
    return status


def _progress(case, record) -> None:
    print(
        f"  {case.id}: {len(record.answers)} answers, own verdict {record.verdict}",
        file=sys.stderr,
    )
