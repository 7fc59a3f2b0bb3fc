"""``lmconform check``: run the case catalogue on engines and print the conformance matrix.

With no arguments it runs the default matrix: the reference and every
installed peer engine (mlx-lm, transformers) on ``engines.models.DEFAULT_MODELS``
(``dummy``, the tiny model of every other family, ``smollm2-135m``). Progress
goes to stderr, the matrix and the diagnostics of every fail and near-tie to
stdout; ``--json``, ``--markdown`` and ``--junit`` write reports. Every input
is checked before any case runs (see the exit status below); a run stopped by
a signal or an internal error still writes the reports of the cases it finished.

``--against snapshots`` compares with the committed golden snapshots of the
reference instead of running it (no MLX needed); ``--against DIR`` with
snapshots written by ``lmconform snapshot``. ``-j N`` runs the matrix in N
worker processes (``conformance.parallel``), with a serial run's verdicts and reports.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from conformance.cli.options import (
    REPORTS,
    InputError,
    add_report_options,
    case_patterns,
    check_engines,
    check_models,
    check_profile,
    check_report_paths,
)
from engines.inputs import arg_type, did_you_mean, non_empty, number, seconds
from engines.models import DEFAULT_CASE_TIMEOUT_S, DEFAULT_MODELS

# More workers than this per core is a typo (each loads its models).
MAX_JOBS = max(64, 4 * (os.cpu_count() or 1))
seconds_option = arg_type(seconds, "seconds")
jobs_option = arg_type(number(int, 1, MAX_JOBS, what="processes"), "processes")
HEARTBEAT_S = 10.0  # a case running longer says so on stderr this often
EXIT_CODES = """exit status:
  0    every checked case passed (pass or near-tie), and at least one case was checked
  1    an engine failed a case (a finding, not an error of the run)
  2    a usage or input error, found before any case runs: unknown engine, a --model
       or --cases pattern matching no case, a bad option or LMCONFORM_CMD_* value,
       an unusable --against folder (empty, unreadable, corrupt or conflicting
       snapshot files), an unwritable report path; also: an engine asked for by name
       could not be opened, or no selected case could be checked (all unsupported)
  3    an internal error of lmconform (traceback saved to a file, its path printed)
  130  stopped by SIGINT, 143 by SIGTERM: engines stopped, reports of finished cases written"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate engines against the reference (conformance matrix)",
        description=__doc__.split("\n\n")[0] + " " + " ".join(__doc__.split("\n\n")[1].split()),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    add_report_options(parser)
    parser.add_argument(
        "--timeout",
        type=seconds_option,
        default=DEFAULT_CASE_TIMEOUT_S,
        help=f"time limit per case in seconds (default {DEFAULT_CASE_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--against",
        default="reference",
        type=arg_type(non_empty, "source"),
        metavar="SOURCE",
        help="what engines are compared with: 'reference' (run it live; default), 'snapshots' "
        "(the committed golden outputs of the reference; needs no MLX) or a folder written "
        "by 'lmconform snapshot'",
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=jobs_option,
        default=1,
        metavar="N",
        help="run in N worker processes, each loading a model once (default 1: in this "
        "process); verdicts and reports are those of a serial run",
    )
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        plan = prepare(args)
    except InputError as error:
        print(f"lmconform check: {error}", file=sys.stderr)
        print(exit_line(2), file=sys.stderr)
        return 2
    if args.list:
        for model, cases in plan.cases.items():
            print(f"{model}:")
            for case in cases:
                print(f"  {case.id:40s} {case.kind:13s} {case.about}")
        return 0
    status = execute(args, plan)
    print(exit_line(status), file=sys.stderr)
    return status


def exit_line(status: int) -> str:
    """The last line of a run: its exit status and what that means (from ``EXIT_CODES``)."""
    meaning = {
        0: "every checked case passed",
        1: "an engine failed a case (a finding, not an error of the run)",
        2: "an input error, or nothing could be checked (see above; exit statuses: --help)",
    }
    return f"lmconform check: exit status {status}: {meaning.get(status, 'see --help')}"


class Plan:
    """What a run will do, every input already checked."""

    def __init__(self, models, cases, engines, explicit, oracles):
        self.models: list[str] = models
        self.cases: dict[str, list] = cases  # model -> selected cases
        self.engines: list[str] = engines
        self.explicit: bool = explicit  # engines were asked for by name
        self.oracles: dict[str, object] = oracles  # model -> snapshot oracle (--against)


