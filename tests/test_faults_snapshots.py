"""Faults in snapshot folders: every bad file is an input error naming it, before any case runs.

Each test copies the committed golden snapshots of ``dummy``, damages one thing, and checks
that reading the folder fails with a message naming the file and the field, and that
``lmconform check --against`` exits 2 without running a case or writing a report.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil

import pytest

from conformance.snapshots.oracle import SnapshotOracle
from conformance.snapshots.store import GOLDEN_DIR, SnapshotError
from lmconform.cli import main


@pytest.fixture
def folder(tmp_path):
    shutil.copytree(GOLDEN_DIR / "dummy", tmp_path / "snaps" / "dummy")
    return tmp_path / "snaps"


def edit_group(folder, group, change):
    path = folder / "dummy" / f"{group}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def first_step(data):
    case = next(iter(data["cases"].values()))
    return case["answers"][0]["steps"][0]


def last_step(data):
    case = next(iter(data["cases"].values()))
    return case["answers"][0]["steps"][-1]


def setter(where, key, value):
    return lambda data: where(data).__setitem__(key, value)


DAMAGES = {
    "token beyond the vocabulary": (setter(first_step, "token", 260), "token id 260 is outside"),
    "negative token": (setter(first_step, "token", -3), "token: expected a token id"),
    "token as text": (setter(first_step, "token", "12"), "token: expected a token id"),
    "NaN logprob": (setter(first_step, "logprob", "nan"), "logprob: expected a log-probability"),
    "positive logprob": (setter(first_step, "logprob", 0.5), "logprob: expected a log-prob"),
    "top entry not a pair": (setter(first_step, "top", [[1]]), r"top\[0\]: expected"),
    "top logprob NaN": (setter(first_step, "top", [[1, "nan"]]), "is not a log-probability"),
    "unknown finish reason": (setter(last_step, "finish_reason", "banana"), "finish_reason"),
    "finish reason missing": (
        lambda d: last_step(d).pop("finish_reason"),
        "missing on the last step",
    ),
    "from_draft not a bool": (setter(first_step, "from_draft", "yes"), "from_draft"),
    "cases not an object": (lambda d: d.__setitem__("cases", []), "cases: expected an object"),
    "model of another place": (lambda d: d.__setitem__("model", "other"), "its place says"),
    "wrong format": (lambda d: d.__setitem__("format", "v0"), "format 'v0'"),
    "answers not a list": (
        lambda d: next(iter(d["cases"].values())).__setitem__("answers", {}),
        "answers: expected a list",
    ),
    "encode ids not ids": (
        lambda d: next(iter(d["cases"].values())).__setitem__("inputs", {"encode": {"hi": ["a"]}}),
        "expected a list of token ids",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_group_file_is_refused_naming_file_and_field(folder, damage):
    change, message = DAMAGES[damage]
    path = edit_group(folder, "greedy", change)
    with pytest.raises(SnapshotError, match=message) as raised:
        SnapshotOracle("dummy", folder)
    assert str(path) in str(raised.value)


def test_the_undamaged_copy_reads_whole(folder):
    """The control: the damages above are what is refused, not the copying."""
    oracle = SnapshotOracle("dummy", folder)
    assert len(oracle.cases) == len(SnapshotOracle("dummy").cases) > 30


def test_a_file_that_is_not_json_is_refused(folder):
    (folder / "dummy" / "stream.json").write_text("{ not json")
    with pytest.raises(SnapshotError, match=r"stream.json: not JSON"):
        SnapshotOracle("dummy", folder)


def test_the_same_case_in_two_files_is_a_conflict_not_last_file_wins(folder):
    data = json.loads((folder / "dummy" / "greedy.json").read_text())
    data["group"] = "greedy_copy"
    (folder / "dummy" / "greedy_copy.json").write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match="conflicting snapshots: case greedy/"):
        SnapshotOracle("dummy", folder)


def test_two_answers_to_one_request_that_differ_are_a_conflict(folder):
    data = json.loads((folder / "dummy" / "greedy.json").read_text())
    case_id, case = next(iter(data["cases"].items()))
    case["answers"][0]["steps"][0]["logprob"] -= 0.5  # same request key, another answer
    data["group"] = "other"
    data["cases"] = {"other/" + case_id: case}
    (folder / "dummy" / "other.json").write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match="conflicting snapshots: answer") as raised:
        SnapshotOracle("dummy", folder)
    assert "other.json" in str(raised.value) and "greedy.json" in str(raised.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"plain bytes", "not a gzipped JSON vocabulary"),
        (gzip.compress(b"[1, 2]"), "expected a JSON object"),
        (
            gzip.compress(
                json.dumps(
                    {"model": "dummy", "vocab_size": 0, "end_tokens": [], "tokens": [], "added": {}}
                ).encode()
            ),
            "vocab_size: expected a positive integer",
        ),
    ],
    ids=["not-gzip", "not-an-object", "vocab-size-0"],  # gzip bytes carry a timestamp
)
def test_a_damaged_vocabulary_is_refused(folder, content, message):
    path = folder / "dummy" / "vocabulary.json.gz"
    path.write_bytes(content)
    with pytest.raises(SnapshotError, match=message) as raised:
        SnapshotOracle("dummy", folder)
    assert str(path) in str(raised.value)


def run_check(against, tmp_path, capsys):
    report = tmp_path / "out.json"
    rc = main(
        [
            "check",
            "--engine",
            "mutants:Control",
            "--model",
            "dummy",
            "--cases",
            "greedy/hello",
            "--against",
            str(against),
            "--json",
            str(report),
        ]
    )
    out, err = capsys.readouterr()
    return rc, out, err, report


def test_check_against_a_folder_with_a_bad_file_exits_2_before_any_case(folder, tmp_path, capsys):
    path = edit_group(folder, "stopping", setter(first_step, "token", 999))
    rc, out, err, report = run_check(folder, tmp_path, capsys)
    assert rc == 2
    assert str(path) in err and "token id 999 is outside the vocabulary" in err
    assert out == "" and not report.exists()  # nothing ran, nothing was reported


@pytest.mark.parametrize("kind", ["empty", "missing", "only a vocabulary"])
def test_check_against_an_unusable_folder_exits_2(tmp_path, capsys, kind):
    against = tmp_path / "snaps"
    if kind != "missing":
        against.mkdir()
    if kind == "only a vocabulary":
        (against / "dummy").mkdir()
        shutil.copy(GOLDEN_DIR / "dummy" / "vocabulary.json.gz", against / "dummy")
    rc, out, err, report = run_check(against, tmp_path, capsys)
    assert rc == 2 and out == "" and not report.exists()
    assert f"--against {against}" in err or f"--against '{against}'" in err


def test_check_against_a_sound_copy_passes(folder, tmp_path, capsys):
    rc, out, _, report = run_check(folder, tmp_path, capsys)
    assert rc == 0 and re.search(r"total pass +1\b", out)
    assert json.loads(report.read_text())["totals"]["pass"] == 1
