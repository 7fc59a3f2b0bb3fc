"""Comparing two stored runs (benchmarks/compare.py): matching, machines, verdicts."""

from dataclasses import replace

import pytest

from benchmarks.compare import DifferentMachines, compare_runs
from benchmarks.fingerprint import Fingerprint
from benchmarks.history import History
from benchmarks.revision import Revision
from benchmarks.stats import IMPROVED, REGRESSED, UNCHANGED

MACHINE = Fingerprint(
    cpu_model="Test CPU", cores=4, memory_gb=16.0, os="Linux 6", mlx_device="Device(cpu, 0)",
    python="3.11.7", mlx_version="0.32.4", engine_versions={"reference": "0.1.0"},
)


def add_run(store, machine, values: dict[tuple[str, str, str], list[float]]) -> int:
    run_id = store.start_run(Revision("a" * 40, False), machine, {})
    for (workload, engine, name), series in values.items():
        for trial, value in enumerate(series, 1):
            store.add_trial(run_id, trial, engine, "dummy", workload, {name: value}, {})
    store.finish_run(run_id)
    return run_id


STEADY = [100.0, 101.0, 99.0, 100.5, 99.5, 100.2, 99.8, 100.1]


@pytest.fixture
def store(tmp_path):
    with History(tmp_path / "h.sqlite") as history:
        yield history


def test_verdict_per_workload_engine_and_metric(store):
    base = add_run(store, MACHINE, {
        ("decode-64", "reference", "decode_tps"): STEADY,
        ("prefill-32", "reference", "ttft_s"): [v / 100 for v in STEADY],
        ("decode-64", "mlx-lm", "decode_tps"): STEADY,
    })
    head = add_run(store, MACHINE, {
        ("decode-64", "reference", "decode_tps"): [v * 0.8 for v in STEADY],   # slower
        ("prefill-32", "reference", "ttft_s"): [v / 125 for v in STEADY],      # faster
        ("decode-64", "mlx-lm", "decode_tps"): [v * 1.001 for v in STEADY],    # same
    })
    result = compare_runs(store, store.run(base), store.run(head))
    verdicts = {key: v.verdict for key, v in result.verdicts.items()}
    assert verdicts == {
        ("decode-64", "reference", "dummy", "decode_tps"): REGRESSED,
        ("prefill-32", "reference", "dummy", "ttft_s"): IMPROVED,
        ("decode-64", "mlx-lm", "dummy", "decode_tps"): UNCHANGED,
    }
    assert result.regressed
    rendered = result.table().text()
    assert "REGRESSED" in rendered and "-20.0%" in rendered


def test_measurements_in_only_one_run_are_listed_not_judged(store):
    base = add_run(store, MACHINE, {("decode-64", "reference", "decode_tps"): STEADY,
                                    ("batch-8", "reference", "batch_tps"): STEADY})
    head = add_run(store, MACHINE, {("decode-64", "reference", "decode_tps"): STEADY,
                                    ("batch-8", "mlx-lm", "batch_tps"): STEADY})
    result = compare_runs(store, store.run(base), store.run(head))
    assert list(result.verdicts) == [("decode-64", "reference", "dummy", "decode_tps")]
    assert result.only_base == [("batch-8", "reference", "dummy", "batch_tps")]
    assert result.only_head == [("batch-8", "mlx-lm", "dummy", "batch_tps")]
    assert not result.regressed


def test_different_hardware_is_refused_unless_allowed(store):
    other = replace(MACHINE, cpu_model="Another CPU", cores=64)
    base = add_run(store, MACHINE, {("decode-64", "reference", "decode_tps"): STEADY})
    head = add_run(store, other, {("decode-64", "reference", "decode_tps"): STEADY})
    with pytest.raises(DifferentMachines, match="cpu_model.*--allow-different-machines"):
        compare_runs(store, store.run(base), store.run(head))
    result = compare_runs(store, store.run(base), store.run(head),
                          allow_different_machines=True)
    assert len(result.verdicts) == 1


def test_software_version_changes_are_reported_but_allowed(store):
    upgraded = replace(MACHINE, mlx_version="0.99.0")
    base = add_run(store, MACHINE, {("decode-64", "reference", "decode_tps"): STEADY})
    head = add_run(store, upgraded, {("decode-64", "reference", "decode_tps"): STEADY})
    result = compare_runs(store, store.run(base), store.run(head))
    assert result.software_changes == {"mlx_version": ("0.32.4", "0.99.0")}


def test_minimum_effect_and_alpha_are_passed_through(store):
    base = add_run(store, MACHINE, {("d", "e", "decode_tps"): STEADY})
    head = add_run(store, MACHINE, {("d", "e", "decode_tps"): [v * 0.97 for v in STEADY]})
    default = compare_runs(store, store.run(base), store.run(head))  # 2% minimum effect
    lenient = compare_runs(store, store.run(base), store.run(head), min_effect=0.05)
    assert [v.verdict for v in default.verdicts.values()] == [REGRESSED]
    assert [v.verdict for v in lenient.verdicts.values()] == [UNCHANGED]
    # Fully separated samples of 8 a side: significant at 5%, but a 99.9999% interval
    # needs more samples than that (the rank statistic cannot reach that depth).
    strict = compare_runs(store, store.run(base), store.run(head), alpha=1e-6)
    (verdict,) = strict.verdicts.values()
    assert verdict.verdict == UNCHANGED and (verdict.low, verdict.high) == (-1, float("inf"))
    assert verdict.note == "too few samples for a 1 interval"


def test_relative_compare_cancels_a_machine_that_slowed_every_engine_alike(store):
    base = add_run(store, MACHINE, {("d", "reference", "decode_tps"): STEADY,
                                    ("d", "peer", "decode_tps"): [2 * v for v in STEADY]})
    # A busy neighbour: every engine 30% slower, trial by trial.
    busy = add_run(store, MACHINE, {("d", "reference", "decode_tps"): [0.7 * v for v in STEADY],
                                    ("d", "peer", "decode_tps"): [1.4 * v for v in STEADY]})
    absolute = compare_runs(store, store.run(base), store.run(busy))
    assert {v.verdict for v in absolute.verdicts.values()} == {REGRESSED}
    relative = compare_runs(store, store.run(base), store.run(busy), relative_to="reference")
    assert list(relative.verdicts) == [("d", "peer/reference", "dummy", "decode_tps")]
    (verdict,) = relative.verdicts.values()
    assert verdict.verdict == UNCHANGED and verdict.base_median == pytest.approx(2.0)


def test_relative_compare_sees_an_engine_that_slowed_alone(store):
    base = add_run(store, MACHINE, {("d", "reference", "decode_tps"): STEADY,
                                    ("d", "peer", "decode_tps"): STEADY})
    head = add_run(store, MACHINE, {("d", "reference", "decode_tps"): STEADY,
                                    ("d", "peer", "decode_tps"): [0.8 * v for v in STEADY]})
    relative = compare_runs(store, store.run(base), store.run(head), relative_to="reference")
    assert [v.verdict for v in relative.verdicts.values()] == [REGRESSED]
    with pytest.raises(ValueError, match="no samples of engine 'nobody'"):
        compare_runs(store, store.run(base), store.run(head), relative_to="nobody")
