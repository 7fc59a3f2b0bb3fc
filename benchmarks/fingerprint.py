"""The machine fingerprint stored with every benchmark run.

Timings from two machines cannot be compared, so every run records where it ran.
The fingerprint has two halves:

- the *hardware* half (CPU model, cores, memory, OS, MLX device) decides whether
  two runs may be compared at all: ``machine_key`` hashes it;
- the *software* half (Python, MLX and engine versions) is informative: comparing
  across an MLX upgrade is exactly how one finds out whether the upgrade was slower,
  so a version change is reported next to the verdicts, not refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

HARDWARE_FIELDS = ("cpu_model", "cores", "memory_gb", "os", "mlx_device")


@dataclass(frozen=True)
class Fingerprint:
    cpu_model: str
    cores: int
    memory_gb: float
    os: str
    mlx_device: str
    python: str
    mlx_version: str
    engine_versions: dict[str, str] = field(default_factory=dict)

    @property
    def machine_key(self) -> str:
        """Short hash of the hardware half: equal keys mean comparable timings."""
        hardware = {name: getattr(self, name) for name in HARDWARE_FIELDS}
        digest = hashlib.sha256(json.dumps(hardware, sort_keys=True).encode()).hexdigest()
        return digest[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        return cls(**json.loads(text))

    def differences(self, other: Fingerprint) -> dict[str, tuple[object, object]]:
        """Fields that differ, as ``name -> (self value, other value)``."""
        mine, theirs = asdict(self), asdict(other)
        return {name: (mine[name], theirs[name]) for name in mine if mine[name] != theirs[name]}


def cpu_model() -> str:
    """The CPU's marketing name; ``platform.processor()`` is often empty on Linux."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gb() -> float:
    """Physical memory in GiB, rounded so that reporting jitter does not change the key."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


def mlx_facts() -> tuple[str, str]:
    """(MLX version, default device) or ("absent", "none") when MLX is not installed."""
    try:
        import mlx.core as mx
    except ImportError:
        return "absent", "none"
    return mx.__version__, str(mx.default_device())


def collect(engine_versions: dict[str, str] | None = None) -> Fingerprint:
    """Fingerprint of the machine this process runs on."""
    mlx_version, mlx_device = mlx_facts()
    return Fingerprint(
        cpu_model=cpu_model(),
        cores=os.cpu_count() or 1,
        memory_gb=memory_gb(),
        os=f"{platform.system()} {platform.release()}",
        mlx_device=mlx_device,
        python=platform.python_version(),
        mlx_version=mlx_version,
        engine_versions=dict(sorted((engine_versions or {}).items())),
    )
