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
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from benchmarks.fingerprint import HARDWARE_FIELDS
from benchmarks.history import History, Run, Sample
from benchmarks.report import Table
from benchmarks.stats import DEFAULT_ALPHA, DEFAULT_MIN_EFFECT, REGRESSED, Verdict, compare_samples
from benchmarks.workloads import metric


class DifferentMachines(Exception):
    """The two runs come from machines with different hardware fingerprints."""


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

    def table(self) -> Table:
        table = Table(["workload", "engine", "model", "metric", "base", "head", "change",
                       "p", "verdict", "note"])
        for (workload, engine, model, name), v in self.verdicts.items():
            table.rows.append([
                workload, engine, model, name,
                f"{v.base_median:.4g} (n={v.n_base})", f"{v.head_median:.4g} (n={v.n_head})",
                f"{v.change:+.1%}", "-" if v.p_value is None else f"{v.p_value:.3g}",
                v.verdict.upper() if v.verdict == REGRESSED else v.verdict, v.note,
            ])
        return table


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
    return comparison
