"""``lmconform agree``: agreement metrics of engines against the reference over fixed texts.

Teacher-forces the reference and each engine over the texts shipped in
``conformance/agreement_texts/`` and compares their top-k logprobs position by
position: KL(reference || engine), top-1 agreement (all positions, and the
clear ones where the reference's margin is at least the profile's epsilon) and
|dp| of the reference's top token (see ``conformance/agreement.py``). The
figures are judged by the profile's agreement limits; they go to stdout as a
table, to ``--json``, ``--markdown`` and ``--junit`` reports, and to the
benchmark history (``lmconform bench show``) unless ``--no-history``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from xml.etree import ElementTree as ET

from conformance.cli.options import (
    REPORTS,
    InputError,
    add_report_options,
    check_engines,
    check_models,
    check_profile,
    check_report_paths,
)
from engines.inputs import arg_type, number

HISTORY_WORKLOAD = "agreement"
MAX_TOP = 1000  # a longer top-k list is a typo (and a slow engine answer)
MAX_POSITIONS = 10_000_000  # far beyond the shipped texts: a larger count is a typo
EXIT_CODES = """exit status:
  0    every engine is within its profile's agreement limits
  1    an engine broke a limit, or its answers could not be measured (a finding)
  2    a usage or input error, found before anything runs: unknown engine, model or
       profile, a bad --top or --positions, an unwritable report path or history;
       also: an engine could not be opened, or it reports no logprobs
  3    an internal error of lmconform (traceback saved to a file, its path printed)"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "agree",
        help="agreement metrics (KL, top-1, dp) of engines against the reference",
        description=" ".join(__doc__.split("\n\n")[1].split()).replace("``", ""),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--engine",
        action="append",
        required=True,
        help="reference, mlx-lm, transformers, llama-cpp, module:Class or 'cmd:COMMAND LINE' "
        "(repeatable)",
    )
    parser.add_argument(
        "--model", action="append", help="model name (repeatable; default: dummy)"
    )
    parser.add_argument("--profile", help="precision profile (default: per model)")
    parser.add_argument(
        "--top",
        type=arg_type(number(int, 2, MAX_TOP), "count"),  # a margin needs two
        default=None,
        help="top logprobs asked of each side (default 40)",
    )
    parser.add_argument(
        "--positions",
        type=arg_type(number(int, 1, MAX_POSITIONS), "count"),
        default=None,
        help="positions measured, split evenly among the texts (default: all of them; "
        "512 on smollm2-135m)",
    )
    add_report_options(parser, "the figures")
    parser.add_argument(
        "--db",
        type=history_target,
        default=None,
        help="benchmark history to record into: a SQLite file (default "
        ".lmconform/history.sqlite) or a postgresql:// URL",
    )
    parser.add_argument("--no-history", action="store_true", help="do not record the figures")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from conformance.agreement import DEFAULT_TOP

    try:
        models, engines = prepare(args)
    except InputError as error:
        print(f"lmconform agree: {error}", file=sys.stderr)
        return 2
    top = args.top or DEFAULT_TOP
    try:
        results, failures = measure_all(engines, models, args.profile, top, args.positions)
    except InputError as error:
        print(f"lmconform agree: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    for line in failures:
        print(line)
    for result in results:
        for problem in result.problems:
            print(f"FAIL {result.engine} @ {result.model}: {problem} (profile {result.profile})")
    ok = write_reports(args, results, failures)
    if results and not args.no_history:
        run_id = record(results, args.db, top)
        print(f"lmconform agree: recorded as run {run_id} of the benchmark history",
              file=sys.stderr)
    if failures or any(not r.passed for r in results):
        return 1
    return 0 if ok else 2


def prepare(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Check every option; ``InputError`` names the first bad one."""
    from engines.models import BUILTIN_MODELS

    check_profile(args.profile)
    models = check_models(args.model or ["dummy"], list(BUILTIN_MODELS), unknown="unknown")
    if args.no_history and args.db is not None:
        raise InputError("--db and --no-history contradict each other: give one")
    check_report_paths(args)
    if not args.no_history:
        check_history(args)
    return models, check_engines(args.engine)


def history_target(text: str) -> str | Path:
    """``--db``: a SQLite file path, or a ``postgresql://`` URL kept as it is."""
    from benchmarks.history import is_postgres

    return text if is_postgres(text) else Path(text)


def check_history(args: argparse.Namespace) -> None:
    from benchmarks.history import DEFAULT_DB, History, HistoryError

    args.db = args.db or DEFAULT_DB
    if isinstance(args.db, Path):
        args.db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with History(args.db):
            pass
    except (HistoryError, OSError) as error:
        raise InputError(f"--db {args.db}: {error}") from None


def measure_all(engines: list[str], models: list[str], profile_name: str | None, top: int,
                positions: int | None):
    """Each engine on each model; returns the results and a line per engine that could not
    be measured (its answers broke the protocol: a finding, exit 1)."""
    from conformance.agreement import AgreementError, agreement, load_texts
    from conformance.oracle import ReferenceOracle
    from conformance.profiles import profile_for_engine, profile_for_model
    from engines.protocol import ProtocolError, Unsupported
    from engines.registry import EngineUnavailable, open_engine

    texts = load_texts()
    results, failures = [], []
    for model in models:
        oracle = ReferenceOracle(model)
        profile = profile_for_model(model, profile_name)
        cache: dict = {}  # the reference's answers, computed once for every engine
        try:
            for spec in engines:
                try:
                    engine = oracle.engine if spec == "reference" else open_engine(spec, model)
                except EngineUnavailable as error:
                    raise InputError(f"--engine {spec}: {error}") from None
                judged = profile_for_engine(profile, engine, profile_name)
                try:
                    if "logprobs" not in engine.capabilities:
                        raise InputError(f"--engine {spec}: reports no logprobs")
                    print(f"lmconform agree: {spec} @ {model} ...", file=sys.stderr)
                    results.append(agreement(
                        spec, model, judged, oracle.engine, engine, oracle.tokenizer, texts,
                        top, positions, cache,
                    ))
                except (AgreementError, ProtocolError, Unsupported) as error:
                    failures.append(f"FAIL {spec} @ {model}: not measurable: {error}")
                finally:
                    if engine is not oracle.engine:
                        engine.close()
        finally:
            oracle.close()
    return results, failures


# -- reports ----------------------------------------------------------------------------------

COLUMNS = (
    ("positions", "positions", "{:d}"),
    ("KL mean", "kl_mean", "{:.3g}"),
    ("KL median", "kl_median", "{:.3g}"),
    ("KL p99", "kl_p99", "{:.3g}"),
    ("KL max", "kl_max", "{:.3g}"),
    ("top-1", "top1", "{:.2%}"),
    ("top-1 clear", "clear_top1", "{:.2%}"),
    ("crossed max", "crossed_max", "{:.3g}"),
    ("|dp| median", "dp_median", "{:.3g}"),
    ("|dp| p99", "dp_p99", "{:.3g}"),
    ("|dp| max", "dp_max", "{:.3g}"),
    ("RMS dp", "dp_rms", "{:.3g}"),
    ("tail mass", "tail_mean", "{:.3g}"),
)


def rows(results) -> tuple[list[str], list[list[str]]]:
    header = ["engine @ model", "profile", *(name for name, _, _ in COLUMNS), "verdict"]
    body = [
        [
            f"{r.engine} @ {r.model}",
            r.profile,
            *(fmt.format(getattr(r.summary, key)) for _, key, fmt in COLUMNS),
            "pass" if r.passed else "FAIL",
        ]
        for r in results
    ]
    return header, body


def format_table(results) -> str:
    header, body = rows(results)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *body]]
    return "\n".join(lines)


