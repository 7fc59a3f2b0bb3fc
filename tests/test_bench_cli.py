"""``lmconform bench`` end to end on the synthetic engine: run, show, compare, plot, ingest."""

import json
import re
from dataclasses import replace

import pytest

from benchmarks import cli as cli_bench
from benchmarks import fingerprint
from benchmarks.history import History
from benchmarks.revision import Revision
from lmconform import cli

FAST = "synthetic:step_ms=0.5:prefill_us=2"


@pytest.fixture
def db(tmp_path):
    return tmp_path / "history.sqlite"


def bench(*args) -> int:
    return cli_bench.main([str(a) for a in args])


def run_synthetic(db, *extra) -> int:
    return bench("--engines", FAST, "--model", "synthetic", "--workloads", "decode-16",
                 "--trials", 5, "--warmup", 1, "--no-bandwidth", "--db", db, *extra)


def test_run_prints_the_table_and_stores_every_trial(db, capsys, tmp_path):
    summary = tmp_path / "summary.md"
    assert run_synthetic(db, "--markdown", summary) == 0
    out = capsys.readouterr().out
    assert "decode-16" in out and "decode_tps" in out and "synthetic" in out
    with History(db) as store:
        samples = store.samples()
    assert len([s for s in samples if s.metric == "decode_tps"]) == 5
    assert summary.read_text().startswith("| engine |")


def test_the_lmconform_command_has_bench_registered(db):
    assert cli.main(["bench", "run", "--engines", FAST, "--model", "synthetic",
                     "--workloads", "prefill-16", "--trials", "1", "--warmup", "0",
                     "--no-bandwidth", "--db", str(db)]) == 0


def test_run_options_work_before_and_after_the_run_word(db):
    assert bench("--trials", 2, "run", "--engines", FAST, "--workloads", "prefill-16",
                 "--warmup", 0, "--no-bandwidth", "--db", db) == 0
    with History(db) as store:
        assert store.runs()[0].settings["trials"] == 2


def test_show_rebuilds_the_table_of_a_stored_run(db, capsys):
    run_synthetic(db)
    capsys.readouterr()
    assert bench("show", "--db", db) == 0
    out = capsys.readouterr().out
    assert "run 1" in out and "finished" in out and "decode_tps" in out


def test_compare_exits_nonzero_on_a_regression_and_zero_otherwise(db, capsys):
    # Steps long enough (16 x 3 ms) that a doubled decode stands out of a trial's fixed
    # costs in wall and CPU time also on a loaded machine (0.5 ms steps did not at load 8).
    engine = "synthetic:step_ms=3:prefill_us=2"
    for slowdown in ("", ":slowdown=1.0"):  # run 1; run 2: every decode step twice as long
        assert bench("--engines", engine + slowdown, "--model", "synthetic", "--workloads",
                     "decode-16", "--trials", 5, "--no-bandwidth", "--db", db) == 0
    capsys.readouterr()
    assert bench("compare", "--db", db) == 1  # previous vs latest
    out = capsys.readouterr().out
    # decode_tps, and with it the trial's wall time, CPU time and decode-phase CPU time;
    # peak memory unchanged.
    assert "REGRESSED" in out and "decode_tps" in out and "4 regressed" in out
    assert re.search(r"decode_tps .* REGRESSED +slower by", out)
    assert re.search(r" cpu_s .* REGRESSED", out) and re.search(r"wall_s .* REGRESSED", out)
    assert re.search(r"decode_cpu_s .* REGRESSED", out)
    assert bench("compare", 2, 1, "--db", db) == 0  # the other way round: improved
    assert "improved" in capsys.readouterr().out
    assert bench("compare", 1, 1, "--db", db) == 0


def test_compare_refuses_other_hardware_unless_told(db, capsys):
    machine = fingerprint.collect()
    with History(db) as store:
        for fp in (machine, replace(machine, cores=machine.cores + 64)):
            run_id = store.start_run(Revision(None, True), fp, {})
            store.add_trial(run_id, 1, "e", "m", "w", {"decode_tps": 1.0}, {})
    assert bench("compare", 1, 2, "--db", db) == 2
    assert "different machines" in capsys.readouterr().err
    assert bench("compare", 1, 2, "--allow-different-machines", "--db", db) == 0


def test_compare_names_what_is_missing(db, capsys):
    assert bench("compare", "--db", db) == 2
    assert "no history at" in capsys.readouterr().err
    History(db).close()  # a history without runs
    assert bench("compare", "--db", db) == 2
    assert "no runs yet" in capsys.readouterr().err


