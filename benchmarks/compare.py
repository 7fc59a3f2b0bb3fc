"""Comparing two runs from the history: a verdict per workload, engine and metric.

Only measurements present in both runs are compared (same workload, engine, model
and metric); anything else is listed as "only in base" or "only in head". Runs from
different hardware are refused, because a faster machine is not a faster engine;
software version differences (MLX, engines) are reported but allowed, since "was
the upgrade slower?" is a question this command should answer.

On a shared machine a whole run can be slower because a neighbour got busy; every
engine then "regresses" together. ``relative_to`` compares each engine's per-trial
ratio to a baseline engine instead, which the interleaved trials make immune to
such drift (it cannot see a change that slows the baseline engine itself, so use
both views).

Two engines of the *same* run (``compare_engines``, ``bench compare --ab A,B``) are
compared paired: trial k of A and trial k of B ran in the same block, moments
apart, so the interval is that of the per-block ratios.

Two runs with nothing in common cannot be compared: that is an input error
(``NothingInCommon``), never "0 regressed".
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from statistics import median

from benchmarks.fingerprint import HARDWARE_FIELDS
from benchmarks.history import History, Run, Sample
from benchmarks.report import Table
from benchmarks.stats import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_EFFECT,
    IMPROVED,
    REGRESSED,
    STEP_PENALTY,
    UNCHANGED,
    Step,
    Verdict,
    compare_samples,
    describe,
    detect_steps,
)
from benchmarks.workloads import metric

Key = tuple[str, str, str, str]  # (workload, engine, model, metric)
# Metrics whose worse direction reads "slower" (rates and times); others read "worse".
SPEED_UNITS = ("tok/s", "s", "x")


class DifferentMachines(Exception):
    """The two runs come from machines with different hardware fingerprints."""


class NothingInCommon(ValueError):
    """The two runs (or engines) share no measurement, so nothing can be judged."""


def meaning(key: Key, verdict: Verdict) -> str:
    """``describe`` for the metric of ``key`` (its direction and whether it is a speed)."""
    info = metric(key[3])
    speed = info.unit in SPEED_UNITS or key[3].endswith("_s")  # cpu_s, wall_s: seconds
    return describe(verdict, info.higher_is_better, speed=speed)


@dataclass
class Comparison:
    base: Run
    head: Run
    verdicts: dict[tuple[str, str, str, str], Verdict] = field(default_factory=dict)
    only_base: list[tuple[str, str, str, str]] = field(default_factory=list)
    only_head: list[tuple[str, str, str, str]] = field(default_factory=list)
    software_changes: dict[str, tuple[object, object]] = field(default_factory=dict)

    @property
    def regressed(self) -> bool:
        return any(v.verdict == REGRESSED for v in self.verdicts.values())

    def counts(self) -> dict[str, int]:
        return {name: sum(v.verdict == name for v in self.verdicts.values())
                for name in (IMPROVED, UNCHANGED, REGRESSED)}

    def table(self) -> Table:
        table = Table(["workload", "engine", "model", "metric", "base", "head", "change",
                       "95% CI", "p", "verdict", "what it means"])
        for key, v in self.verdicts.items():
            table.rows.append([
                *key,
                f"{v.base_median:.4g} (n={v.n_base})", f"{v.head_median:.4g} (n={v.n_head})",
                f"{v.change:+.1%}", f"{v.low:+.1%} to {v.high:+.1%}",
                "-" if v.p_value is None else f"{v.p_value:.3g}",
                v.verdict.upper() if v.verdict == REGRESSED else v.verdict,
                v.note or meaning(key, v),
            ])
        return table

    def to_dict(self) -> dict:
        """Everything as plain data (numbers unformatted) for ``--format json``."""
        return {
            "base": {"run": self.base.id, "commit": self.base.revision.commit},
            "head": {"run": self.head.id, "commit": self.head.revision.commit},
            "verdicts": [
                {"workload": k[0], "engine": k[1], "model": k[2], "metric": k[3],
                 "verdict": v.verdict, "change": v.change, "ci_low": v.low, "ci_high": v.high,
                 "confidence": v.confidence, "mde": v.mde, "p_value": v.p_value,
                 "paired": v.paired, "base_median": v.base_median,
                 "head_median": v.head_median, "n_base": v.n_base, "n_head": v.n_head,
                 "meaning": meaning(k, v), "note": v.note}
                for k, v in self.verdicts.items()
            ],
            "only_base": ["/".join(k) for k in self.only_base],
            "only_head": ["/".join(k) for k in self.only_head],
            "software_changes": {k: list(v) for k, v in self.software_changes.items()},
            "counts": self.counts(),
        }


def relative_samples(
    samples: list[Sample], baseline: str
) -> dict[tuple[str, str, str, str], list[float]]:
    """Per-trial ratios to ``baseline``: ``value(engine, trial) / value(baseline, trial)``.

    Engines run interleaved, so trial k of every engine saw the same state of the
    machine; dividing by the baseline engine's trial k cancels what the machine did
    (a busier neighbour slows every engine alike) and keeps what the code did.
    The key's engine reads ``engine/baseline``.
    """
    by_trial = {(s.workload, s.model, s.metric, s.trial): s.value
                for s in samples if s.engine == baseline}
    ratios: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for s in samples:
        reference = by_trial.get((s.workload, s.model, s.metric, s.trial))
        if s.engine != baseline and reference:
            ratios[(s.workload, f"{s.engine}/{baseline}", s.model, s.metric)].append(
                s.value / reference)
    return ratios


def compare_runs(
    history: History,
    base: Run,
    head: Run,
    alpha: float = DEFAULT_ALPHA,
    min_effect: float = DEFAULT_MIN_EFFECT,
    allow_different_machines: bool = False,
    relative_to: str | None = None,
) -> Comparison:
    """Verdicts for every measurement in both runs (with ``relative_to``: of the
    per-trial ratios of each engine to that engine, see ``relative_samples``)."""
    differences = base.fingerprint.differences(head.fingerprint)
    hardware = {k: v for k, v in differences.items() if k in HARDWARE_FIELDS}
    if hardware and not allow_different_machines:
        detail = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in hardware.items())
        raise DifferentMachines(
            f"{base.label} and {head.label} ran on different machines ({detail}); "
            "timings are not comparable (pass --allow-different-machines to compare anyway)"
        )
    values = []
    for run in (base, head):
        samples = history.samples([run.id])
        if relative_to is None:
            grouped: dict[tuple, list[float]] = defaultdict(list)
            for sample in samples:
                grouped[sample.key].append(sample.value)
        else:
            if not any(s.engine == relative_to for s in samples):
                raise ValueError(f"{run.label} has no samples of engine {relative_to!r}")
            grouped = relative_samples(samples, relative_to)
        values.append(grouped)
    base_values, head_values = values
    comparison = Comparison(
        base, head, software_changes={k: v for k, v in differences.items() if k not in hardware}
    )
    for key in base_values:
        if key not in head_values:
            comparison.only_base.append(key)
            continue
        # A ratio of a higher-is-better metric is itself higher-is-better.
        comparison.verdicts[key] = compare_samples(
            base_values[key], head_values[key], metric(key[3]).higher_is_better,
            alpha=alpha, min_effect=min_effect,
        )
    comparison.only_head = [key for key in head_values if key not in base_values]
    if not comparison.verdicts:
        raise NothingInCommon(
            f"{base.label} and {head.label} have no measurement in common "
            f"(base: {_engines(base_values)}; head: {_engines(head_values)}); nothing to compare"
        )
    return comparison


def _engines(values: dict[Key, list[float]]) -> str:
    names = sorted({key[1] for key in values})
    return "engines " + ", ".join(names) if names else "no samples"


def compare_engines(
    history: History,
    run: Run,
    base_engine: str,
    head_engine: str,
    alpha: float = DEFAULT_ALPHA,
    min_effect: float = DEFAULT_MIN_EFFECT,
) -> Comparison:
    """Verdicts for ``head_engine`` against ``base_engine`` within one run, paired by trial.

    Only trials both engines finished count (a trial one of them lost, say to a
    failure, has no partner). The key's engine reads ``head vs base``.
    """
    by_trial: dict[tuple[str, str, str], dict[str, dict[int, float]]] = defaultdict(
        lambda: defaultdict(dict))
    for s in history.samples([run.id]):
        if s.engine in (base_engine, head_engine):
            by_trial[(s.workload, s.model, s.metric)][s.engine][s.trial] = s.value
    comparison = Comparison(run, run)
    for (workload, model, name), engines in by_trial.items():
        trials = sorted(set(engines[base_engine]) & set(engines[head_engine]))
        if not trials:
            continue
        key = (workload, f"{head_engine} vs {base_engine}", model, name)
        comparison.verdicts[key] = compare_samples(
            [engines[base_engine][t] for t in trials], [engines[head_engine][t] for t in trials],
            metric(name).higher_is_better, alpha=alpha, min_effect=min_effect, paired=True,
        )
    if not comparison.verdicts:
        present = sorted({s.engine for s in history.samples([run.id])})
        raise NothingInCommon(
            f"{run.label} has no trial measured by both {base_engine!r} and {head_engine!r} "
            f"(engines in the run: {', '.join(present) or 'none'})"
        )
    return comparison


# --- change points over the whole history ---------------------------------------------


@dataclass(frozen=True)
class Change:
    """A step in one measurement's history: ``run`` is the first run at the new level."""

    key: Key
    machine_key: str
    run: Run
    previous: Run  # the last run at the old level
    step: Step
    points: int  # runs in the series

    @property
    def worse(self) -> bool:
        higher = metric(self.key[3]).higher_is_better
        return self.step.change < 0 if higher else self.step.change > 0

    def to_dict(self) -> dict:
        return {"workload": self.key[0], "engine": self.key[1], "model": self.key[2],
                "metric": self.key[3], "machine_key": self.machine_key,
                "run": self.run.id, "commit": self.run.revision.commit,
                "previous_run": self.previous.id, "previous_commit": self.previous.revision.commit,
                "before": self.step.before, "after": self.step.after,
                "change": self.step.change, "worse": self.worse, "runs_in_series": self.points}


