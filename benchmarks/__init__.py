"""Performance tracking for LLM generation engines.

Where things live (one concept per module):

- ``workloads.py``   what is measured: prefill, decode, batched decode, speculative
                     decoding, peak memory; the metric catalogue (units, direction)
- ``engines.py``     engines opened through ``engines.registry`` (any engine ``check``
                     takes), with what timing needs: prompt tokenizer, end tokens to
                     ban, memory meter and weight bytes; bench-only spec options
- ``instruments.py`` test instruments: a synthetic engine of known costs and a
                     slowdown of any engine (to prove regressions are caught)
- ``memory.py``      peak-memory probes (MLX allocator, process RSS, tracemalloc)
- ``roofline.py``    memory bandwidth measured on the spot; the decode roofline
- ``fingerprint.py`` the machine fingerprint stored with every run
- ``revision.py``    the code revision (git commit, dirty flag) stored with every run
- ``history.py``     the SQLite history: one row per raw sample, committed per trial
- ``ingest.py``      pytest-benchmark JSON into the history
- ``runner.py``      interleaved trials (A B A B ...), warm-up, progress on stderr
- ``stats.py``       rank test plus minimum effect size: improved / unchanged / regressed
- ``report.py``      the results table (median, spread, ratio to the reference, % roofline)
- ``plot.py``        history over commits as a PNG, plus a Markdown summary

The pytest-benchmark suites are the ``test_*.py`` files next to this one; run them
with ``pytest benchmarks/`` (the project's default ``pytest`` only collects ``tests/``).
"""
