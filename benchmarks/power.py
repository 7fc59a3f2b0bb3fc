"""The power curve: how often a comparison detects an injected slowdown, measured here.

For each injected slowdown (``slowdown=`` makes each decode step of an engine that
fraction longer) the same comparison is repeated: one run of the engine against its
slowed copy, interleaved in blocks of random order (``runner``), ``--trials auto``
until the paired 95% interval is narrower than ``target_width`` or the comparison's
time budget is spent, then judged by ``compare.compare_engines`` (paired
Hodges-Lehmann interval, default 2% minimum effect). The detection rate at 0% is the
false-alarm rate.

Two metrics are judged from the same trials: ``decode_tps`` (wall clock: what a user
waits) and ``cpu_s`` (this process's CPU time for the trial: what the engine computed,
blind to other processes taking the CPU away, which on a shared machine is most of
the wall clock's noise). The interval that stops ``--trials auto`` is decode_tps's.

    python -m benchmarks.power                                   # synthetic engine
    python -m benchmarks.power --engine reference --model dummy --repetitions 10

Prints a Markdown table (and writes it with ``--out``); every comparison is kept in
a throw-away history unless ``--db`` names one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

from benchmarks import runner, workloads
from benchmarks.cli import db_target, model_name
from benchmarks.compare import compare_engines
from benchmarks.engines import TimedEngine
from benchmarks.history import History
from benchmarks.report import Table
from benchmarks.stats import DEFAULT_MIN_EFFECT, REGRESSED
from engines.inputs import (
    Parser,
    arg_type,
    environment_problems,
    number,
    output_file,
    seconds,
)

METRICS = ("decode_tps", "cpu_s", "decode_cpu_s")


@dataclass(frozen=True)
class Judged:
    detected: bool
    change: float  # estimated relative change of the metric
    low: float
    high: float


@dataclass(frozen=True)
class Trial:
    """One comparison of an engine against its slowed copy."""

    slowdown: float
    judged: dict[str, Judged]  # per metric
    blocks: int
    seconds: float


def one_comparison(
    engine: str, model: str, workload: workloads.Workload, slowdown: float, seed: int,
    history: History, budget_s: float, target_width: float, min_effect: float,
    max_repeats: int = 0, max_blocks: int = 200,
) -> Trial:
    """Run base and slowed head interleaved in blocks; judge them, paired, per metric."""
    head = f"{engine}:name=head" + (f":slowdown={slowdown}" if slowdown else "")
    plan = runner.RunPlan(
        [TimedEngine.from_spec(f"{engine}:name=base", model), TimedEngine.from_spec(head, model)],
        model, [workload], trials="auto", warmup=1, measure_bandwidth=False,
        order_seed=seed, target_width=target_width, auto_budget_s=budget_s,
        max_repeats=max_repeats, max_trials=max_blocks,
    )
    started = time.monotonic()
    outcome = runner.run(plan, history, lambda message: None)
    seconds = time.monotonic() - started
    if outcome.errors:
        raise RuntimeError(f"the comparison failed: {outcome.errors}")
    run = history.run(outcome.run_id)
    verdicts = compare_engines(history, run, "base", "head", min_effect=min_effect).verdicts
    judged, blocks = {}, 0
    for key, v in verdicts.items():
        if key[3] in METRICS:
            judged[key[3]] = Judged(v.verdict == REGRESSED, v.change, v.low, v.high)
            blocks = v.n_base
    return Trial(slowdown, judged, blocks, seconds)


def power_table(trials: list[Trial]) -> Table:
    """Per slowdown and metric: detections, their rate, the median estimate and width."""
    table = Table(["slowdown", *(f"{m} {what}" for m in METRICS
                                 for what in ("detected", "median estimate", "median CI width")),
                   "median blocks", "median s", "max s"])
    for slowdown in sorted({t.slowdown for t in trials}):
        group = [t for t in trials if t.slowdown == slowdown]
        cells = [f"{slowdown:.0%}"]
        for name in METRICS:
            judged = [t.judged[name] for t in group]
            hits = sum(j.detected for j in judged)
            cells += [f"{hits}/{len(judged)} ({hits / len(judged):.0%})",
                      f"{median(j.change for j in judged):+.1%}",
                      f"{median(j.high - j.low for j in judged):.1%}"]
        cells += [f"{median(t.blocks for t in group):.0f}",
                  f"{median(t.seconds for t in group):.1f}", f"{max(t.seconds for t in group):.1f}"]
        table.rows.append(cells)
    return table


def fractions(text: str) -> list[float]:
    """``--slowdowns``: comma-separated fractions, each in [0, 10]."""
    values = [number(float, 0, 10)(part) for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError(f"expected comma-separated fractions, got {text!r}")
    return values


def engine_spec(text: str) -> str:
    """``--engine``: a spec the registry accepts, its options checked (not opened)."""
    from benchmarks.engines import parse_bench_spec
    from engines.registry import EngineUnavailable

    try:
        parse_bench_spec(text)
    except EngineUnavailable as error:
        raise ValueError(str(error)) from None
    return text


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m benchmarks.power", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=arg_type(engine_spec, "engine"),
                        default="synthetic:step_ms=2", help="engine spec")
    parser.add_argument("--model", type=arg_type(model_name, "model"), default="synthetic")
    parser.add_argument("--new-tokens", type=arg_type(number(int, 1, 100_000), "count"),
                        default=64, help="decoded tokens per trial")
    parser.add_argument("--slowdowns", type=arg_type(fractions, "fractions"),
                        default=fractions("0,0.01,0.02,0.03,0.05,0.10"))
    parser.add_argument("--repetitions", type=arg_type(number(int, 1, 100_000), "count"),
                        default=20)
    parser.add_argument("--budget", type=arg_type(seconds, "seconds"), default=20.0,
                        help="seconds of blocks per comparison (after the warm-up)")
    parser.add_argument("--target-width", type=arg_type(number(float, 0, 10, low_open=True)),
                        default=0.015)
    parser.add_argument("--min-effect", type=arg_type(number(float, 0, 10)),
                        default=DEFAULT_MIN_EFFECT)
    parser.add_argument("--max-repeats", type=arg_type(number(int, 0, 1000), "count"), default=0,
                        help="repeats of a disturbed block (0: keep every block; on a machine "
                        "whose load changes all the time, repeats only cost time)")
    parser.add_argument("--max-blocks", type=arg_type(number(int, 2, 1_000_000), "count"),
                        default=200,
                        help="most blocks per comparison (short trials reach 200 in ~35 s)")
    parser.add_argument("--db", type=arg_type(db_target, "history"),
                        help="keep the runs in this history (a file or a postgresql:// URL)")
    parser.add_argument("--out", type=arg_type(output_file, "file"),
                        help="write the Markdown table and JSON here")
    args = parser.parse_args(argv)
    problems = environment_problems()
    if problems:
        parser.error(problems[0])
    # Before any engine imports mlx.core: the reference binds MLX's float32 products to
    # OpenBLAS only if it comes first (reference/blas.py), as under `lmconform bench`.
    import reference  # noqa: F401

    slowdowns = args.slowdowns
    workload = workloads.Workload(f"decode-{args.new_tokens}", "decode", prompt_tokens=8,
                                  new_tokens=args.new_tokens)
    db = args.db or Path(tempfile.mkdtemp(prefix="lmconform-power-")) / "history.sqlite"
    trials: list[Trial] = []
    with History(db) as history:
        # Round-robin over the slowdowns, so that a change of the machine's load during
        # the measurement touches every row of the table alike.
        for repetition in range(args.repetitions):
            for slowdown in slowdowns:
                trial = one_comparison(args.engine, args.model, workload, slowdown,
                                       seed=repetition, history=history,
                                       budget_s=args.budget, target_width=args.target_width,
                                       min_effect=args.min_effect, max_repeats=args.max_repeats,
                                       max_blocks=args.max_blocks)
                trials.append(trial)
                said = "; ".join(
                    f"{name} {'DETECTED' if j.detected else 'quiet'} {j.change:+.2%} "
                    f"[{j.low:+.2%}, {j.high:+.2%}]" for name, j in trial.judged.items())
                print(f"repetition {repetition + 1}/{args.repetitions} slowdown {slowdown:.0%}: "
                      f"{said} ({trial.blocks} blocks, {trial.seconds:.1f}s)",
                      file=sys.stderr, flush=True)
    table = power_table(trials).markdown()
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps([asdict(t) for t in trials],
                                                            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
