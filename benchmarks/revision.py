"""The code revision a benchmark run measured: git commit and dirty flag.

A number in the history is only useful if one can say which code produced it, and
a run from a working tree with uncommitted edits must say so (it is not the commit).
Outside a git checkout, or before the first commit, the commit is ``None``.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Revision:
    commit: str | None
    dirty: bool

    @property
    def label(self) -> str:
        """Short form for tables and plot axes: ``1a2b3c4`` or ``1a2b3c4+`` when dirty."""
        name = self.commit[:7] if self.commit else "uncommitted"
        return name + ("+" if self.dirty else "")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def current(cwd: str | Path = ".") -> Revision:
    """The revision of the checkout containing ``cwd``."""
    cwd = Path(cwd)
    commit = _git(["rev-parse", "HEAD"], cwd)
    status = _git(["status", "--porcelain"], cwd)  # untracked files count
    # No commit yet (or no git): everything in the tree is uncommitted work.
    dirty = commit is None or bool(status)
    return Revision(commit=commit, dirty=dirty)
