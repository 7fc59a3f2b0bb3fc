"""``lmconform bench``: run benchmarks, compare runs, plot history, ingest JSON.

Sub-commands (``run`` is the default)::

    lmconform bench [run] --engines reference,mlx-lm,transformers --model dummy \\
                          --workloads quick --trials 5
    lmconform bench --engines a,a:slowdown=0.03:name=b --trials auto --time-budget 120
    lmconform bench show [RUN]                 # the results table of a stored run
    lmconform bench show --changes             # the runs where a measurement stepped
    lmconform bench compare [BASE] [HEAD]      # effect + 95% CI; exit 1 when regressed
    lmconform bench compare --ab A,B [RUN]     # engine B against A, paired by block
    lmconform bench plot --metric decode_tps --out decode.png
    lmconform bench ingest results.json        # pytest-benchmark --benchmark-json output

Runs are named by id, ``latest``, ``previous`` or a commit prefix. ``show`` and
``compare`` take ``--format table|json|csv``. Every command takes ``--db``: a SQLite
file (default ``.lmconform/history.sqlite``) or a ``postgresql://`` URL (a history a
team shares); ``show``, ``compare`` and ``plot`` open it read-only.

Exit status: 0 ok; 1 a regression was found (``compare``) or an engine failed
(``run``); 2 a usage or input error (unknown run, engine or workload, bad option
value, nothing in common to compare, a missing, corrupt, newer or unwritable
history); 3 an internal error of lmconform (the traceback is saved to a file whose
path is printed).

Also runnable on its own: ``python -m benchmarks.cli ...``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import compare, engines, history, ingest, plot, report, runner, workloads
from benchmarks.stats import DEFAULT_MIN_EFFECT
from engines.inputs import (
    Parser,
    arg_type,
    did_you_mean,
    environment_problems,
    non_empty,
    number,
    output_file_anywhere,
    seconds,
)
from engines.models import BUILTIN_MODELS

BENCH_MODELS = (*BUILTIN_MODELS, "synthetic")  # synthetic: the instruments' own
count = arg_type(number(int, 0, 1_000_000), "count")

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

SUBCOMMANDS = ("run", "show", "compare", "plot", "ingest")


def db_target(text: str) -> str | Path:
    """``--db``: a SQLite file path, or a ``postgresql://`` URL kept as it is."""
    return text if history.is_postgres(text) else Path(non_empty(text))


def model_name(text: str) -> str:
    """``--model``: a built-in model (or ``synthetic``, which the instruments take)."""
    if text not in BENCH_MODELS:
        raise ValueError(f"unknown model {text!r}{did_you_mean(text, BENCH_MODELS)}; "
                         f"models: {', '.join(BENCH_MODELS)}")
    return text


def _add_db(parser: argparse.ArgumentParser, **kwargs) -> None:
    parser.add_argument("--db", type=arg_type(db_target, "history"), help="history: a SQLite file (default "
                        f"{history.DEFAULT_DB}) or a postgresql://user@host/dbname URL",
                        **kwargs)


def _add_run_options(parser: argparse.ArgumentParser, **kwargs) -> None:
    """Options of ``run``; on the ``run`` sub-parser with SUPPRESS defaults, so that
    ``bench --trials 3 run`` and ``bench run --trials 3`` both work."""
    opt = parser.add_argument
    opt("--engines", help="comma list of engine specs, as for lmconform check: reference, "
        "mlx-lm, transformers, module:Class, cmd:COMMAND, synthetic (a test instrument); "
        "each may add :name=LABEL and :slowdown=FRACTION (default reference)", **kwargs)
    opt("--model", type=arg_type(model_name, "model"), help="built-in model name (default dummy)",
        **kwargs)
    opt("--workloads", help="comma list of workloads or sets: "
        f"{', '.join([*workloads.WORKLOAD_SETS, *workloads.standard_workloads()])} "
        "(default quick)", **kwargs)
    opt("--trials", type=trials, help="timed trials per engine and workload (default 5); "
        "'auto': blocks until the 95%% interval is narrower than --target-width or "
        "--time-budget ends", **kwargs)
    opt("--processes", type=arg_type(number(int, 1, 64), "processes"), help="measure in this "
        "many fresh processes, one after another, each with its own warm-up and share of the "
        "blocks (default 1: all in this process)", **kwargs)
    opt("--warmup", type=count, help="untimed rounds first (default 1)", **kwargs)
    opt("--max-warmup", type=count, help="more warm-up rounds, up to this many, while the first "
        "metric still moves by more than 3%% (default: --warmup, no extra rounds)", **kwargs)
    opt("--seed", type=arg_type(number(int, 0, 2**63 - 1), "seed"), help="seed of the blocks' random engine order (default: a random "
        "seed, recorded with the run)", **kwargs)
    opt("--max-repeats", type=count, help="measure a disturbed block again up to this many "
        "times (default 2; 0 keeps every block)", **kwargs)
    opt("--target-width", type=arg_type(number(float, 0, 10, low_open=True), "fraction"), help="--trials auto: stop when every 95%% interval "
        "is narrower than this fraction (default 0.02)", **kwargs)
    opt("--time-budget", type=arg_type(seconds, "seconds"),
        help="stop starting trials after this many seconds",
        **kwargs)
    opt("--no-bandwidth", action="store_true", help="skip the bandwidth (roofline) measurement",
        **kwargs)
    opt("--markdown", type=arg_type(output_file_anywhere, "file"), help="also write the summary table as Markdown here", **kwargs)
    _add_db(parser, **kwargs)