def prepare(args: argparse.Namespace) -> Plan:
    """Check every option and input; ``InputError`` names the first bad one."""
    from conformance.catalogue import load_cases, select_cases

    check_profile(args.profile)  # fail early on a typo, before any model loads
    catalogue = load_cases()
    known = sorted({m for case in catalogue for m in case.models})
    models = check_models(args.model or list(DEFAULT_MODELS), known)
    patterns = case_patterns(args.cases)
    if patterns is not None:
        for pattern in patterns:
            if not any(select_cases(catalogue, m, pattern) for m in models):
                raise InputError(
                    f"--cases: {pattern!r} matches no case on {', '.join(models)} "
                    "(see: lmconform check --list)"
                )
    cases = {m: select_cases(catalogue, m, args.cases) for m in models}
    cases = {m: c for m, c in cases.items() if c}
    if not cases:
        raise InputError(f"--cases {args.cases!r}: no case runs on {', '.join(models)}")
    if args.list:
        return Plan(list(cases), cases, [], False, {})
    check_report_paths(args)
    oracles = open_snapshots(args.against, cases, explicit_models=args.model is not None)
    cases = {m: c for m, c in cases.items() if args.against == "reference" or m in oracles}
    engines = check_engines(args.engine)
    return Plan(list(cases), cases, engines, args.engine is not None, oracles)


def open_snapshots(against: str, cases: dict[str, list], explicit_models: bool) -> dict:
    """The snapshot oracle of every model (``--against`` other than reference), read and
    validated whole now, so that a bad file stops the run before it starts."""
    if against == "reference":
        return {}
    from conformance.snapshots.oracle import SnapshotOracle
    from conformance.snapshots.store import GOLDEN_DIR, SnapshotError, snapshot_groups

    folder = GOLDEN_DIR if against == "snapshots" else Path(against)
    if against != "snapshots":
        if not folder.is_dir():
            hint = did_you_mean(against, ["reference", "snapshots"])
            raise InputError(
                f"--against {against!r}{hint} is neither 'reference', 'snapshots' nor a folder"
            )
        if not os.access(folder, os.R_OK | os.X_OK):
            raise InputError(f"--against {against}: the folder cannot be read")
    oracles = {}
    for model in cases:
        if not snapshot_groups(folder, model) and not explicit_models:
            print(f"lmconform check: no snapshots of {model} in {folder}; skipping it",
                  file=sys.stderr)
            continue
        try:
            oracles[model] = SnapshotOracle(model, folder)
        except SnapshotError as error:
            raise InputError(f"--against {against}: {error}") from None
        except OSError as error:
            raise InputError(f"--against {against}: {error}") from None
    if not oracles:
        raise InputError(
            f"--against {against}: no snapshots of {', '.join(cases)} in {folder}"
        )
    return oracles


def execute(args: argparse.Namespace, plan: Plan) -> int:
    """Run the plan; whatever stops it, write the reports of the cases that finished."""
    from conformance import parallel
    from conformance.report import any_failed, format_matrix, format_problems
    from conformance.runner import FAIL, NEAR_TIE, PASS, run_matrix

    progress = Progress(sys.stderr)
    described: dict[str, str] = {}
    timings: dict[str, str] = {}
    finished = []  # every case result as it comes: what a stopped run still reports
    skipped_by_name: list[str] = []

    def on_progress(engine, model, index, total, case, result) -> None:
        if result is not None:
            finished.append(result)
        progress(engine, model, index, total, case, result)

    def on_skip(engine: str, model: str, why: str) -> None:
        skipped_by_name.append(engine)
        print(f"lmconform check: skipping {engine} @ {model}: {why}", file=sys.stderr)

    def on_done(engine: str, model: str, description: dict, seconds: float) -> None:
        described[engine] = description.get("version", engine)
        timings[f"{engine} @ {model}"] = f"{seconds:.1f} s"

    started = time.perf_counter()

    def meta(results, stopped: str = "") -> dict:
        # In the plan's order, however the columns finished (-j runs them side by side).
        columns = [f"{e} @ {m}" for m in plan.models for e in plan.engines]
        data = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "engines": {e: described[e] for e in plan.engines if e in described},
            "compared with": "the reference, live"
            if args.against == "reference"
            else f"snapshots ({'committed golden' if args.against == 'snapshots' else args.against})",
            "profiles": {
                m: sorted({r.profile for r in results if r.model == m}) for m in plan.models
            },
            "time per engine and model": {c: timings[c] for c in columns if c in timings},
            "total time": f"{time.perf_counter() - started:.1f} s",
            "machine": f"{platform.machine()}, {platform.system()}, "
            f"Python {platform.python_version()}",
        }
        if stopped:
            data["stopped"] = stopped
        return data

    common = {
        "pattern": args.cases,
        "profile_name": args.profile,
        "timeout": args.timeout,
        "progress": on_progress,
        "on_skip": on_skip,
        "on_done": on_done,
        "against": args.against,
    }
    try:
        if args.jobs > 1:  # the workers open the snapshots again: they were checked above
            results = parallel.run_matrix_parallel(args.jobs, plan.engines, plan.models, **common)
        else:
            results = run_matrix(plan.engines, plan.models, oracles=plan.oracles, **common)
    except BaseException as stop:  # a signal, or a bug: keep what was finished, then go on
        progress.finish()
        why = f"the run was stopped early ({type(stop).__name__}: {stop})"
        write_reports(args, finished, meta(finished, why))
        raise
    progress.finish()
    print(format_matrix(results))
    problems = format_problems(results)
    if problems:
        print("\n" + problems)
    status = 0 if write_reports(args, results, meta(results)) else 2
    if any_failed(results):
        return 1
    if plan.explicit and skipped_by_name:
        return 2
    if not any(r.verdict in (PASS, NEAR_TIE, FAIL) for r in results):
        print(
            "lmconform check: no case was checked (every selected case was unsupported "
            "or skipped)",
            file=sys.stderr,
        )
        return 2
    return status


