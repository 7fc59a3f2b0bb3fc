"""The bench runner: engines interleaved trial by trial, every trial stored at once.

Why interleave: a laptop or a shared CI box drifts (thermal throttling, a neighbour's
job) over minutes. Running all of engine A, then all of engine B, charges the drift
to whichever ran second. Running A B A B ... spreads it evenly, so the *ratio*
between engines holds even when the absolute numbers wander.

For each workload: every engine first runs ``warmup`` untimed rounds (compilation,
allocator growth, caches), then ``trials`` rounds of A B A B ...; each (trial,
engine) result is committed to the history before the next starts, so a run that
is killed keeps everything it finished. Progress goes to stderr, one line per trial.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import TextIO

from benchmarks import fingerprint, revision, roofline
from benchmarks.engines import INSTALL_HINTS, BenchEngine
from benchmarks.history import History
from benchmarks.workloads import Workload, metric


@dataclass
class RunPlan:
    engines: list[BenchEngine]
    model: str
    workloads: list[Workload]
    trials: int = 5
    warmup: int = 1
    measure_bandwidth: bool = True
    # Stop starting new trials after this many seconds (finished trials are kept).
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if not self.engines:
            raise ValueError("at least one engine is needed")
        names = [e.name for e in self.engines]
        if len(set(names)) != len(names):
            raise ValueError(f"engine names must be distinct (use name=...), got {names}")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@dataclass
class RunOutcome:
    run_id: int
    errors: dict[tuple[str, str], str] = field(default_factory=dict)  # (engine, workload)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unsupported
    out_of_time: bool = False


class Progress:
    """One line per event on stderr; flushed, so a killed run shows what finished."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr

    def __call__(self, message: str) -> None:
        print(message, file=self.stream, flush=True)


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}{metric(name).unit}" for name, value in values.items())


def run(plan: RunPlan, history: History, progress: Progress | None = None) -> RunOutcome:
    """Execute ``plan``, storing every trial in ``history``; returns the run id and notes."""
    say = progress or Progress()
    started = time.monotonic()
    engines, load_errors = _load(plan, say)
    versions: dict[str, str] = {}
    for engine in engines:
        versions.update(engine.versions())
    run_id = history.start_run(
        revision.current(),
        fingerprint.collect(versions),
        settings={
            "argv": sys.argv,
            "engines": [e.name for e in engines],
            "model": plan.model,
            "workloads": [w.name for w in plan.workloads],
            "trials": plan.trials,
            "warmup": plan.warmup,
        },
    )
    outcome = RunOutcome(run_id, errors=load_errors)
    say(f"run {run_id}: {len(engines)} engines x {len(plan.workloads)} workloads "
        f"x {plan.trials} trials -> {history.path}")

    if plan.measure_bandwidth:
        bandwidth = roofline.measure_bandwidth()
        history.add_trial(run_id, 0, "machine", plan.model, "memory-bandwidth",
                          {"bandwidth_gbs": bandwidth / 1e9}, {})
        say(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s")

    def out_of_time() -> bool:
        return plan.time_budget_s is not None and time.monotonic() - started > plan.time_budget_s

    for index, workload in enumerate(plan.workloads, 1):
        active = []
        for engine in engines:
            if engine.supports(workload.kind):
                active.append(engine)
            else:
                outcome.skipped.append((engine.name, workload.name))
                say(f"[{workload.name}] {engine.name}: unsupported, skipped")
        for round_ in range(plan.warmup):
            for engine in list(active):
                if not _attempt(engine, workload, outcome, say, f"warm-up {round_ + 1}"):
                    active.remove(engine)
        for trial in range(1, plan.trials + 1):
            if out_of_time():
                outcome.out_of_time = True
                say(f"time budget of {plan.time_budget_s:.0f}s spent; stopping")
                history.finish_run(run_id)
                return outcome
            for engine in list(active):
                values = _attempt(engine, workload, outcome, say, f"trial {trial}")
                if values is None:
                    active.remove(engine)
                    continue
                history.add_trial(
                    run_id, trial, engine.name, plan.model, workload.name, values,
                    {"workload": workload.settings(), "engine": engine.settings()},
                )
                say(f"[{index}/{len(plan.workloads)} {workload.name}] trial "
                    f"{trial}/{plan.trials} {engine.name}: {_format(values)}")
    history.finish_run(run_id)
    return outcome


def _load(plan: RunPlan, say) -> tuple[list[BenchEngine], dict[tuple[str, str], str]]:
    """Load every engine; one that cannot load is reported and left out of the run."""
    loaded, errors = [], {}
    for engine in plan.engines:
        say(f"loading {engine.name} ({plan.model}) ...")
        try:
            engine.load()
        except ImportError as error:
            hint = INSTALL_HINTS.get(engine.name, "install it")
            errors[(engine.name, "load")] = f"not installed ({error}); {hint}"
            say(f"{engine.name} is not installed, skipped: {hint}")
            continue
        except Exception as error:  # noqa: BLE001 - report it, run the other engines
            errors[(engine.name, "load")] = "".join(traceback.format_exception(error)[-3:])
            say(f"{engine.name} failed to load: {error!r}")
            continue
        loaded.append(engine)
    if not loaded:
        details = "; ".join(f"{name}: {text.strip()}" for (name, _), text in errors.items())
        raise RuntimeError(f"no engine could be loaded ({details})")
    return loaded, errors


def _attempt(engine, workload, outcome, say, what) -> dict[str, float] | None:
    """One measurement; an engine that fails is reported and dropped from the workload."""
    try:
        return workload.measure(engine)
    except Exception as error:  # noqa: BLE001 - one failing engine must not end the run
        tail = "".join(traceback.format_exception(error)[-3:]).strip()
        outcome.errors[(engine.name, workload.name)] = tail
        say(f"[{workload.name}] {engine.name} failed in {what}: {error!r}")
        return None