def test_plot_writes_a_png_and_a_markdown_summary(db, tmp_path, capsys):
    run_synthetic(db)
    run_synthetic(db)
    out = tmp_path / "plots" / "decode.png"
    assert bench("plot", "--metric", "decode_tps", "--out", out, "--db", db) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    summary = out.with_suffix(".md").read_text()
    assert "## decode_tps" in summary and "![decode_tps history](decode.png)" in summary
    assert "### decode-16" in summary and "| run | synthetic |" in summary
    assert "Latest run vs the one before" in summary
    assert bench("plot", "--metric", "no_such_metric", "--out", out, "--db", db) == 2


def pytest_benchmark_document(data=True) -> dict:
    stats = {"min": 0.01, "max": 0.03, "mean": 0.02, "median": 0.02, "rounds": 3}
    if data:
        stats["data"] = [0.01, 0.02, 0.03]
    return {
        "machine_info": {"node": "x", "cpu": {"brand_raw": "Some CPU", "count": 2},
                         "system": "Linux", "release": "6", "python_version": "3.11.7"},
        "commit_info": {"id": "abc" * 13 + "a", "dirty": False},
        "benchmarks": [{
            "name": "test_decode[reference-dummy]", "fullname": "benchmarks/test_decode.py::x",
            "params": {"engine": "reference", "model": "dummy"},
            "extra_info": {"decode_tps": 50.0, "decode_tps_samples": [49.0, 50.0, 51.0],
                           "workload": {"kind": "decode"}},
            "stats": stats,
        }],
        "datetime": "2025-01-01T00:00:00+00:00",
        "version": "5.3.1",
    }


def test_ingest_stores_raw_rounds_and_extra_info(db, tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(pytest_benchmark_document()))
    assert bench("ingest", path, "--db", db) == 0
    with History(db) as store:
        (run,) = store.runs()
        samples = store.samples()
    assert run.source == "pytest-benchmark" and run.revision.commit.startswith("abc")
    assert run.fingerprint.cpu_model == "Some CPU" and run.settings["model"] == "dummy"
    times = [s.value for s in samples if s.metric == "time_s"]
    assert times == [0.01, 0.02, 0.03]
    tps = sorted((s.trial, s.value) for s in samples if s.metric == "decode_tps")
    assert tps == [(1, 49.0), (2, 50.0), (3, 51.0)]  # the median itself is not a sample
    assert {(s.engine, s.model, s.workload) for s in samples} == {
        ("reference", "dummy", "test_decode")}


def test_ingest_without_raw_data_keeps_the_median_and_says_so(db, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(pytest_benchmark_document(data=False)))
    assert bench("ingest", path, "--db", db) == 0
    with History(db) as store:
        (time_sample,) = [s for s in store.samples() if s.metric == "time_s"]
    assert time_sample.value == 0.02 and time_sample.settings["summary_only"]


def test_ingest_rejects_files_that_are_not_pytest_benchmark_json(db, tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"hello": 1}))
    assert bench("ingest", path, "--db", db) == 2
    assert "not a pytest-benchmark JSON file" in capsys.readouterr().err


def test_bad_engine_and_workload_names_are_usage_errors(db, capsys):
    assert bench("--engines", "nonesuch", "--db", db) == 2
    assert "unknown engine 'nonesuch'" in capsys.readouterr().err
    assert bench("--engines", FAST, "--workloads", "decode-9999", "--db", db) == 2
    assert "unknown workload 'decode-9999'" in capsys.readouterr().err
    assert bench("--engines", "synthetic:bogus=1", "--db", db) == 2
    assert "has no option bogus" in capsys.readouterr().err


def test_compare_relative_to_a_baseline_engine(db, capsys):
    engines = f"{FAST}:name=a,{FAST}:name=b"
    for _ in range(2):
        assert bench("--engines", engines, "--workloads", "decode-16", "--trials", 5,
                     "--no-bandwidth", "--db", db) == 0
    capsys.readouterr()
    assert bench("compare", "--relative-to", "a", "--db", db) in (0, 1)
    out = capsys.readouterr().out
    assert "b/a" in out
    assert not re.search(r"decode-16\s+a\s", out)  # only the ratios are judged
    assert bench("compare", "--relative-to", "zzz", "--db", db) == 2
    assert "no samples of engine 'zzz'" in capsys.readouterr().err