def write_reports(args: argparse.Namespace, results: list, meta: dict) -> bool:
    """Write every report asked for, each on its own: one that fails does not stop the
    others. Returns whether all were written."""
    from conformance.report import write_json, write_junit, write_markdown

    writers = {
        "json": lambda path: write_json(path, results, meta),
        "markdown": lambda path: write_markdown(path, results, meta),
        "junit": lambda path: write_junit(path, results),
    }
    ok = True
    for attribute, option in REPORTS:
        path = getattr(args, attribute)
        if path is None:
            continue
        try:
            writers[attribute](path)
        except OSError as error:
            ok = False
            print(f"lmconform check: {option} {path}: not written ({error})", file=sys.stderr)
    return ok


class Progress:
    """One line per finished case on stderr; on a terminal, also the case now running.

    A case that runs longer than ``heartbeat_s`` says so every ``heartbeat_s`` seconds,
    with its elapsed time (a heartbeat thread), so that a long sampling case is not
    mistaken for a hang. Under ``-j`` several cases run at once: each has its own line
    and heartbeat (a terminal shows the one started last).
    """

    def __init__(self, stream, heartbeat_s: float = HEARTBEAT_S):
        self.stream = stream
        self.live = stream.isatty()
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._running: dict[str, float] = {}  # each running case's prefix -> its start
        self._last_write = time.monotonic()
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="progress", daemon=True)
        self._heartbeat.start()

    def __call__(self, engine, model, index, total, case, result) -> None:
        prefix = f"[{engine} @ {model} {index + 1:>{len(str(total))}}/{total}] {case.id}"
        with self._lock:
            if result is None:
                self._running[prefix] = time.monotonic()
                if self.live:
                    self._write(f"\r\033[K{prefix} ...")
                return
            self._running.pop(prefix, None)
            verdict = result.verdict.upper() if result.verdict == "fail" else result.verdict
            line = f"{prefix} {verdict} ({result.duration_s:.2f} s)"
            self._write(("\r\033[K" if self.live else "") + line + "\n")

    def finish(self) -> None:
        self._stopped.set()
        self._heartbeat.join()
        with self._lock:
            self._running.clear()
            if self.live:
                self._write("\r\033[K")

    def _beat(self) -> None:
        """Until ``finish``: a line for the running cases whenever stderr was quiet too long."""
        while not self._stopped.wait(min(1.0, self.heartbeat_s / 4)):
            with self._lock:
                now = time.monotonic()
                long = {p: s for p, s in self._running.items() if now - s >= self.heartbeat_s}
                if not long or now - self._last_write < self.heartbeat_s:
                    continue
                if self.live:
                    prefix, start = list(long.items())[-1]
                    self._write(f"\r\033[K{prefix} ... {now - start:.0f} s")
                    continue
                for prefix, start in long.items():
                    self._write(f"{prefix} still running ({now - start:.0f} s)\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
        self._last_write = time.monotonic()
