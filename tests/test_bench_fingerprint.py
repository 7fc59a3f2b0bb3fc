"""Machine fingerprint and code revision stored with each run."""

import os
import shutil
import subprocess
from dataclasses import replace

import pytest

from benchmarks import fingerprint, revision


def test_collect_describes_this_machine():
    found = fingerprint.collect({"reference": "1.0"})
    assert found.cores == os.cpu_count()
    assert found.memory_gb > 0
    assert found.cpu_model
    assert found.mlx_device.startswith("Device(")
    assert found.engine_versions == {"reference": "1.0"}
    assert fingerprint.Fingerprint.from_json(found.to_json()) == found


def test_machine_key_follows_hardware_not_software():
    base = fingerprint.collect()
    assert replace(base, python="9.9", mlx_version="9.9").machine_key == base.machine_key
    assert replace(base, engine_versions={"x": "2"}).machine_key == base.machine_key
    assert replace(base, cores=base.cores + 1).machine_key != base.machine_key
    assert replace(base, cpu_model="Other CPU").machine_key != base.machine_key
    assert replace(base, memory_gb=base.memory_gb * 2).machine_key != base.machine_key


def test_differences_lists_changed_fields():
    base = fingerprint.collect()
    assert base.differences(replace(base, python="9.9")) == {"python": (base.python, "9.9")}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_revision_reads_commit_and_dirty_flag(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    assert revision.current(tmp_path) == revision.Revision(None, True)  # nothing committed
    (tmp_path / "a.txt").write_text("one")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.strip()
    clean = revision.current(tmp_path)
    assert clean == revision.Revision(sha, False)
    assert clean.label == sha[:7]
    (tmp_path / "a.txt").write_text("two")
    edited = revision.current(tmp_path)
    assert edited == revision.Revision(sha, True)
    assert edited.label == sha[:7] + "+"


def test_revision_outside_git_is_uncommitted(tmp_path):
    assert revision.current(tmp_path / "nowhere") == revision.Revision(None, True)
