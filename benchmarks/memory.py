"""Peak-memory probes: how much memory an engine added while a workload ran.

Several engines live in one process during an interleaved run, so "the process's
peak memory" would charge every engine for the others' weights. Instead each probe
measures the *extra* memory at its peak over the level at entry, and the workload
adds the engine's own weight bytes. Three probes, one per kind of allocator:

- ``MLXProbe``        MLX's allocator counters (``mx.get_peak_memory``), exact for MLX
- ``RSSProbe``        the process's resident set (Linux ``VmHWM``, reset through
                      ``/proc/self/clear_refs``), for PyTorch on CPU which has no counter
- ``TracemallocProbe`` Python/NumPy allocations, for the synthetic engine
"""

from __future__ import annotations

import ctypes
import ctypes.util
import tracemalloc
from pathlib import Path
from typing import Self


class MLXProbe:
    def __enter__(self) -> Self:
        import mlx.core as mx

        self._mx = mx
        mx.synchronize()
        self._base = mx.get_active_memory()
        mx.reset_peak_memory()
        self.peak_extra_bytes = 0
        return self

    def __exit__(self, *exc) -> None:
        self._mx.synchronize()
        self.peak_extra_bytes = max(0, self._mx.get_peak_memory() - self._base)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS, so the next peak is measured from scratch.

    Without this glibc keeps memory freed by the previous trial, the next trial reuses
    it without growing the resident set, and its peak would read as zero.
    """
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


class RSSProbe:
    """Peak resident-set growth. Linux only; elsewhere it reports 0 (unknown)."""

    def __enter__(self) -> Self:
        self.peak_extra_bytes = 0
        self._supported = Path("/proc/self/clear_refs").exists()
        if self._supported:
            _release_free_heap()
            try:
                # "5" resets the high-water mark VmHWM to the current resident set.
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self._supported = False
            self._base_kb = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self._supported:
            self.peak_extra_bytes = max(0, _status_kb("VmHWM") - self._base_kb) * 1024


class TracemallocProbe:
    def __enter__(self) -> Self:
        self._started_here = not tracemalloc.is_tracing()
        if self._started_here:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._base = tracemalloc.get_traced_memory()[0]
        self.peak_extra_bytes = 0
        return self

    def __exit__(self, *exc) -> None:
        self.peak_extra_bytes = max(0, tracemalloc.get_traced_memory()[1] - self._base)
        if self._started_here:
            tracemalloc.stop()
