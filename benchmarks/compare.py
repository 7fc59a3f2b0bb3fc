"""Comparing two runs from the history: a verdict per workload, engine and metric.

Only measurements present in both runs are compared (same workload, engine, model
and metric); anything else is listed as "only in base" or "only in head". Runs from
different hardware are refused, because a faster machine is not a faster engine;
software version differences (MLX, engines) are reported but allowed, since "was
the upgrade slower?" is a question this command should answer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .fingerprint import HARDWARE_FIELDS
from .history import History, Run
from .report import Table
from .stats import DEFAULT_ALPHA, DEFAULT_MIN_EFFECT, REGRESSED, Verdict, compare_samples
from .workloads import metric


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


def compare_runs(
    history: History,
    base: Run,
    head: Run,
    alpha: float = DEFAULT_ALPHA,
    min_effect: float = DEFAULT_MIN_EFFECT,
    allow_different_machines: bool = False,
) -> Comparison:
    differences = base.fingerprint.differences(head.fingerprint)
    hardware = {k: v for k, v in differences.items() if k in HARDWARE_FIELDS}
    if hardware and not allow_different_machines:
        detail = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in hardware.items())
        raise DifferentMachines(
            f"{base.label} and {head.label} ran on different machines ({detail}); "
            "timings are not comparable (pass --allow-different-machines to compare anyway)"
        )
    grouped: dict[int, dict[tuple, list[float]]] = {base.id: defaultdict(list),
                                                    head.id: defaultdict(list)}
    for sample in history.samples([base.id, head.id]):
        grouped[sample.run_id][sample.key].append(sample.value)
    base_values, head_values = grouped[base.id], grouped[head.id]
    comparison = Comparison(
        base, head, software_changes={k: v for k, v in differences.items() if k not in hardware}
    )
    for key in base_values:
        if key not in head_values:
            comparison.only_base.append(key)
            continue
        comparison.verdicts[key] = compare_samples(
            base_values[key], head_values[key], metric(key[3]).higher_is_better,
            alpha=alpha, min_effect=min_effect,
        )
    comparison.only_head = [key for key in head_values if key not in base_values]
    return comparison
