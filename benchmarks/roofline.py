"""The memory-bandwidth roofline for decoding.

Decoding one token reads every weight once (the KV cache is small next to the
weights for short contexts), so no engine can decode faster than

    roofline tokens/s = memory bandwidth / weight bytes read per token.

Bandwidth is measured on the spot, not taken from a data sheet: a virtual machine
or a busy host gets less than the spec, and the roofline should describe the
machine the numbers came from. The measurement reads a buffer much larger than
the last-level cache with one thread per core (NumPy releases the GIL inside the
reduction), and keeps the best of a few repeats, as STREAM-style benchmarks do.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

DEFAULT_BUFFER_BYTES = 256 * 2**20  # several times any last-level cache here


def measure_bandwidth(
    buffer_bytes: int = DEFAULT_BUFFER_BYTES, threads: int | None = None, repeats: int = 5
) -> float:
    """Memory read bandwidth in bytes per second."""
    threads = threads or os.cpu_count() or 1
    data = np.ones(buffer_bytes // 8, dtype=np.uint64)  # ones: pages really allocated
    chunks = np.array_split(data, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [
            threading.Thread(target=np.bitwise_or.reduce, args=(chunk,)) for chunk in chunks
        ]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def roofline_tps(bandwidth_bytes_per_s: float, bytes_per_token: float) -> float:
    """Upper bound on single-sequence decode tokens per second."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return bandwidth_bytes_per_s / bytes_per_token


def percent_of_roofline(
    decode_tps: float, bandwidth_bytes_per_s: float, bytes_per_token: float
) -> float:
    return 100.0 * decode_tps / roofline_tps(bandwidth_bytes_per_s, bytes_per_token)