def format_markdown(results, failures: list[str]) -> str:
    header, body = rows(results)
    lines = [
        "# lmconform agree",
        "",
        (
            "KL(reference || engine) per position from top-k logprobs (a lower bound on the "
            "full-vocabulary KL), top-1 agreement, |dp| of the reference's top token."
        ),
        "",
        markdown_row(header),
        "|" + "---|" * len(header),
        *(markdown_row(row) for row in body),
    ]
    problems = [f"- {r.engine} @ {r.model}: {p}" for r in results for p in r.problems]
    problems += [f"- {line}" for line in failures]
    if problems:
        lines += ["", "## Limits broken", "", *problems]
    return "\n".join(lines) + "\n"


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def as_json(results, failures: list[str]) -> dict:
    return {
        "results": [
            {
                "engine": r.engine,
                "model": r.model,
                "profile": r.profile,
                "top": r.top,
                "limits": asdict(r.limits),
                "summary": asdict(r.summary),
                "per_text": {name: asdict(s) for name, s in r.per_text.items()},
                "passed": r.passed,
                "problems": r.problems,
            }
            for r in results
        ],
        "not_measured": failures,
    }


def junit(results, failures: list[str]) -> bytes:
    suite = ET.Element(
        "testsuite",
        name="lmconform agree",
        tests=str(len(results) + len(failures)),
        failures=str(sum(not r.passed for r in results) + len(failures)),
    )
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"agree.{r.model}", name=r.engine)
        if r.problems:
            ET.SubElement(case, "failure", message="; ".join(r.problems))
    for line in failures:
        case = ET.SubElement(suite, "testcase", classname="agree", name=line.split(":")[0])
        ET.SubElement(case, "failure", message=line)
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)


