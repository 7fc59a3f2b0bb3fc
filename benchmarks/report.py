"""The results table of one run, built from the history (not from memory).

Reading the table back from the database means the printed numbers are exactly
the stored ones, and ``lmconform bench show RUN`` can rebuild it any time later.

Per workload, metric and engine: median, spread (interquartile range relative to
the median), sample count, ratio to the reference engine, and for decode rates
the percentage of the memory-bandwidth roofline.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from statistics import median, quantiles

from benchmarks import roofline
from benchmarks.history import Sample
from benchmarks.stats import median_interval
from benchmarks.workloads import metric

FORMATS = ("table", "json", "csv")

REFERENCE = "reference"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def text(self) -> str:
        everything = [self.headers, *self.rows]
        widths = [max(len(row[i]) for row in everything) for i in range(len(self.headers))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(self.headers, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in self.rows]
        return "\n".join(lines)

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows([self.headers, *self.rows])
        return buffer.getvalue()

    def records(self) -> list[dict[str, str]]:
        return [dict(zip(self.headers, row)) for row in self.rows]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def iqr_percent(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = quantiles(values, n=4, method="inclusive")
    middle = median(values)
    return 100.0 * (q3 - q1) / middle if middle else 0.0


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


@dataclass
class RunSummary:
    """Medians and friends of one run, keyed by (workload, metric, engine)."""

    values: dict[tuple[str, str, str], list[float]]
    bytes_per_token: dict[str, int]
    batch_size: dict[str, int]
    bandwidth: float | None  # bytes/s
    engines: list[str]
    workloads: list[str]

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> RunSummary:
        values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        bytes_per_token: dict[str, int] = {}
        batch_size: dict[str, int] = {}
        bandwidths, engines, workloads = [], [], []
        for s in samples:
            if s.metric == "bandwidth_gbs":
                bandwidths.append(s.value * 1e9)
                continue
            values[(s.workload, s.metric, s.engine)].append(s.value)
            per_token = s.settings.get("engine", {}).get("weight_bytes_per_token")
            if per_token:
                bytes_per_token[s.engine] = per_token
            batch_size[s.workload] = s.settings.get("workload", {}).get("batch_size", 1)
            engines += [s.engine] if s.engine not in engines else []
            workloads += [s.workload] if s.workload not in workloads else []
        bandwidth = median(bandwidths) if bandwidths else None
        return cls(dict(values), bytes_per_token, batch_size, bandwidth, engines, workloads)

    def median(self, workload: str, name: str, engine: str) -> float | None:
        samples = self.values.get((workload, name, engine))
        return median(samples) if samples else None

    def roofline_percent(self, workload: str, name: str, engine: str) -> float | None:
        """Decode rate as a share of bandwidth / weight bytes (times the batch size)."""
        if name not in ("decode_tps", "batch_tps") or not self.bandwidth:
            return None
        rate, per_token = self.median(workload, name, engine), self.bytes_per_token.get(engine)
        if rate is None or not per_token:
            return None
        # One batched step reads the weights once for all sequences in the batch.
        bound = self.batch_size.get(workload, 1) * roofline.roofline_tps(self.bandwidth, per_token)
        return 100.0 * rate / bound

    def baseline(self) -> str | None:
        if not self.engines:
            return None
        return REFERENCE if REFERENCE in self.engines else self.engines[0]


def json_number(value: float | None) -> float | None:
    """``value`` for JSON: infinities and NaN (unbounded intervals) become null."""
    return value if value is not None and math.isfinite(value) else None


def results_records(samples: list[Sample]) -> list[dict]:
    """The long table as plain data: one dict per workload, metric and engine (numbers
    unformatted; the median's 95% interval; every raw value)."""
    summary = RunSummary.from_samples(samples)
    base = summary.baseline()
    records = []
    for workload, name, engine in _ordered_keys(summary):
        values = summary.values[(workload, name, engine)]
        middle, base_value = median(values), summary.median(workload, name, base)
        low, high = median_interval(values)
        records.append({
            "workload": workload, "metric": name, "engine": engine, "unit": metric(name).unit,
            "median": middle, "ci_low": json_number(low), "ci_high": json_number(high),
            "iqr_percent": iqr_percent(values), "n": len(values),
            "ratio_to": base, "ratio": middle / base_value if base_value else None,
            "roofline_percent": summary.roofline_percent(workload, name, engine),
            "values": values,
        })
    return records


def _ordered_keys(summary: RunSummary) -> list[tuple[str, str, str]]:
    metric_order = {name: i for i, name in enumerate(
        ["prefill_tps", "ttft_s", "decode_tps", "batch_tps", "spec_decode_tps",
         "spec_speedup", "draft_acceptance", "peak_memory_mb"])}
    return sorted(summary.values, key=lambda k: (
        summary.workloads.index(k[0]), metric_order.get(k[1], 99), summary.engines.index(k[2])))


def results_table(samples: list[Sample]) -> Table:
    """The long table: one row per workload, metric and engine."""
    summary = RunSummary.from_samples(samples)
    base = summary.baseline()
    table = Table(["workload", "metric", "engine", "median", "unit", "IQR %", "n",
                   f"vs {base or '-'}", "% roofline"])
    for workload, name, engine in _ordered_keys(summary):
        samples_ = summary.values[(workload, name, engine)]
        middle = median(samples_)
        base_value = summary.median(workload, name, base)
        ratio = f"{middle / base_value:.2f}x" if base_value else "-"
        share = summary.roofline_percent(workload, name, engine)
        table.rows.append([
            workload, name, engine, fmt(middle), metric(name).unit,
            f"{iqr_percent(samples_):.1f}", str(len(samples_)), ratio,
            f"{share:.1f}" if share is not None else "-",
        ])
    return table


def summary_table(samples: list[Sample]) -> Table:
    """The compact table for a README: engines as rows, one column per measurement."""
    summary = RunSummary.from_samples(samples)
    columns = []  # (workload, metric)
    for workload in summary.workloads:
        for name in ("prefill_tps", "ttft_s", "decode_tps", "batch_tps", "spec_speedup",
                     "peak_memory_mb"):
            if any((workload, name, e) in summary.values for e in summary.engines):
                columns.append((workload, name))
    decode_columns = [c for c in columns if c[1] == "decode_tps"]
    headers = ["engine"] + [f"{w} {metric(n).unit if n != 'ttft_s' else 'TTFT s'}"
                            .replace("MB", "peak MB") for w, n in columns]
    headers += [f"{w} % roofline" for w, _ in decode_columns]
    table = Table(headers)
    for engine in summary.engines:
        row = [engine]
        for workload, name in columns:
            value = summary.median(workload, name, engine)
            row.append(fmt(value) if value is not None else "-")
        for workload, name in decode_columns:
            share = summary.roofline_percent(workload, name, engine)
            row.append(f"{share:.1f}" if share is not None else "-")
        table.rows.append(row)
    return table


def roofline_note(samples: list[Sample]) -> str:
    summary = RunSummary.from_samples(samples)
    if not summary.bandwidth:
        return "no bandwidth measurement in this run"
    parts = [f"memory read bandwidth {summary.bandwidth / 1e9:.1f} GB/s"]
    for engine, per_token in summary.bytes_per_token.items():
        bound = roofline.roofline_tps(summary.bandwidth, per_token)
        parts.append(f"{engine}: {per_token / 1e6:.1f} MB/token -> roofline {bound:.0f} tok/s")
    return "; ".join(parts)


def json_ready(value):
    """``value`` with every infinite or NaN float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def render(records: list[dict], fmt_name: str) -> str:
    """Records (dicts with the same keys) as JSON or CSV; lists inside are JSON-encoded."""
    if fmt_name == "json":
        return json.dumps(json_ready(records), indent=2)
    if not records:
        return ""
    table = Table(list(records[0]))
    for record in records:
        table.rows.append(["" if v is None else json.dumps(v) if isinstance(v, list) else str(v)
                           for v in json_ready(list(record.values()))])
    return table.csv()
