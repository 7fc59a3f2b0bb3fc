"""Change points over the history (``bench show --changes``): penalised least-absolute-
deviation segmentation of each measurement's run medians (benchmarks/stats.py,
benchmarks/compare.py), on synthetic histories whose steps are known."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from benchmarks import cli as cli_bench
from benchmarks.compare import find_changes
from benchmarks.fingerprint import Fingerprint
from benchmarks.history import History
from benchmarks.revision import Revision
from benchmarks.stats import detect_steps, segment

MACHINE = Fingerprint(
    cpu_model="Test CPU", cores=4, memory_gb=16.0, os="Linux 6", mlx_device="Device(cpu, 0)",
    python="3.11.7", mlx_version="0.32.4", engine_versions={},
)


def commit(i: int) -> str:
    return f"{i:04x}" + "c" * 36


def write_history(path, levels: list[float], seed: int = 0, machine=MACHINE, noise=0.01,
                  start: int = 0) -> list[int]:
    """One run per level (commit ``commit(start + i)``), 5 decode_tps samples of 1% noise."""
    rng = np.random.default_rng(seed)
    ids = []
    with History(path) as store:
        for i, level in enumerate(levels):
            run_id = store.start_run(Revision(commit(start + i), False), machine, {})
            for trial, value in enumerate(level * np.exp(rng.normal(0, noise, 5)), 1):
                store.add_trial(run_id, trial, "reference", "dummy", "decode-16",
                                {"decode_tps": float(value)}, {})
            store.finish_run(run_id)
            ids.append(run_id)
    return ids


def test_a_five_percent_step_is_found_at_its_commit_and_an_outlier_is_not(tmp_path):
    levels = [100.0] * 17 + [95.0] * 13  # commit 17 made decoding 5% slower
    levels[6] = 125.0  # one disturbed run, not a change
    ids = write_history(tmp_path / "h.sqlite", levels)
    with History(tmp_path / "h.sqlite", read_only=True) as store:
        (change,) = find_changes(store)
    assert change.run.id == ids[17] and change.run.revision.commit == commit(17)
    assert change.previous.id == ids[16]
    assert change.step.change == pytest.approx(-0.05, abs=0.01)
    assert change.worse and change.key == ("decode-16", "reference", "dummy", "decode_tps")


@pytest.mark.parametrize("seed", range(5))
def test_steps_are_found_exactly_and_noise_alone_is_quiet(seed):
    rng = np.random.default_rng(seed)
    noise = list(100 * np.exp(rng.normal(0, 0.005, 40)))  # run medians: 0.5% noise
    assert detect_steps(noise) == []
    stepped = noise[:25] + [v * 1.05 for v in noise[25:]]
    (step,) = detect_steps(stepped)
    assert step.index == 25 and step.change == pytest.approx(0.05, abs=0.01)


def test_single_outliers_anywhere_are_never_steps():
    series = [100.0, 100.5, 99.5, 100.2, 99.8, 100.1, 99.9, 100.3]
    for where in range(len(series)):
        for size in (0.5, 1.5, 10.0):
            disturbed = series.copy()
            disturbed[where] *= size
            assert detect_steps(disturbed) == [], (where, size)


def test_segmentation_minimises_absolute_deviations_plus_penalty():
    # Two flat levels: one boundary costs the penalty and removes all deviations.
    values = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert segment(values, penalty=0.5) == [0, 3]
    # A penalty above the 3.0 of deviations one segment costs keeps a single segment.
    assert segment(values, penalty=3.5) == [0]


def test_machines_are_kept_apart(tmp_path):
    path = tmp_path / "h.sqlite"
    write_history(path, [100.0] * 10)
    faster = replace(MACHINE, cpu_model="Faster CPU")
    write_history(path, [150.0] * 10, seed=1, machine=faster, start=10)
    with History(path, read_only=True) as store:
        assert find_changes(store) == []  # each machine's own series is flat


def test_show_changes_prints_the_commit_and_exports_json(tmp_path, capsys):
    path = tmp_path / "h.sqlite"
    write_history(path, [100.0] * 8 + [90.0] * 8)
    assert cli_bench.main(["show", "--changes", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert commit(8)[:7] in out and re.search(r"-(9|10)\.\d% \(worse\)", out)
    assert cli_bench.main(["show", "--changes", "--format", "json", "--db", str(path)]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["commit"] == commit(8) and record["previous_commit"] == commit(7)
    assert cli_bench.main(["show", "--changes", "--min-change", "0.2", "--db", str(path)]) == 0
    assert "no step of 20% or more" in capsys.readouterr().out