def write_reports(args: argparse.Namespace, results, failures: list[str]) -> bool:
    writers = {
        "json": lambda p: p.write_text(json.dumps(as_json(results, failures), indent=2) + "\n"),
        "markdown": lambda p: p.write_text(format_markdown(results, failures)),
        "junit": lambda p: p.write_bytes(junit(results, failures)),
    }
    ok = True
    for attribute, option in REPORTS:
        path = getattr(args, attribute)
        if path is None:
            continue
        try:
            writers[attribute](Path(path))
        except OSError as error:
            ok = False
            print(f"lmconform agree: {option} {path}: not written ({error})", file=sys.stderr)
    return ok


# -- the history ------------------------------------------------------------------------------

# Stored names, each lower-is-better (the metric catalogue's guess for unlisted names).
HISTORY_METRICS = {
    "kl_mean": lambda s: s.kl_mean,
    "kl_p99": lambda s: s.kl_p99,
    "kl_max": lambda s: s.kl_max,
    "top1_mismatch_pct": lambda s: 100 * (1 - s.top1),
    "clear_top1_mismatch_pct": lambda s: 100 * (1 - s.clear_top1),
    "dp_p99": lambda s: s.dp_p99,
    "dp_rms": lambda s: s.dp_rms,
}


def record(results, db: str | Path, top: int) -> int:
    """Store the figures as one run of the benchmark history; returns its id."""
    from benchmarks import fingerprint, revision
    from benchmarks.history import History

    root = Path(__file__).resolve().parents[2]
    with History(db) as history:
        run_id = history.start_run(
            revision.current(root),
            fingerprint.collect(),
            settings={
                "tool": "lmconform agree",
                "model": ",".join(dict.fromkeys(r.model for r in results)),
                "top": top,
            },
            source="agree",
        )
        for r in results:
            values = {name: get(r.summary) for name, get in HISTORY_METRICS.items()}
            settings = {"profile": r.profile, "positions": r.summary.positions, "top": r.top}
            history.add_trial(run_id, 0, r.engine, r.model, HISTORY_WORKLOAD, values, settings)
        history.finish_run(run_id)
    return run_id