def history_medians(history: History) -> dict[tuple[Key, str], list[tuple[Run, float]]]:
    """Per measurement and machine: ``(run, median of its samples)`` in run order.

    Machines are kept apart: a faster runner joining the history is not a step.
    """
    runs = {run.id: run for run in history.runs()}
    grouped: dict[tuple[Key, int], list[float]] = defaultdict(list)
    for sample in history.samples():
        grouped[(sample.key, sample.run_id)].append(sample.value)
    series: dict[tuple[Key, str], list[tuple[Run, float]]] = defaultdict(list)
    for (key, run_id), values in sorted(grouped.items(), key=lambda item: item[0][1]):
        run = runs[run_id]
        series[(key, run.fingerprint.machine_key)].append((run, median(values)))
    return dict(series)


def find_changes(
    history: History,
    metric_name: str | None = None,
    workload: str | None = None,
    min_change: float = 0.01,
    penalty: float = STEP_PENALTY,
) -> list[Change]:
    """Steps in every measurement's history (optionally one metric / workload).

    Each series is the run medians of one (workload, engine, model, metric) on one
    machine; ``detect_steps`` segments it. A step at the newest run is reported
    once a second run confirms the new level (one run alone is an outlier).
    """
    changes = []
    for (key, machine_key), points in history_medians(history).items():
        if (metric_name and key[3] != metric_name) or (workload and key[0] != workload):
            continue
        values = [value for _, value in points]
        if any(value <= 0 for value in values):
            continue  # a log scale needs positive values (rates, times, sizes are)
        for step in detect_steps(values, min_change=min_change, penalty=penalty):
            changes.append(Change(key, machine_key, points[step.index][0],
                                  points[step.index - 1][0], step, len(points)))
    return changes


def changes_table(changes: list[Change]) -> Table:
    table = Table(["workload", "engine", "model", "metric", "from run", "to run", "commit",
                   "before", "after", "change"])
    for c in changes:
        table.rows.append([
            *c.key, str(c.previous.id), str(c.run.id), c.run.revision.label,
            f"{c.step.before:.4g}", f"{c.step.after:.4g}",
            f"{c.step.change:+.1%}" + (" (worse)" if c.worse else " (better)"),
        ])
    return table
