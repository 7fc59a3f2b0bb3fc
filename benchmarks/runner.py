"""The bench runner: engines interleaved in blocks, every block stored at once.

Why interleave: a laptop or a shared CI box drifts (thermal throttling, a neighbour's
job) over minutes. Running all of engine A, then all of engine B, charges the drift
to whichever ran second. Running blocks of one trial per engine spreads it evenly,
so the *ratio* between engines holds even when the absolute numbers wander; and
with ``order_seed`` each block runs its engines in a random order (seeded and
recorded), so that no engine always runs first, right after a context switch.

For each workload:

1. warm-up: every engine runs ``warmup`` untimed rounds (compilation, allocator
   growth, caches), then more, up to ``max_warmup``, while the first metric still
   moves by more than ``stable_within`` from one round to the next;
2. blocks: one trial per engine, in the block's order. Each trial records wall time
   and this process's CPU time (the whole trial's, and its decode phase's: first to
   last event), and the machine's state from ``/proc/stat``: the
   share of CPU time the hypervisor stole, and how many cores other processes kept
   busy. A block with a disturbed trial (steal above ``max_steal``, or the other
   processes' load off its running median by more than ``max_load_change`` cores)
   is measured again, up to ``max_repeats`` times, rather than kept;
3. ``trials`` blocks, or with ``trials="auto"`` blocks until the 95% interval of
   every engine's first metric (paired against the first engine; alone: of its
   median) is narrower than ``target_width``, or ``auto_budget_s`` is spent.

Each block is committed to the history before the next starts, so a run that is
killed keeps every block it finished. Progress goes to stderr, one line per trial.

With ``processes`` > 1 the blocks are measured in that many fresh Python processes,
one after another (``benchmarks.runner_worker``): everything a process sets up once
(memory layout, allocator, thread placement, caches) is shared by all its trials, so
one process measures one draw of it; several average over it, as pyperf does. Each
worker loads the engines, warms up and runs its share of blocks, numbered after the
previous worker's; a block never spans processes, so comparisons stay paired.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import TextIO

from benchmarks import fingerprint, revision, roofline
from benchmarks.engines import TimedEngine
from benchmarks.history import History
from benchmarks.stats import median_interval, shift_interval
from benchmarks.workloads import Workload, metric
from engines.protocol import Unsupported
from engines.registry import EngineUnavailable


@dataclass
class RunPlan:
    engines: list[TimedEngine]  # opened by the run (``load``), closed at its end
    model: str
    workloads: list[Workload]
    trials: int | str = 5  # or "auto"
    warmup: int = 1
    measure_bandwidth: bool = True
    # Stop starting new trials after this many seconds (finished trials are kept).
    time_budget_s: float | None = None
    # Each block's engine order is shuffled with this seed; None keeps the given order.
    order_seed: int | None = None
    # Warm-up goes on (up to max_warmup rounds) while the first metric moves more than this.
    max_warmup: int | None = None
    stable_within: float = 0.03
    # A block is repeated (up to max_repeats times) when a trial in it was disturbed.
    max_steal: float = 0.10  # share of the trial's CPU time stolen by the hypervisor
    max_load_change: float = 1.0  # cores of other processes' load away from its median
    max_repeats: int = 2
    # trials="auto": blocks until every interval is this narrow (relative), between
    # min_trials and max_trials blocks, at most auto_budget_s seconds per workload.
    target_width: float = 0.02
    min_trials: int = 6
    max_trials: int = 200
    auto_budget_s: float = 60.0
    # Blocks measured in this many fresh processes, one after another; they re-create
    # the engines from ``specs`` (the --engines texts, one per engine).
    processes: int = 1
    specs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.engines:
            raise ValueError("at least one engine is needed")
        names = [e.name for e in self.engines]
        if len(set(names)) != len(names):
            raise ValueError(f"engine names must be distinct (use name=...), got {names}")
        if self.trials != "auto" and (not isinstance(self.trials, int) or self.trials < 1):
            raise ValueError(f"trials must be >= 1 or 'auto', got {self.trials!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.max_warmup is not None and self.max_warmup < self.warmup:
            raise ValueError(f"max_warmup ({self.max_warmup}) is below warmup ({self.warmup})")
        if not 0 < self.target_width < 10 or self.auto_budget_s <= 0:
            raise ValueError("target_width must be in (0, 10) and auto_budget_s positive")
        if self.max_repeats < 0:
            raise ValueError(f"max_repeats must be >= 0, got {self.max_repeats}")
        if not 1 <= self.processes <= 64:
            raise ValueError(f"--processes must be in [1, 64], got {self.processes}")
        if self.processes > 1 and len(self.specs) != len(self.engines):
            raise ValueError("--processes needs the engines' spec texts, one per engine")
        if not self.auto and self.trials < self.processes:
            raise ValueError(f"--trials {self.trials} is fewer than --processes "
                             f"{self.processes}: every process needs a block")

    @property
    def auto(self) -> bool:
        return self.trials == "auto"

    def design(self) -> dict:
        """The measurement design, stored with the run."""
        keep = ("trials", "warmup", "max_warmup", "stable_within", "order_seed", "max_steal",
                "max_load_change", "max_repeats", "target_width", "min_trials", "max_trials",
                "auto_budget_s")
        design = {name: getattr(self, name) for name in keep}
        return {**design, "processes": self.processes} if self.processes > 1 else design


@dataclass
class RunOutcome:
    run_id: int
    errors: dict[tuple[str, str], str] = field(default_factory=dict)  # (engine, workload)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unsupported
    out_of_time: bool = False
    last_trials: dict[str, int] = field(default_factory=dict)  # workload: its last block

    def merge(self, other: RunOutcome, label: str) -> None:
        """Add a worker's outcome (``label`` names the worker in its errors)."""
        self.errors.update({key: f"{label}: {text}" for key, text in other.errors.items()})
        self.skipped.extend(s for s in other.skipped if s not in self.skipped)
        self.out_of_time |= other.out_of_time
        self.last_trials.update(other.last_trials)


