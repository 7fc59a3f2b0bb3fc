"""The environment for a pytest (or lmconform) started by a test in a subprocess."""

import os


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, less pytest-xdist's ``PYTEST_XDIST_*``:
    a pytest started from an xdist worker would otherwise take itself for one
    (pytest-benchmark, for one, then disables itself and writes no JSON)."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PYTEST_XDIST")}
    return {**env, **extra}
