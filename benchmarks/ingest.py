"""pytest-benchmark JSON into the history.

``pytest benchmarks/ --benchmark-json=out.json`` writes one entry per benchmark with
its raw round timings (``stats.data``), parameters and ``extra_info``. Each becomes
samples of one ingested run:

- workload: the test name without its parameter brackets, plus the parameters
  other than ``engine`` and ``model`` (``test_prefill[prompt_len=32]``);
- engine and model: the ``engine`` / ``model`` parameters when the test has them;
- metric ``time_s``: one sample per raw round (or the median alone, marked
  ``summary_only``, if the file was written without data);
- every numeric ``extra_info`` entry (our suites put tokens/s there): one sample;
  a list under ``NAME_samples`` gives one sample of ``NAME`` per element (our suites
  store every round that way, so ingested tokens/s can be rank-tested too).

The machine fingerprint is the one our suites' conftest adds to ``machine_info``
(key ``lmconform``); files from elsewhere get a fingerprint assembled from
pytest-benchmark's own machine info, which will not match our runs' hardware key
unless the same fields agree.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.fingerprint import Fingerprint
from benchmarks.history import History
from benchmarks.revision import Revision

SOURCE = "pytest-benchmark"


def _fingerprint(machine_info: dict) -> Fingerprint:
    if "lmconform" in machine_info:
        return Fingerprint(**machine_info["lmconform"])
    cpu = machine_info.get("cpu", {})
    return Fingerprint(
        cpu_model=cpu.get("brand_raw", machine_info.get("processor", "unknown")),
        cores=int(cpu.get("count", 0) or 0),
        memory_gb=0.0,
        os=f"{machine_info.get('system', '')} {machine_info.get('release', '')}".strip(),
        mlx_device="unknown",
        python=machine_info.get("python_version", "unknown"),
        mlx_version="unknown",
    )


def _workload(bench: dict) -> str:
    base = bench["name"].split("[", 1)[0]
    params = {k: v for k, v in (bench.get("params") or {}).items() if k not in ("engine", "model")}
    if not params:
        return base
    return base + "[" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + "]"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _extra_samples(extra_info: dict) -> dict[int, dict[str, float]]:
    """``extra_info`` as ``{trial: {metric: value}}``: scalars in trial 0, list items 1..n."""
    lists = {k.removesuffix("_samples"): v for k, v in extra_info.items()
             if k.endswith("_samples") and isinstance(v, list) and all(map(_is_number, v))}
    trials: dict[int, dict[str, float]] = {}
    scalars = {k: float(v) for k, v in extra_info.items() if _is_number(v) and k not in lists}
    if scalars:
        trials[0] = scalars
    for name, values in lists.items():
        for trial, value in enumerate(values, 1):
            trials.setdefault(trial, {})[name] = float(value)
    return trials


def ingest_file(history: History, path: str | Path) -> int:
    """Store one pytest-benchmark JSON file as a run; returns the new run id."""
    document = json.loads(Path(path).read_text())
    if "benchmarks" not in document or "machine_info" not in document:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' key)")
    commit = document.get("commit_info") or {}
    run_id = history.start_run(
        Revision(commit=commit.get("id"), dirty=bool(commit.get("dirty", True))),
        _fingerprint(document["machine_info"]),
        settings={
            "file": str(path),
            "pytest_benchmark_version": document.get("version"),
            "model": ",".join(sorted({str((b.get("params") or {}).get("model", "-"))
                                      for b in document["benchmarks"]})),
        },
        source=SOURCE,
        started_at=document.get("datetime"),
    )
    for bench in document["benchmarks"]:
        params = bench.get("params") or {}
        engine, model = str(params.get("engine", "pytest")), str(params.get("model", "-"))
        stats = bench["stats"]
        raw = stats.get("data")
        settings = {"fullname": bench.get("fullname"), "params": params,
                    "summary_only": raw is None}
        rounds = raw if raw is not None else [stats["median"]]
        workload = _workload(bench)
        for trial, seconds in enumerate(rounds, 1):
            history.add_trial(run_id, trial, engine, model, workload, {"time_s": seconds}, settings)
        for trial, extras in _extra_samples(bench.get("extra_info") or {}).items():
            history.add_trial(run_id, trial, engine, model, workload, extras, settings)
    history.finish_run(run_id)
    return run_id