def test_plot_marks_an_interrupted_run(db, tmp_path, capsys):
    run_synthetic(db)
    with History(db) as store:  # a run that never finished, as after a kill
        run_id = store.start_run(Revision(None, True), fingerprint.collect(), {})
        store.add_trial(run_id, 1, "synthetic", "synthetic", "decode-16",
                        {"decode_tps": 100.0}, {})
    out = tmp_path / "p.png"
    assert bench("plot", "--metric", "decode_tps", "--out", out, "--db", db) == 0
    assert "#2 interrupted" in out.with_suffix(".md").read_text()


def test_an_unknown_model_is_a_usage_error_before_any_engine_loads(db, capsys):
    with pytest.raises(SystemExit) as exit:
        bench("--engines", "reference", "--model", "no-such-model", "--db", db)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "unknown model 'no-such-model'" in err and not db.exists()


def test_ab_compare_within_one_run_reports_the_effect_with_its_interval(db, capsys):
    engines = f"{FAST}:name=a,{FAST}:slowdown=1.0:name=b"  # b's decode steps twice as long
    assert bench("--engines", engines, "--model", "synthetic", "--workloads", "decode-16",
                 "--trials", 12, "--no-bandwidth", "--db", db) == 0
    capsys.readouterr()
    assert bench("compare", "--ab", "a,b", "--db", db) == 1
    out = capsys.readouterr().out
    assert "runs: run 1" in out and "b vs a" in out and "slower by" in out
    assert bench("compare", "--ab", "a,b", "--format", "json", "--db", db) == 1
    document = json.loads(capsys.readouterr().out)
    (decode,) = [v for v in document["verdicts"] if v["metric"] == "decode_tps"]
    assert decode["verdict"] == "regressed" and decode["paired"]
    assert decode["ci_low"] <= decode["change"] <= decode["ci_high"] < 0
    assert document["counts"]["regressed"] >= 1
    assert bench("compare", "--ab", "a,b", "--format", "csv", "--db", db) == 1
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("workload,engine,model,metric,verdict,change,ci_low,ci_high")
    assert any(line.startswith("decode-16,b vs a,synthetic,decode_tps,regressed,")
               for line in lines)


def test_show_exports_json_and_csv_with_the_median_interval(db, capsys):
    run_synthetic(db)
    capsys.readouterr()
    assert bench("show", "--format", "json", "--db", db) == 0
    records = json.loads(capsys.readouterr().out)
    (decode,) = [r for r in records if r["metric"] == "decode_tps"]
    assert decode["n"] == 5 and len(decode["values"]) == 5
    assert decode["median"] == sorted(decode["values"])[2]
    assert decode["ci_low"] is None  # 5 samples cannot give a 95% interval for the median
    assert bench("show", "--format", "csv", "--db", db) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.split(",")[:5] == ["workload", "metric", "engine", "unit", "median"]


def test_the_plot_shades_each_runs_95_percent_interval_of_the_median(db):
    from benchmarks.plot import draw_history, history_series
    from benchmarks.stats import median_interval

    with History(db) as store:
        for values in ([100.0 + i for i in range(10)], [90.0, 91.0, 92.0]):
            run_id = store.start_run(Revision(None, False), fingerprint.collect(), {})
            for trial, value in enumerate(values, 1):
                store.add_trial(run_id, trial, "e", "m", "w", {"decode_tps": value}, {})
        series = history_series(store, "decode_tps")
    first, second = series["w"]["e"]
    assert (first.ci_low, first.ci_high) == median_interval([100.0 + i for i in range(10)])
    assert (second.ci_low, second.ci_high) == (90.0, 92.0)  # 3 samples: their range
    (axes,) = draw_history(series, "decode_tps").axes
    (band,) = axes.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == 90.0 and max(ys) == first.ci_high


def test_the_measurement_design_is_recorded_with_the_run(db):
    assert bench("--engines", f"{FAST}:name=a,{FAST}:name=b", "--model", "synthetic",
                 "--workloads", "prefill-16", "--trials", 3, "--warmup", 0, "--seed", 11,
                 "--max-repeats", 0, "--no-bandwidth", "--db", db) == 0
    assert bench("--engines", FAST, "--model", "synthetic", "--workloads", "prefill-16",
                 "--trials", 1, "--warmup", 0, "--no-bandwidth", "--db", db) == 0
    with History(db) as store:
        seeded, unseeded = store.runs()
        positions = sorted((s.trial, s.settings["trial"]["position"], s.engine)
                           for s in store.samples([seeded.id]) if s.metric == "prefill_tps")
    assert seeded.settings["order_seed"] == 11 and seeded.settings["max_repeats"] == 0
    assert isinstance(unseeded.settings["order_seed"], int)  # drawn, and kept for a re-run
    assert [p[:2] for p in positions] == [(t, p) for t in (1, 2, 3) for p in (0, 1)]
