"""``lmconform bench``: run benchmarks, compare runs, plot history, ingest JSON.

Sub-commands (``run`` is the default)::

    lmconform bench [run] --engines reference,mlx-lm,transformers --model dummy \\
                          --workloads quick --trials 5
    lmconform bench show [RUN]                 # the results table of a stored run
    lmconform bench compare [BASE] [HEAD]      # exit 1 when something regressed
    lmconform bench plot --metric decode_tps --out decode.png
    lmconform bench ingest results.json        # pytest-benchmark --benchmark-json output

Runs are named by id, ``latest``, ``previous`` or a commit prefix. Every command
takes ``--db`` (default ``.lmconform/history.sqlite``).

Also runnable on its own: ``python -m benchmarks.cli ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import compare, engines, history, ingest, plot, report, runner, workloads

SUBCOMMANDS = ("run", "show", "compare", "plot", "ingest")


def _add_db(parser: argparse.ArgumentParser, **kwargs) -> None:
    parser.add_argument("--db", type=Path, help=f"history database (default {history.DEFAULT_DB})",
                        **kwargs)


def _add_run_options(parser: argparse.ArgumentParser, **kwargs) -> None:
    """Options of ``run``; on the ``run`` sub-parser with SUPPRESS defaults, so that
    ``bench --trials 3 run`` and ``bench run --trials 3`` both work."""
    opt = parser.add_argument
    opt("--engines", help="comma list of engine specs: reference, mlx-lm, transformers, "
        "synthetic[:option=value...] (default reference)", **kwargs)
    opt("--model", help="model name or folder (default dummy)", **kwargs)
    opt("--workloads", help="comma list of workloads or sets: "
        f"{', '.join([*workloads.WORKLOAD_SETS, *workloads.standard_workloads()])} "
        "(default quick)", **kwargs)
    opt("--trials", type=int, help="timed trials per engine and workload (default 5)", **kwargs)
    opt("--warmup", type=int, help="untimed rounds first (default 1)", **kwargs)
    opt("--time-budget", type=float, help="stop starting trials after this many seconds",
        **kwargs)
    opt("--no-bandwidth", action="store_true", help="skip the bandwidth (roofline) measurement",
        **kwargs)
    opt("--markdown", type=Path, help="also write the summary table as Markdown here", **kwargs)
    _add_db(parser, **kwargs)


RUN_DEFAULTS = {
    "engines": "reference", "model": "dummy", "workloads": "quick", "trials": 5, "warmup": 1,
    "time_budget": None, "no_bandwidth": False, "markdown": None, "db": None,
}


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

    show = commands.add_parser("show", help="print the results table of a stored run")
    show.add_argument("run", nargs="?", default="latest")
    _add_db(show, default=argparse.SUPPRESS)
    show.set_defaults(func=show_command)

    cmp = commands.add_parser("compare", help="rank-test two runs; exit 1 on regression")
    cmp.add_argument("base", nargs="?", default="previous", help="run id or commit (previous)")
    cmp.add_argument("head", nargs="?", default="latest", help="run id or commit (latest)")
    cmp.add_argument("--alpha", type=float, default=0.05, help="rank-test level (0.05)")
    cmp.add_argument("--min-effect", type=float, default=0.05,
                     help="smallest median change that counts, as a fraction (0.05)")
    cmp.add_argument("--allow-different-machines", action="store_true")
    cmp.add_argument("--relative-to", metavar="ENGINE",
                     help="compare each engine's per-trial ratio to ENGINE (cancels machine "
                     "load that slowed every engine alike)")
    _add_db(cmp, default=argparse.SUPPRESS)
    cmp.set_defaults(func=compare_command)

    plt = commands.add_parser("plot", help="draw a metric's history over commits as PNG")
    plt.add_argument("--metric", required=True, help="e.g. decode_tps, prefill_tps, ttft_s")
    plt.add_argument("--out", type=Path, required=True, help="PNG file to write")
    plt.add_argument("--workload", help="only this workload")
    plt.add_argument("--model", dest="plot_model", help="only this model")
    plt.add_argument("--summary", type=Path,
                     help="Markdown summary file (default: next to the PNG, .md)")
    _add_db(plt, default=argparse.SUPPRESS)
    plt.set_defaults(func=plot_command)

    ing = commands.add_parser("ingest", help="store pytest-benchmark JSON files as runs")
    ing.add_argument("files", nargs="+", type=Path)
    _add_db(ing, default=argparse.SUPPRESS)
    ing.set_defaults(func=ingest_command)
    return bench


def _history(args) -> history.History:
    return history.History(args.db or history.DEFAULT_DB)


def _error(message: str) -> int:
    print(f"lmconform bench: error: {message}", file=sys.stderr)
    return 2


def run_command(args) -> int:
    try:
        chosen = workloads.resolve(args.workloads)
        specs = [s for s in args.engines.split(",") if s.strip()]
        plan = runner.RunPlan(
            engines=[engines.make_engine(spec, args.model) for spec in specs],
            model=args.model, workloads=chosen, trials=args.trials, warmup=args.warmup,
            measure_bandwidth=not args.no_bandwidth, time_budget_s=args.time_budget,
        )
    except ValueError as error:
        return _error(str(error))
    with _history(args) as store:
        try:
            outcome = runner.run(plan, store)
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
    with _history(args) as store:
        try:
            run = store.resolve(args.run)
        except LookupError as error:
            return _error(str(error))
        samples = store.samples([run.id])
    state = "interrupted" if run.interrupted else "finished"
    print(f"{run.label}, {state}, started {run.started_at}, model {run.settings.get('model')}")
    print(report.results_table(samples).text())
    print(report.roofline_note(samples))
    return 0


def compare_command(args) -> int:
    with _history(args) as store:
        try:
            base, head = store.resolve(args.base), store.resolve(args.head)
            result = compare.compare_runs(
                store, base, head, alpha=args.alpha, min_effect=args.min_effect,
                allow_different_machines=args.allow_different_machines,
                relative_to=args.relative_to,
            )
        except (LookupError, ValueError, compare.DifferentMachines) as error:
            return _error(str(error))
    for run, role in ((base, "base"), (head, "head")):
        state = " (interrupted)" if run.interrupted else ""
        print(f"{role}: {run.label}{state}, started {run.started_at}")
    for name, (old, new) in result.software_changes.items():
        print(f"note: {name} differs: {old!r} -> {new!r}")
    print(result.table().text())
    for key in result.only_base:
        print(f"only in base: {'/'.join(key)}")
    for key in result.only_head:
        print(f"only in head: {'/'.join(key)}")
    counts = {v: sum(x.verdict == v for x in result.verdicts.values())
              for v in ("improved", "unchanged", "regressed")}
    print(", ".join(f"{n} {v}" for v, n in counts.items()))
    return 1 if result.regressed else 0


def plot_command(args) -> int:
    with _history(args) as store:
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
    parser = argparse.ArgumentParser(prog="lmconform")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
