"""History plots: one metric over commits, one line per engine, as a PNG.

The PNG is meant to be dropped into a pull request, so it stands on its own: one
panel per workload that has the metric, the x axis lists runs in order (commit,
``+`` when the tree was dirty, "interrupted" for a killed run), each point is the
run's median, and a shaded band per engine is the 95% confidence interval of that
median (distribution-free, from order statistics; a run with too few samples for a
95% interval, under 6, shows the range of its samples instead). Two runs whose bands
do not overlap differ by more than noise. The Markdown summary has the same numbers
as a table, plus each engine's change from the previous run to the latest.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import median, quantiles

from benchmarks.history import History
from benchmarks.report import Table, fmt
from benchmarks.stats import median_interval
from benchmarks.workloads import metric as metric_info


@dataclass(frozen=True)
class Point:
    run_id: int
    label: str
    model: str
    median: float
    q1: float
    q3: float
    n: int
    ci_low: float  # the median's 95% interval (the samples' range when n is too small)
    ci_high: float


def history_series(
    history: History, metric: str, workload: str | None = None, model: str | None = None
) -> dict[str, dict[str, list[Point]]]:
    """``{workload: {engine: [Point per run, in run order]}}`` for ``metric``.

    When the history holds several models (and ``model`` does not pick one), the
    engine keys read ``engine [model]``.
    """
    runs = {run.id: run for run in history.runs()}
    grouped: dict[tuple[str, str, str, int], list[float]] = defaultdict(list)
    for s in history.samples():
        if s.metric != metric or (workload and s.workload != workload):
            continue
        if model and s.model != model:
            continue
        grouped[(s.workload, s.engine, s.model, s.run_id)].append(s.value)
    # With several models in the history, each (engine, model) pair is its own line.
    several_models = len({key[2] for key in grouped}) > 1
    series: dict[str, dict[str, list[Point]]] = defaultdict(lambda: defaultdict(list))
    for (workload_, engine, model_, run_id), values in sorted(grouped.items(),
                                                              key=lambda kv: kv[0][3]):
        line = f"{engine} [{model_}]" if several_models else engine
        q1, _, q3 = quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        run = runs[run_id]
        label = f"{run.revision.label}\n#{run_id}" + ("\ninterrupted" if run.interrupted else "")
        low, high = median_interval(values)
        if low == float("-inf"):  # too few samples for a 95% interval: their range
            low, high = min(values), max(values)
        series[workload_][line].append(
            Point(run_id, label, model_, median(values), q1, q3, len(values), low, high))
    return {w: dict(e) for w, e in series.items()}


def plot_history(series: dict[str, dict[str, list[Point]]], metric: str, out: str | Path) -> Path:
    """Draw ``series`` (from ``history_series``) into the PNG file ``out``."""
    figure = draw_history(series, metric)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out


def draw_history(series: dict[str, dict[str, list[Point]]], metric: str):
    """The figure of ``plot_history``: a panel per workload, a line and band per engine."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    if not series:
        raise ValueError(f"no samples of metric {metric!r} in the history")
    info = metric_info(metric)
    run_labels: dict[int, str] = {}
    for engines in series.values():
        for points in engines.values():
            run_labels.update({p.run_id: p.label for p in points})
    order = sorted(run_labels)
    position = {run_id: i for i, run_id in enumerate(order)}

    figure = Figure(figsize=(max(6.0, 0.9 * len(order) + 3), 3.2 * len(series)), dpi=110)
    axes = figure.subplots(len(series), 1, squeeze=False)[:, 0]
    for ax, (workload, engines) in zip(axes, sorted(series.items())):
        for engine, points in sorted(engines.items()):
            xs = [position[p.run_id] for p in points]
            (line,) = ax.plot(xs, [p.median for p in points], marker="o", label=engine)
            ax.fill_between(xs, [p.ci_low for p in points], [p.ci_high for p in points],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        models = sorted({p.model for points in engines.values() for p in points})
        ax.set_title(f"{workload}: {metric} ({', '.join(models)}); bands: 95% CI of the median")
        ax.set_ylabel(f"{info.unit} ({'higher' if info.higher_is_better else 'lower'} is better)")
        ax.set_xticks(range(len(order)), [run_labels[r] for r in order], fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def markdown_summary(
    series: dict[str, dict[str, list[Point]]], metric: str, image: str | None = None
) -> str:
    """The plotted numbers as Markdown: per workload, runs by engines, then the last change."""
    info = metric_info(metric)
    parts = [(f"## {metric} ({info.unit}, {'higher' if info.higher_is_better else 'lower'}"
             " is better)")]
    if image:
        parts.append(f"![{metric} history]({image})")
    for workload, engines in sorted(series.items()):
        names = sorted(engines)
        runs: dict[int, str] = {}
        for points in engines.values():
            runs.update({p.run_id: p.label.replace("\n", " ") for p in points})
        table = Table(["run"] + names)  # cells: median [95% interval] (n)
        for run_id in sorted(runs):
            cells = []
            for engine in names:
                point = next((p for p in engines[engine] if p.run_id == run_id), None)
                cells.append(f"{fmt(point.median)} [{fmt(point.ci_low)}, {fmt(point.ci_high)}] "
                             f"(n={point.n})" if point else "-")
            table.rows.append([runs[run_id], *cells])
        parts += [f"### {workload}", table.markdown()]
        changes = []
        for engine in names:
            points = engines[engine]
            if len(points) >= 2 and points[-2].median:
                change = points[-1].median / points[-2].median - 1
                changes.append(f"{engine} {change:+.1%}")
        if changes:
            parts.append("Latest run vs the one before: " + ", ".join(changes) + ".")
    return "\n\n".join(parts) + "\n"