class Progress:
    """One line per event on stderr; flushed, so a killed run shows what finished."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr

    def __call__(self, message: str) -> None:
        print(message, file=self.stream, flush=True)


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}{metric(name).unit}" for name, value in values.items())


def run(plan: RunPlan, history: History, progress: Progress | None = None,
        db: str | Path | None = None) -> RunOutcome:
    """Execute ``plan``, storing every trial in ``history``; returns the run id and notes.
    ``db``: the history's target as given (workers open it again; a URL unmasked)."""
    say = progress or Progress()
    started = time.monotonic()
    engines, load_errors = _load(plan, say)
    try:
        run_id = _start(plan, engines, history, say)
        if plan.processes > 1:
            _close(engines)  # the workers load their own; free the memory first
            return _run_workers(plan, history, str(db or history.path), run_id,
                                RunOutcome(run_id, errors=load_errors), say)
        outcome = RunOutcome(run_id, errors=load_errors)
        _measure(plan, engines, history, outcome, say, started)
        history.finish_run(run_id)
        return outcome
    finally:
        _close(engines)


def _close(engines: list) -> None:
    """Close each engine once, emptying ``engines``."""
    while engines:
        engines.pop().close()


def _start(plan: RunPlan, engines, history: History, say) -> int:
    """Start the run in the history and measure the memory bandwidth (once per run)."""
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
            **plan.design(),
        },
    )
    say(f"run {run_id}: {len(engines)} engines x {len(plan.workloads)} workloads "
        f"x {plan.trials} trials -> {history.path}")
    if plan.measure_bandwidth:
        bandwidth = roofline.measure_bandwidth()
        history.add_trial(run_id, 0, "machine", plan.model, "memory-bandwidth",
                          {"bandwidth_gbs": bandwidth / 1e9}, {})
        say(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
    return run_id


def _measure(plan: RunPlan, engines, history: History, outcome: RunOutcome, say,
             started: float, first_trials: dict[str, int] | None = None,
             tags: dict | None = None, total: int | str | None = None) -> None:
    """Warm-up and blocks of every workload; block numbers continue after
    ``first_trials[workload]``; ``tags`` go into every trial's facts; ``total``: the
    run's block count as progress shows it (a worker's plan holds only its share)."""
    rng = random.Random(plan.order_seed) if plan.order_seed is not None else None

    def out_of_time() -> bool:
        return plan.time_budget_s is not None and time.monotonic() - started > plan.time_budget_s

    for index, workload in enumerate(plan.workloads, 1):
        active = []
        for engine in engines:
            reason = engine.unsupported(workload.kind)
            if reason is None:
                active.append(engine)
            else:
                outcome.skipped.append((engine.name, workload.name))
                say(f"[{workload.name}] {engine.name}: unsupported, skipped ({reason})")
        _warm_up(plan, workload, active, outcome, say)
        load = LoadTracker()
        collected: dict[str, dict[int, float]] = {engine.name: {} for engine in active}
        offset = (first_trials or {}).get(workload.name, 0)
        workload_started, done = time.monotonic(), 0
        while active and _wants_more(plan, done, collected, workload_started):
            if out_of_time():
                outcome.out_of_time = True
                say(f"time budget of {plan.time_budget_s:.0f}s spent; stopping")
                return
            done += 1
            trial = offset + done
            order = rng.sample(active, len(active)) if rng else list(active)
            block = _block(plan, workload, order, load, outcome, say, trial)
            for position, (engine, values, facts) in enumerate(block):
                history.add_trial(
                    outcome.run_id, trial, engine.name, plan.model, workload.name, values,
                    {"workload": workload.settings(), "engine": engine.settings(),
                     "trial": {**facts, "position": position, **(tags or {})}},
                )
                collected[engine.name][trial] = next(iter(values.values()))
                say(f"[{index}/{len(plan.workloads)} {workload.name}] trial "
                    f"{trial}/{total or plan.trials} {engine.name}: {_format(values)}")
            outcome.last_trials[workload.name] = trial
            active = [engine for engine in active if any(e is engine for e, _, _ in block)]


# --- several processes ------------------------------------------------------------------


def shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` counts as even as possible, larger ones first."""
    return [total // parts + (k < total % parts) for k in range(parts)]


def worker_plan(plan: RunPlan, process: int) -> dict:
    """What worker ``process`` (1-based) measures: its share of fixed blocks, or with
    ``trials="auto"`` an equal share of the time budget and of min/max_trials (each
    worker stops by the interval rule on its own blocks). Its order seed is the run's
    plus ``process``, so workers do not repeat one another's orders."""
    n = plan.processes
    design = {key: value for key, value in plan.design().items() if key != "processes"}
    design["trials"] = plan.trials if plan.auto else shares(plan.trials, n)[process - 1]
    if plan.order_seed is not None:
        design["order_seed"] = plan.order_seed + process
    if plan.auto:
        design["auto_budget_s"] = plan.auto_budget_s / n
        design["max_trials"] = math.ceil(plan.max_trials / n)
        design["min_trials"] = min(design["max_trials"], max(2, math.ceil(plan.min_trials / n)))
    budget = None if plan.time_budget_s is None else plan.time_budget_s / n
    return {"design": design, "time_budget_s": budget}


def _run_workers(plan: RunPlan, history: History, db: str, run_id: int,
                 outcome: RunOutcome, say) -> RunOutcome:
    """Workers 1..N, one after another (concurrent ones would disturb each other)."""
    for process in range(1, plan.processes + 1):
        job = {
            "db": db, "run_id": run_id, "process": process,
            "specs": plan.specs, "model": plan.model,
            "workloads": [w.name for w in plan.workloads],
            "first_trials": dict(outcome.last_trials), "total": plan.trials,
            **worker_plan(plan, process),
        }
        say(f"process {process}/{plan.processes} starting")
        label = f"process {process}"
        with tempfile.TemporaryDirectory(prefix="lmconform-worker-") as folder:
            job_file, result_file = Path(folder, "job.json"), Path(folder, "result.json")
            job["result"] = str(result_file)
            job_file.write_text(json.dumps(job))
            # stderr inherited: the worker's progress lines reach the user as they come
            code = subprocess.run([sys.executable, "-m", "benchmarks.runner_worker",
                                   str(job_file)], check=False,
                                  stdout=subprocess.DEVNULL).returncode
            if result_file.exists():
                outcome.merge(outcome_from_json(run_id, result_file.read_text()), label)
        if code != 0:
            outcome.errors[(label, "worker")] = f"the worker exited with status {code}"
            say(f"{label} failed (exit status {code}); its stored trials are kept")
        if outcome.out_of_time:
            break
    history.finish_run(run_id)
    return outcome


def outcome_to_json(outcome: RunOutcome) -> str:
    return json.dumps({"errors": [[*key, text] for key, text in outcome.errors.items()],
                       "skipped": outcome.skipped, "out_of_time": outcome.out_of_time,
                       "last_trials": outcome.last_trials})


def outcome_from_json(run_id: int, text: str) -> RunOutcome:
    data = json.loads(text)
    return RunOutcome(run_id, errors={(e, w): t for e, w, t in data["errors"]},
                      skipped=[tuple(s) for s in data["skipped"]],
                      out_of_time=data["out_of_time"], last_trials=data["last_trials"])


def run_worker(job: dict, history: History, say: Progress) -> RunOutcome:
    """One worker's part of a run (``job`` as ``_run_workers`` writes it)."""
    from benchmarks import engines as bench_engines
    from benchmarks import workloads

    plan = RunPlan(
        engines=[bench_engines.TimedEngine.from_spec(spec, job["model"]) for spec in job["specs"]],
        model=job["model"], workloads=workloads.resolve(",".join(job["workloads"])),
        measure_bandwidth=False, time_budget_s=job["time_budget_s"],
        **job["design"],
    )
    started = time.monotonic()
    outcome = RunOutcome(job["run_id"])
    engines, outcome.errors = _load(plan, say)
    try:
        _measure(plan, engines, history, outcome, say, started, job["first_trials"],
                 tags={"process": job["process"], "pid": os.getpid()}, total=job["total"])
    finally:
        for engine in engines:
            engine.close()
    return outcome


def _load(plan: RunPlan, say) -> tuple[list[TimedEngine], dict[tuple[str, str], str]]:
    """Load every engine; one that cannot load is reported and left out of the run."""
    loaded, errors = [], {}
    for engine in plan.engines:
        say(f"loading {engine.name} ({plan.model}) ...")
        try:
            engine.load()
        except EngineUnavailable as error:  # not installed, bad option, model missing
            errors[(engine.name, "load")] = str(error)
            say(f"{engine.name} is unavailable, skipped: {error}")
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
    except Unsupported as error:  # the engine cannot express this workload's requests
        outcome.skipped.append((engine.name, workload.name))
        say(f"[{workload.name}] {engine.name}: unsupported, skipped ({error})")
        return None
    except Exception as error:  # noqa: BLE001 - one failing engine must not end the run
        tail = "".join(traceback.format_exception(error)[-3:]).strip()
        outcome.errors[(engine.name, workload.name)] = tail
        say(f"[{workload.name}] {engine.name} failed in {what}: {error!r}")
        return None


# --- the machine's state around a trial -----------------------------------------------


@dataclass(frozen=True)
class CpuCounters:
    """Seconds of CPU time since boot, summed over cores, from ``/proc/stat``."""

    busy: float  # user, nice, system, irq, softirq
    steal: float  # wanted to run, but the hypervisor ran another guest
    total: float

    @classmethod
    def read(cls, path: Path = Path("/proc/stat")) -> CpuCounters | None:
        """The counters now, or None where there is no ``/proc/stat`` (not Linux)."""
        try:
            fields = path.read_text().splitlines()[0].split()
        except OSError:
            return None
        # cpu user nice system idle iowait irq softirq steal [guest guest_nice]
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
        tick = os.sysconf("SC_CLK_TCK")
        busy = user + nice + system + irq + softirq
        return cls(busy / tick, steal / tick, (busy + idle + iowait + steal) / tick)


def trial_facts(
    wall_s: float, cpu_s: float, before: CpuCounters | None, after: CpuCounters | None
) -> dict[str, float | None]:
    """What a trial cost and what the machine did meanwhile.

    ``steal``: the share of all CPU time the hypervisor took for other guests;
    ``foreign_cores``: cores kept busy by other processes (everything busy, minus this
    process's CPU time), on average over the trial.
    """
    facts: dict[str, float | None] = {"wall_s": wall_s, "cpu_s": cpu_s, "steal": None,
                                      "foreign_cores": None}
    if before and after and after.total > before.total and wall_s > 0:
        facts["steal"] = (after.steal - before.steal) / (after.total - before.total)
        facts["foreign_cores"] = max(0.0, (after.busy - before.busy - cpu_s) / wall_s)
    return facts


# /proc/stat counts in ticks of 10 ms: over a shorter trial one tick more or less reads
# as a large share, so shorter trials are recorded but not judged.
MIN_JUDGED_S = 0.2


class LoadTracker:
    """The running median of other processes' load during a workload's trials."""

    def __init__(self) -> None:
        self.loads: list[float] = []

    def disturbance(self, facts: dict, plan: RunPlan) -> str | None:
        """Why the trial with ``facts`` was disturbed, or None; records its load."""
        steal, load = facts["steal"], facts["foreign_cores"]
        if facts["wall_s"] < MIN_JUDGED_S:
            return None
        if steal is not None and steal > plan.max_steal:
            return f"{steal:.0%} of CPU time stolen by the hypervisor"
        if load is None:
            return None
        typical = median(self.loads) if self.loads else load
        self.loads.append(load)
        if abs(load - typical) > plan.max_load_change:
            return f"other processes' load {load:.1f} cores, typically {typical:.1f}"
        return None


# Where the machine's counters come from (a test may script them).
read_counters: Callable[[], CpuCounters | None] = CpuCounters.read


def settle(limit_s: float, poll_s: float = 0.0005) -> None:
    """Wait (sleeping) until this process's other threads stop computing, at most
    ``limit_s``: an engine that decodes one step ahead (the reference, mlx-lm) still
    computes on its worker thread after its last token. (An engine whose threads spin
    while idle costs the whole ``limit_s``.)"""
    def others() -> float:
        return time.process_time() - time.thread_time()

    deadline, last = time.perf_counter() + limit_s, others()
    while time.perf_counter() < deadline:
        time.sleep(poll_s)
        now = others()
        if now - last < poll_s / 50:  # under 2% of a core: only bookkeeping left
            return
        last = now


class DecodeCpu:
    """``engine`` as the workload sees it, with this process's CPU time stamped at each
    event: ``seconds`` adds up, over the trial's generations, the CPU time from the
    first event to the end of the generation, once the engine's worker threads are
    quiet (``settle``): the decode phase, as ``decode_tps`` times it on the wall clock,
    with the step an engine computed ahead, whether it finished before or after the
    last token. The trial's ``cpu_s`` also holds prompt tokenization, request building
    and prefill, which an engine's decode change does not touch and which dilute it."""

    def __init__(self, engine: TimedEngine):
        self.engine = engine
        self.seconds = 0.0

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, request):
        return self._stamped(self.engine.generate(request))

    def stream_batch(self, request):
        return self._stamped(self.engine.stream_batch(request))

    def _stamped(self, events):
        first, count = 0.0, 0
        for item in events:
            yield item
            count += 1
            if count == 1:
                first = time.process_time()
        if count > 1:  # one event (a prefill) has no decode phase
            # Long enough for one more step on a busy machine (a step's CPU time, 4 times).
            step = (time.process_time() - first) / (count - 1)
            settle(limit_s=max(0.01, 4 * step))
            self.seconds += time.process_time() - first


def _timed(engine, workload, outcome, say, what) -> tuple[dict[str, float], dict] | None:
    """One measurement with its wall and CPU time and the machine's state around it."""
    stamped = DecodeCpu(engine)
    before, wall, cpu = read_counters(), time.perf_counter(), time.process_time()
    values = _attempt(stamped, workload, outcome, say, what)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if values is None:
        return None
    # CPU time of this process: an engine in another process (cmd:) is not counted.
    times = {"wall_s": wall, "cpu_s": cpu}
    if workload.kind != "prefill":  # one event per generation: no decode phase
        times["decode_cpu_s"] = stamped.seconds
    return {**values, **times}, trial_facts(wall, cpu, before, read_counters())


def _warm_up(plan: RunPlan, workload, active: list, outcome, say) -> None:
    """``warmup`` rounds, then more (up to ``max_warmup``) while the first metric moves."""
    last: dict[str, float] = {}
    rounds = plan.max_warmup if plan.max_warmup is not None else plan.warmup
    for round_ in range(rounds):
        moving = False
        for engine in list(active):
            values = _attempt(engine, workload, outcome, say, f"warm-up {round_ + 1}")
            if values is None:
                active.remove(engine)
                continue
            first = next(iter(values.values()))
            previous = last.get(engine.name)
            moving |= previous is None or abs(first / previous - 1) > plan.stable_within
            last[engine.name] = first
        if round_ + 1 >= plan.warmup and not moving:
            return


def _block(plan: RunPlan, workload, order: list, load: LoadTracker, outcome, say, trial: int):
    """One trial per engine in ``order``; the whole block again when one was disturbed.

    Returns ``[(engine, values, facts)]`` for the engines that did not fail.
    """
    for attempt in range(plan.max_repeats + 1):
        block, reasons = [], []
        for engine in order:
            measured = _timed(engine, workload, outcome, say, f"trial {trial}")
            if measured is None:
                continue  # the engine failed and is reported; the others go on
            values, facts = measured
            reason = load.disturbance(facts, plan)
            if reason:
                reasons.append(f"{engine.name}: {reason}")
            block.append((engine, values, {**facts, "repeats": attempt,
                                           "disturbed": reason}))
        if not reasons:
            return block
        if attempt < plan.max_repeats:
            say(f"[{workload.name}] block {trial} disturbed ({'; '.join(reasons)}); repeating")
        order = [engine for engine, _, _ in block]
    return block  # still disturbed after every repeat: kept, and marked as such


def _wants_more(plan: RunPlan, done: int, collected: dict[str, dict[int, float]],
                started: float) -> bool:
    """Whether another block is due: a fixed count, or (auto) until intervals are narrow."""
    if not plan.auto:
        return done < plan.trials
    if done < plan.min_trials:
        return True
    if done >= plan.max_trials or time.monotonic() - started > plan.auto_budget_s:
        return False
    return max(interval_widths(collected).values(), default=0.0) > plan.target_width


def interval_widths(collected: dict[str, dict[int, float]]) -> dict[str, float]:
    """Relative width of each engine's 95% interval: paired against the first engine
    (the comparison ``compare --ab`` makes), or of its median when it runs alone."""
    names = list(collected)
    if len(names) == 1:
        values = list(collected[names[0]].values())
        low, high = median_interval(values)
        return {names[0]: (high - low) / abs(median(values)) if values else float("inf")}
    base, widths = collected[names[0]], {}
    for name in names[1:]:
        trials = sorted(set(base) & set(collected[name]))
        if len(trials) < 2 or any(base[t] <= 0 or collected[name][t] <= 0 for t in trials):
            widths[name] = float("inf")
            continue
        interval = shift_interval([base[t] for t in trials],
                                     [collected[name][t] for t in trials], 0.05, paired=True)
        widths[name] = interval.high - interval.low
    return widths