RUN_DEFAULTS = {
    "engines": "reference", "model": "dummy", "workloads": "quick", "trials": 5, "warmup": 1,
    "time_budget": None, "no_bandwidth": False, "markdown": None, "db": None,
    "max_warmup": None, "seed": None, "target_width": 0.02, "max_repeats": 2, "processes": 1,
}


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 10:
        raise argparse.ArgumentTypeError(f"must be a fraction >= 0 (0.02 is 2%), got {text}")
    return value


def trials(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a count or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=report.FORMATS, default="table",
                        help="table (default), json or csv on stdout")


def add_parsers(subparsers) -> argparse.ArgumentParser:
    bench = subparsers.add_parser(
        "bench", help="benchmark engines, compare runs, plot history",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_options(bench)
    bench.set_defaults(func=run_command, **RUN_DEFAULTS)
    commands = bench.add_subparsers(dest="bench_command")

    run_parser = commands.add_parser("run", help="run workloads, engines interleaved (default)")
    _add_run_options(run_parser, default=argparse.SUPPRESS)
    run_parser.set_defaults(func=run_command)

    show = commands.add_parser("show", help="print the results table of a stored run, or "
                               "the history's change points (--changes)")
    show.add_argument("run", nargs="?", default="latest")
    show.add_argument("--changes", action="store_true",
                      help="find the runs where a measurement stepped, over the whole history")
    show.add_argument("--metric", dest="changes_metric", help="with --changes: only this metric")
    show.add_argument("--workload", dest="changes_workload",
                      help="with --changes: only this workload")
    show.add_argument("--min-change", type=fraction, default=None,
                      help="with --changes: smallest step reported, as a fraction (0.01)")
    _add_format(show)
    _add_db(show, default=argparse.SUPPRESS)
    show.set_defaults(func=show_command)

    cmp = commands.add_parser("compare", help="compare two runs (effect, 95%% CI, verdict); "
                              "exit 1 on regression")
    cmp.add_argument("base", nargs="?", help="run id or commit (previous; with --ab: the run, "
                     "latest)")
    cmp.add_argument("head", nargs="?", help="run id or commit (latest)")
    cmp.add_argument("--ab", metavar="BASE,HEAD",
                     help="compare engine HEAD to engine BASE within one run, paired by trial")
    cmp.add_argument("--alpha", type=probability, default=0.05,
                     help="1 - confidence of the intervals (0.05)")
    cmp.add_argument("--min-effect", type=fraction, default=DEFAULT_MIN_EFFECT,
                     help="smallest change that counts as a regression, as a fraction "
                     f"({DEFAULT_MIN_EFFECT})")
    cmp.add_argument("--allow-different-machines", action="store_true")
    cmp.add_argument("--relative-to", metavar="ENGINE",
                     help="compare each engine's per-trial ratio to ENGINE (cancels machine "
                     "load that slowed every engine alike)")
    _add_format(cmp)
    _add_db(cmp, default=argparse.SUPPRESS)
    cmp.set_defaults(func=compare_command)

    plt = commands.add_parser("plot", help="draw a metric's history over commits as PNG")
    plt.add_argument("--metric", required=True, help="e.g. decode_tps, prefill_tps, ttft_s")
    plt.add_argument("--out", type=arg_type(output_file_anywhere, "file"), required=True,
                     help="PNG file to write")
    plt.add_argument("--workload", help="only this workload")
    plt.add_argument("--model", dest="plot_model", help="only this model")
    plt.add_argument("--summary", type=arg_type(output_file_anywhere, "file"),
                     help="Markdown summary file (default: next to the PNG, .md)")
    _add_db(plt, default=argparse.SUPPRESS)
    plt.set_defaults(func=plot_command)

    ing = commands.add_parser("ingest", help="store pytest-benchmark JSON files as runs")
    ing.add_argument("files", nargs="+", type=Path)
    _add_db(ing, default=argparse.SUPPRESS)
    ing.set_defaults(func=ingest_command)
    for parser in (bench, run_parser, show, cmp, plt, ing):
        parser.set_defaults(func=_guarded(parser.get_default("func")))
    return bench


def _history(args, read_only: bool = False) -> history.History:
    return history.History(args.db or history.DEFAULT_DB, read_only=read_only)


def _error(message: str) -> int:
    print(f"lmconform bench: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` with the exit codes kept honest: an unusable history is an input
    error (2, one line); anything unexpected is ours (3, traceback saved to a file),
    never 1, which means "regression found"."""
    if getattr(command, "guarded", False):
        return command

    def guarded(args: argparse.Namespace) -> int:
        misplaced = _misplaced_run_options(args)
        if misplaced:
            return _error(f"{', '.join(misplaced)}: only with bench run, not bench "
                          f"{args.bench_command}")
        try:
            return command(args)
        except history.HistoryError as error:
            return _error(str(error))
        except history.database_errors() as error:
            db = history.shown(getattr(args, "db", None) or history.DEFAULT_DB)
            return _error(f"the history {db} is unreadable ({error})")
        except Exception:  # noqa: BLE001 - the point is to catch what nobody expected
            with tempfile.NamedTemporaryFile("w", prefix="lmconform-bench-crash-",
                                             suffix=".txt", delete=False) as file:
                file.write(traceback.format_exc())
            print(f"lmconform bench: internal error (a bug in lmconform); traceback saved "
                  f"to {file.name}", file=sys.stderr)
            return EXIT_INTERNAL

    guarded.guarded = True
    return guarded


def _misplaced_run_options(args: argparse.Namespace) -> list[str]:
    """``run``'s options given before another sub-command (``bench --trials 3 show``), which
    would be ignored silently."""
    if getattr(args, "bench_command", None) in (None, "run"):
        return []
    return [f"--{key.replace('_', '-')}" for key, default in RUN_DEFAULTS.items()
            if key != "db" and getattr(args, key, default) != default]


def _design(args) -> dict:
    """The RunPlan's measurement-design settings from the options."""
    return {
        "order_seed": args.seed if args.seed is not None else random.randrange(2**31),
        "max_warmup": args.max_warmup, "target_width": args.target_width,
        "max_repeats": args.max_repeats,
        "auto_budget_s": args.time_budget or runner.RunPlan.auto_budget_s,
    }


def run_command(args) -> int:
    try:
        chosen = workloads.resolve(args.workloads)
        specs = engines.split_specs(args.engines)
        plan = runner.RunPlan(
            engines=[engines.TimedEngine.from_spec(spec, args.model) for spec in specs],
            model=args.model, workloads=chosen, trials=args.trials, warmup=args.warmup,
            measure_bandwidth=not args.no_bandwidth, time_budget_s=args.time_budget,
            processes=args.processes, specs=specs, **_design(args),
        )
    except (ValueError, engines.EngineUnavailable) as error:
        return _error(str(error))
    with _history(args) as store:
        try:
            outcome = runner.run(plan, store, db=args.db or history.DEFAULT_DB)
        except RuntimeError as error:  # no engine could be loaded
            return _error(str(error))
        samples = store.samples([outcome.run_id])
    print(f"run {outcome.run_id} ({args.model})")
    print(report.results_table(samples).text())
    print(report.roofline_note(samples))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report.summary_table(samples).markdown() + "\n\n"
                                 + report.roofline_note(samples) + "\n")
        print(f"wrote {args.markdown}")
    for (engine, workload), tail in outcome.errors.items():
        print(f"\n{engine} failed on {workload}:\n{tail}", file=sys.stderr)
    return 1 if outcome.errors else 0


def show_command(args) -> int:
    if args.changes:
        return changes_command(args)
    alone = [option for option, value in (("--metric", args.changes_metric),
             ("--workload", args.changes_workload), ("--min-change", args.min_change))
             if value is not None]
    if alone:
        return _error(f"{', '.join(alone)}: only with --changes")
    with _history(args, read_only=True) as store:
        try:
            run = store.resolve(args.run)
        except LookupError as error:
            return _error(str(error))
        samples = store.samples([run.id])
    if args.format != "table":
        print(report.render(report.results_records(samples), args.format))
        return EXIT_OK
    state = "interrupted" if run.interrupted else "finished"
    print(f"{run.label}, {state}, started {run.started_at}, model {run.settings.get('model')}")
    print(report.results_table(samples).text())
    print(report.roofline_note(samples))
    return EXIT_OK


def changes_command(args) -> int:
    args.min_change = 0.01 if args.min_change is None else args.min_change
    with _history(args, read_only=True) as store:
        try:
            _check_in_history(store, metric=args.changes_metric, workload=args.changes_workload)
        except LookupError as error:
            return _error(str(error.args[0]))
        found = compare.find_changes(store, args.changes_metric, args.changes_workload,
                                     min_change=args.min_change)
    if args.format != "table":
        print(report.render([c.to_dict() for c in found], args.format))
        return EXIT_OK
    if not found:
        print(f"no step of {args.min_change:.0%} or more in the history")
        return EXIT_OK
    print(compare.changes_table(found).text())
    return EXIT_OK


def _resolve_pair(store: history.History, args):
    """(base run, head run) or, with --ab, the one run (both the same)."""
    if args.ab:
        if args.head is not None:
            raise ValueError("--ab compares two engines of one run: give one run, not two")
        run = store.resolve(args.base or "latest")
        return run, run
    return store.resolve(args.base or "previous"), store.resolve(args.head or "latest")


def compare_command(args) -> int:
    with _history(args, read_only=True) as store:
        try:
            base, head = _resolve_pair(store, args)
            if args.ab:
                names = [n.strip() for n in args.ab.split(",")]
                if len(names) != 2 or not all(names) or args.relative_to:
                    raise ValueError("--ab takes BASE,HEAD (two engine names) and no "
                                     "--relative-to")
                result = compare.compare_engines(store, base, *names, alpha=args.alpha,
                                                 min_effect=args.min_effect)
            else:
                result = compare.compare_runs(
                    store, base, head, alpha=args.alpha, min_effect=args.min_effect,
                    allow_different_machines=args.allow_different_machines,
                    relative_to=args.relative_to,
                )
        except (LookupError, ValueError, compare.DifferentMachines) as error:
            return _error(str(error))
    status = EXIT_REGRESSION if result.regressed else EXIT_OK
    if args.format == "json":
        print(json.dumps(report.json_ready(result.to_dict()), indent=2))
        return status
    if args.format == "csv":
        print(report.render(result.to_dict()["verdicts"], "csv"))
        return status
    roles = (("runs", base),) if base is head else (("base", base), ("head", head))
    for role, run in roles:
        state = " (interrupted)" if run.interrupted else ""
        print(f"{role}: {run.label}{state}, started {run.started_at}")
    for name, (old, new) in result.software_changes.items():
        print(f"note: {name} differs: {old!r} -> {new!r}")
    print(result.table().text())
    for key in result.only_base:
        print(f"only in base: {'/'.join(key)}")
    for key in result.only_head:
        print(f"only in head: {'/'.join(key)}")
    print(", ".join(f"{n} {v}" for v, n in result.counts().items()))
    return status


def _check_in_history(store: history.History, **wanted: str | None) -> None:
    """Each of ``metric``, ``workload``, ``model`` asked for must occur in the history
    (``LookupError`` names the closest that does): a typo must not read as "no change"."""
    samples = store.samples()
    for field, value in wanted.items():
        present = sorted({getattr(sample, field) for sample in samples})
        if value is not None and value not in present:
            raise LookupError(f"no {field} {value!r} in the history{did_you_mean(value, present)}"
                              f"; there: {', '.join(present) or 'nothing'}")


def plot_command(args) -> int:
    if args.summary is not None and args.summary.resolve() == args.out.resolve():
        return _error(f"--summary {args.summary}: the same file as --out")
    with _history(args, read_only=True) as store:
        try:
            _check_in_history(store, metric=args.metric, workload=args.workload,
                              model=args.plot_model)
        except LookupError as error:
            return _error(str(error.args[0]))
        series = plot.history_series(store, args.metric, args.workload, args.plot_model)
    if not series:
        return _error(f"no samples of metric {args.metric!r} match in the history")
    out = plot.plot_history(series, args.metric, args.out)
    summary_path = args.summary or out.with_suffix(".md")
    summary = plot.markdown_summary(series, args.metric, image=out.name)
    summary_path.write_text(summary)
    print(summary)
    print(f"wrote {out} and {summary_path}")
    return 0


def ingest_command(args) -> int:
    with _history(args) as store:
        for file in args.files:
            try:
                run_id = ingest.ingest_file(store, file)
            except (OSError, ValueError, KeyError) as error:
                return _error(f"cannot ingest {file}: {error}")
            print(f"ingested {file} as run {run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="lmconform")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    problems = environment_problems()
    if problems:
        return _error(problems[0])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
