"""``lmconform check -j N``: the matrix run in N worker processes.

The work is cut into ``runner.Unit``s of one model's case group (``greedy/...``,
``combo/...``) on every engine, taken from one queue in the serial run's order.
Each worker is a fresh interpreter (``spawn``: MLX is not fork-safe) with its own
``MatrixSession``, which keeps the model's oracle and engines open from one unit to
the next, so a worker loads each model once; the reference's answers to a group
are computed once and shared by every engine, as in a serial run.

Workers send back, over one queue, each case's progress as it starts and ends and
each engine's ``EngineRun``; this process prints the progress and puts the results
in the serial run's order, so the verdicts and reports are a serial run's.

Stopping: workers ignore SIGINT (the terminal sends it to the whole process group);
this process is the one that stops. On ``Interrupted`` (SIGINT, SIGTERM) or any
error it sends each worker SIGTERM, on which a worker closes its engines and exits,
and kills those still alive after ``STOP_GRACE_S``. A worker also dies with this
process (Linux: a parent-death signal), so none outlives a killed suite.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import queue
import signal
import sys
import traceback
from collections.abc import Callable

from conformance.runner import (
    CaseResult,
    EngineRun,
    MatrixSession,
    ProgressCallback,
    Unit,
    plan_units,
)
from engines.deadline import Interrupted
from engines.models import DEFAULT_CASE_TIMEOUT_S

STOP_GRACE_S = 10.0  # a worker told to stop has this long to close its engines
POLL_S = 1.0  # how often a quiet queue is checked for workers that died


class WorkerDied(RuntimeError):
    """A worker process ended without finishing its units (killed, or crashed natively)."""


def run_matrix_parallel(
    jobs: int,
    engines: list[str],
    models: list[str],
    pattern: str | None = None,
    profile_name: str | None = None,
    timeout: float | None = DEFAULT_CASE_TIMEOUT_S,
    progress: ProgressCallback | None = None,
    on_skip: Callable[[str, str, str], None] | None = None,
    on_done: Callable[[str, str, dict, float], None] | None = None,
    against: str = "reference",
) -> list[CaseResult]:
    """``runner.run_matrix`` in ``jobs`` worker processes: the same results, in its order.

    ``on_skip`` is called once per (engine, model) that could not be used, and
    ``on_done`` once per finished column, with the seconds its parts took together.
    """
    units = plan_units(engines, models, pattern, by_group=True)
    context = multiprocessing.get_context("spawn")
    tasks, events = context.Queue(), context.Queue()
    for index, unit in enumerate(units):
        tasks.put((index, unit))
    workers = [
        context.Process(
            target=_work,
            args=(tasks, events, against, profile_name, timeout, _uses_mlx_blas()),
            name=f"lmconform-check-{number + 1}",
        )
        for number in range(max(1, min(jobs, len(units))))
    ]
    for _ in workers:
        tasks.put(None)  # one "no more units" for each worker
    for worker in workers:
        worker.start()
    columns = _Columns(units, on_skip, on_done)
    finished: set[int] = set()
    try:
        while len(finished) < len(units):
            event = _next_event(events, workers)
            kind = event[0]
            if kind == "progress" and progress:
                progress(*event[1:])
            elif kind == "run":
                columns.add(event[1])
            elif kind == "unit":
                finished.add(event[1])
            elif kind == "error":
                raise RuntimeError(f"a check worker failed:\n{event[1]}")
    finally:
        tasks.cancel_join_thread()  # units nobody will take must not hold up the exit
        _stop(workers, done=len(finished) == len(units))
    return columns.results(engines)


class _Columns:
    """Parts of each (engine, model) column as they finish: one ``on_skip`` per column,
    and ``on_done`` when its last part is in."""

    def __init__(self, units: list[Unit], on_skip, on_done):
        self.on_skip, self.on_done = on_skip, on_done
        self.order = {u.model: {case_id: i for i, case_id in enumerate(u.column)} for u in units}
        self.parts_left: dict[tuple[str, str], int] = {}
        for unit in units:
            for spec in unit.engines:
                key = (spec, unit.model)
                self.parts_left[key] = self.parts_left.get(key, 0) + 1
        self.skipped: set[tuple[str, str]] = set()
        self.seconds: dict[tuple[str, str], float] = {}
        self.description: dict[tuple[str, str], dict] = {}
        self.cases: dict[tuple[str, str], list[CaseResult]] = {}

    def results(self, engines: list[str]) -> list[CaseResult]:
        """Every result, in a serial run's order: by model, engine, then catalogue order."""
        return [
            result
            for model, order in self.order.items()
            for spec in engines
            for result in sorted(self.cases.get((spec, model), []), key=lambda r: order[r.case_id])
        ]

    def add(self, run: EngineRun) -> None:
        key = (run.engine, run.model)
        self.cases.setdefault(key, []).extend(run.results)
        self.parts_left[key] -= 1
        if run.skipped and key not in self.skipped:
            self.skipped.add(key)
            if self.on_skip:
                self.on_skip(run.engine, run.model, run.skipped)
        if run.description is not None:
            self.description.setdefault(key, run.description)
            self.seconds[key] = self.seconds.get(key, 0.0) + run.seconds
        if self.parts_left[key] == 0 and key in self.description and self.on_done:
            self.on_done(run.engine, run.model, self.description[key], self.seconds[key])


def _next_event(events, workers) -> tuple:
    """The next message from a worker; ``WorkerDied`` if one died without saying why."""
    while True:
        try:
            return events.get(timeout=POLL_S)
        except queue.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise WorkerDied(
                    f"check worker {dead[0].name} died (exit status {dead[0].exitcode})"
                ) from None


def _stop(workers, done: bool) -> None:
    """End the workers: when ``done`` they are closing their engines and leaving on their
    own, else SIGTERM tells them to; those not gone after the grace time are killed."""
    for worker in workers:
        if done:
            worker.join(STOP_GRACE_S)
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(STOP_GRACE_S)
        if worker.is_alive():
            worker.kill()
            worker.join()


def _uses_mlx_blas() -> bool:
    """Whether the reference in this process runs on MLX's own BLAS (see ``reference.blas``):
    its float32 sums then round differently from OpenBLAS's, so the workers must match."""
    blas = sys.modules.get("reference.blas")
    return blas is not None and not blas.install().optimized


def _work(
    tasks, events, against: str, profile_name: str | None, timeout: float | None, mlx_blas: bool
) -> None:
    """A worker: run units until told there are no more; report everything on ``events``."""
    from engines.adapters.line_process import _DIE_WITH_PARENT, stop_all

    if _DIE_WITH_PARENT is not None:
        _DIE_WITH_PARENT()
    if mlx_blas:
        os.environ["LMCONFORM_BLAS"] = "mlx"
    # The reference chooses its BLAS when first imported, before anything loads mlx.core
    # (the engine adapters import mlx.core first): import it now, as the command line does.
    try:
        importlib.import_module("reference")
    except ImportError:
        pass  # no MLX here, so no reference either: snapshots and other engines only
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def stop(signum, frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, stop)

    def progress(*args) -> None:
        events.put(("progress", *args))

    session = MatrixSession(against, profile_name, timeout, keep_engines=True)
    try:
        while (task := tasks.get()) is not None:
            index, unit = task
            for run in session.run(unit, progress):
                events.put(("run", run))
            events.put(("unit", index))
    except Interrupted:
        events.cancel_join_thread()  # nobody reads any more: exit without flushing
    except BaseException:  # noqa: BLE001 - the parent reports it as an internal error
        events.put(("error", traceback.format_exc()))
    finally:
        try:
            session.close()
        finally:
            stop_all()
