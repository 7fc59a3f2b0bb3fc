"""Every data file inside a package travels with `pip install .`.

A file the code reads at run time but pyproject's package-data leaves out works in the
checkout and breaks only in an installed copy (CI's bare install found agreement_texts/ so).
"""

import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("reference", "engines", "conformance", "lmconform")


def tracked_data_files(package: str) -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", package], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [Path(name) for name in listed if not name.endswith(".py")]


def test_every_data_file_in_a_package_is_declared_package_data():
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = settings["tool"]["setuptools"]["package-data"]
    missing = []
    for package in PACKAGES:
        patterns = declared.get(package, [])
        for path in tracked_data_files(package):
            inside = path.relative_to(package)
            if not any(inside.match(pattern) and len(inside.parts) == len(Path(pattern).parts)
                       for pattern in patterns):
                missing.append(str(path))
    assert not missing, f"data files that `pip install .` would leave out: {missing}"
