"""syrupy glue: golden snapshot files compared with the tie-aware comparison, not as text.

``GoldenSnapshotExtension`` stores one snapshot per case group at
``<folder>/<model>/<group>.json`` (``folder`` is the packaged
``conformance/golden``), in the format of ``snapshots.py``. Its
``matches()`` does not compare text: it reads both sides and applies
``compare.compare_groups`` (exact tokens, logprobs within the
precision profile's tolerance, near-ties accepted and reported as warnings),
so another machine's last-digit float differences pass and a changed token
fails, with a diff that says which case, which answer, which step.

Tests using it are parametrized with ``model`` and ``group`` (that is how
the extension knows which file a test owns), and assert a ``GroupSnapshot``::

    @pytest.mark.parametrize("model, group", [("dummy", "greedy")])
    def test_golden(model, group, snapshot):
        assert snapshot.use_extension(GoldenSnapshotExtension) == record_group(...)

``pytest --snapshot-update`` rewrites the files of the groups that changed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from syrupy.data import SnapshotCollections
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from conformance.catalogue import load_cases, select_cases
from conformance.snapshots.compare import compare_groups
from conformance.snapshots.oracle import SnapshotVocabulary
from conformance.snapshots.store import (
    GOLDEN_DIR,
    GROUP_SUFFIX,
    GroupSnapshot,
    SnapshotError,
    group_from_json,
    group_to_json,
    read_vocabulary,
)


class GoldenNearTie(UserWarning):
    """A snapshot matched, but one of its answers now takes the other branch of a near-tie."""


class GoldenSnapshotExtension(SingleFileSnapshotExtension):
    folder: Path = GOLDEN_DIR
    file_extension = GROUP_SUFFIX.lstrip(".")
    _write_mode = WriteMode.TEXT

    # -- where a test's snapshot lives --------------------------------------------------

    @staticmethod
    def _model_and_group(test_location) -> tuple[str, str] | None:
        params = getattr(getattr(test_location.item, "callspec", None), "params", {})
        if "model" not in params or "group" not in params:
            return None
        return params["model"], params["group"]

    @classmethod
    def _owned(cls, test_location) -> tuple[str, str]:
        found = cls._model_and_group(test_location)
        if found is None:
            raise SnapshotError(
                f"{test_location.nodeid}: tests of golden snapshots are parametrized "
                "with 'model' and 'group'"
            )
        return found

    @classmethod
    def dirname(cls, *, test_location) -> str:
        return str(Path(cls.folder) / cls._owned(test_location)[0])

    @classmethod
    def discovery_dirname(cls, *, test_location) -> str:
        # syrupy asks this of every collected test file, parametrized or not.
        return str(cls.folder)

    @classmethod
    def get_file_basename(cls, *, test_location, index) -> str:
        return cls._owned(test_location)[1]

    @classmethod
    def get_snapshot_name(cls, *, test_location, index=0) -> str:
        # The snapshot inside a file is named after the file (one snapshot per file).
        return cls._owned(test_location)[1]

    @classmethod
    def matches_test_location(cls, *, test_location, snapshot_location: str) -> bool:
        if cls._model_and_group(test_location) is None:
            return False
        return Path(snapshot_location) == Path(
            cls.get_location(test_location=test_location, index=0)
        )

    def discover_snapshots(self, *, test_location, ignore_extensions=None) -> SnapshotCollections:
        """The group files that no catalogue group owns any more, and nothing else.

        syrupy reports what it discovers but no test used as unused (and deletes it
        on ``--snapshot-update``). It relates files to tests by file and folder
        names, which this layout does not follow, so it would also count the
        files of skipped tests (the slow smollm2 groups) as unused. Showing it
        only the files of groups gone from the catalogue keeps its report right;
        ``tests/test_snapshots.py`` checks the same in every kind of run.
        """
        discovered = SnapshotCollections()
        for path in sorted(Path(self.folder).glob(f"*/*{GROUP_SUFFIX}")):
            if path.stem not in catalogue_groups(path.parent.name):
                discovered.add(self.read_snapshot_collection(snapshot_location=str(path)))
        return discovered

    # -- what is stored, and when two snapshots match -----------------------------------

    def serialize(self, data, **_options) -> str:
        if isinstance(data, GroupSnapshot):
            return group_to_json(data)
        raise TypeError(f"golden snapshots store a GroupSnapshot, not {type(data).__name__}")

    def matches(self, *, serialized_data, snapshot_data) -> bool:
        comparison = self._compare(serialized_data, snapshot_data)
        if comparison is None:
            return False
        for note in comparison.near_ties:
            warnings.warn(GoldenNearTie(note.render()), stacklevel=2)
        return comparison.matches

    def diff_lines(self, serialized_data, snapshot_data) -> Iterator[str]:
        comparison = self._compare(serialized_data, snapshot_data)
        if comparison is None:  # unreadable or missing: fall back to a text diff
            yield from super().diff_lines(serialized_data, snapshot_data)
            return
        yield "golden snapshot differs (snapshot = stored file, now = this run):"
        yield from comparison.render().splitlines()

    def _compare(self, serialized_data, snapshot_data):
        try:
            stored = group_from_json(str(snapshot_data), "stored snapshot")
            fresh = group_from_json(str(serialized_data), "new snapshot")
        except SnapshotError:
            return None
        vocabulary = _vocabulary(str(self.folder), stored.model)
        if vocabulary is None:

            def decode(tokens):
                return " ".join(f"<{t}>" for t in tokens)

            return compare_groups(stored, fresh, decode)
        return compare_groups(stored, fresh, vocabulary.decode, vocabulary.token_text)


@cache
def catalogue_groups(model: str) -> frozenset[str]:
    """The case groups of the catalogue that run on ``model``."""
    return frozenset(c.group for c in select_cases(load_cases(), model))


@cache
def _vocabulary(folder: str, model: str) -> SnapshotVocabulary | None:
    try:
        return SnapshotVocabulary(read_vocabulary(Path(folder), model))
    except SnapshotError:
        return None
