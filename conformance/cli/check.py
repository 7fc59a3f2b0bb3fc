"""``lmconform check``: run the case catalogue on engines and print the conformance matrix.

With no arguments it runs the default matrix: the reference and every
installed peer engine (mlx-lm, transformers) on ``dummy`` and
``smollm2-135m``. Progress goes to stderr, the matrix and the diagnostics of
every fail and near-tie to stdout; ``--json``, ``--markdown`` and ``--junit``
write reports. The exit status is 1 if any case failed, 2 if an engine that
was asked for by name cannot be used here, else 0.

``--against snapshots`` compares with the committed golden snapshots of the
reference instead of running it (no MLX needed); ``--against DIR`` with
snapshots written by ``lmconform snapshot``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_MODELS = ("dummy", "smollm2-135m")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate engines against the reference (conformance matrix)",
        description=__doc__.split("\n\n")[0] + " " + " ".join(__doc__.split("\n\n")[1].split()),
    )
    parser.add_argument(
        "--engine",
        action="append",
        help="reference, mlx-lm, transformers, module:Class or 'cmd:COMMAND LINE' (an engine "
        "speaking conformance/PROTOCOL.md; repeatable; default: reference and every installed peer)",
    )
    parser.add_argument(
        "--model",
        action="append",
        help=f"model name (repeatable; default: {', '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--cases", help="case ids to run: substrings or globs, comma-separated")
    parser.add_argument("--profile", help="precision profile (default: per model, fp32 or q4)")
    parser.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write a Markdown report")
    parser.add_argument("--junit", metavar="FILE", help="write JUnit XML (for CI)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="time limit per case in seconds (default 600)"
    )
    parser.add_argument(
        "--against",
        default="reference",
        metavar="SOURCE",
        help="what engines are compared with: 'reference' (run it live; default), 'snapshots' "
        "(the committed golden outputs of the reference; needs no MLX) or a folder written "
        "by 'lmconform snapshot'",
    )
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from conformance.catalogue import load_cases, select_cases
    from conformance.profiles import get_profile
    from conformance.report import (
        any_failed,
        format_matrix,
        format_problems,
        write_json,
        write_junit,
        write_markdown,
    )
    from conformance.runner import run_matrix
    from engines.registry import EngineUnavailable, engine_class, installed_peers

    models = args.model or list(DEFAULT_MODELS)
    if args.profile:
        try:
            get_profile(args.profile)  # fail early on a typo, before any model loads
        except ValueError as error:
            print(f"lmconform check: {error}", file=sys.stderr)
            return 2
    if args.against not in ("reference", "snapshots") and not Path(args.against).is_dir():
        print(
            f"lmconform check: --against {args.against!r} is neither 'reference', "
            "'snapshots' nor a folder",
            file=sys.stderr,
        )
        return 2
    if args.list:
        catalogue = load_cases()
        for model in models:
            print(f"{model}:")
            for case in select_cases(catalogue, model, args.cases):
                print(f"  {case.id:40s} {case.kind:13s} {case.about}")
        return 0

    explicit = args.engine is not None
    engines = args.engine or ["reference", *installed_peers()]
    unusable = []
    for spec in engines:
        try:
            engine_class(spec)
        except EngineUnavailable as error:
            unusable.append(spec)
            print(f"lmconform check: skipping engine {spec}: {error}", file=sys.stderr)

    progress = Progress(sys.stderr)
    described: dict[str, str] = {}
    timings: dict[str, str] = {}

    def on_done(engine: str, model: str, description: dict, seconds: float) -> None:
        described[engine] = description.get("version", engine)
        timings[f"{engine} @ {model}"] = f"{seconds:.1f} s"

    started = time.perf_counter()
    results = run_matrix(
        [e for e in engines if e not in unusable],
        models,
        pattern=args.cases,
        profile_name=args.profile,
        timeout=args.timeout,
        progress=progress,
        on_skip=lambda engine, model, why: print(
            f"lmconform check: skipping {engine} @ {model}: {why}", file=sys.stderr
        ),
        on_done=on_done,
        against=args.against,
    )
    progress.finish()
    if not results:
        print("lmconform check: no case matches", file=sys.stderr)
        return 2 if unusable else 0
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "engines": described,
        "compared with": "the reference, live"
        if args.against == "reference"
        else f"snapshots ({'committed golden' if args.against == 'snapshots' else args.against})",
        "profiles": {m: sorted({r.profile for r in results if r.model == m}) for m in models},
        "time per engine and model": timings,
        "total time": f"{time.perf_counter() - started:.1f} s",
        "machine": f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}",
    }
    print(format_matrix(results))
    problems = format_problems(results)
    if problems:
        print("\n" + problems)
    if args.json:
        write_json(args.json, results, meta)
    if args.markdown:
        write_markdown(args.markdown, results, meta)
    if args.junit:
        write_junit(args.junit, results)
    if any_failed(results):
        return 1
    return 2 if explicit and unusable else 0


class Progress:
    """One line per finished case on stderr; on a terminal, also the case now running."""

    def __init__(self, stream):
        self.stream = stream
        self.live = stream.isatty()

    def __call__(self, engine, model, index, total, case, result) -> None:
        prefix = f"[{engine} @ {model} {index + 1:>{len(str(total))}}/{total}] {case.id}"
        if result is None:
            if self.live:
                self.stream.write(f"\r\033[K{prefix} ...")
                self.stream.flush()
            return
        verdict = result.verdict.upper() if result.verdict == "fail" else result.verdict
        line = f"{prefix} {verdict} ({result.duration_s:.2f} s)"
        self.stream.write(("\r\033[K" if self.live else "") + line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
