"""The export cache under concurrent use (pytest-xdist workers, ``check -j`` workers).

Two processes finding the cache stale at once must not both export and swap folders
under each other's readers: the second waits for the lock on the models folder, then
finds the first's export fresh and uses it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from engines import models


def _waiters_on(path) -> int:
    """How many lock requests on ``path`` are blocked (Linux lists them in /proc/locks)."""
    inode = os.stat(path).st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return sum("->" in line and line.split()[-3].endswith(f":{inode}") for line in lines)


def test_a_second_exporter_waits_for_the_first_and_uses_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCONFORM_HOME", str(tmp_path))
    folder = tmp_path / "models" / "dummy-draft"
    lock = folder.parent  # the models folder is the lock
    lock.mkdir(parents=True)
    got: list = []
    with models._exclusive(lock):  # "another process" is exporting
        second = threading.Thread(target=lambda: got.append(models.exported_folder("dummy-draft")))
        second.start()
        deadline = time.monotonic() + 60
        while not _waiters_on(lock):
            assert time.monotonic() < deadline and second.is_alive(), (
                "the second exporter did not wait for the lock"
            )
            time.sleep(0.01)
        # The first export finishes: a fresh folder, marked so that a re-export would show.
        folder.mkdir()
        (folder / "marker").write_text("the first export")
        stamp = {"model": "dummy-draft", "fingerprint": models.reference_fingerprint()}
        (folder / models.STAMP).write_text(json.dumps(stamp))
    second.join(timeout=60)
    assert got == [folder]
    assert (folder / "marker").read_text() == "the first export"
    assert [p.name for p in folder.parent.iterdir()] == ["dummy-draft"]  # nothing beside it

