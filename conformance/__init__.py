"""Conformance suite: validate any generation engine against the reference.

Where to find things:

- protocol.py          requests, events and capabilities (plain data)
- serialization.py     JSON round-trip of protocol messages, with validation
- validation.py        rules every engine's event stream must obey
- adapters/            built-in engines: reference, mlx-lm, transformers, module:Class
- model_sources.py     which file format of a model each engine is handed
- cases.toml           the case catalogue, as data
- catalogue.py         loading cases and turning them into concrete requests
- profiles.py          precision profiles (tolerances per weight precision)
- conditioning.py      how well-conditioned a case's greedy path is
- comparator.py        the tie-aware comparison of two token traces
- sampler_stats.py     implied sampler distributions, support checks, calibrated
                       fit tests with Holm correction
- sampler_draws.py     ways to draw N seeded samples (engine requests, batched reference)
- checks/              what each kind of case runs and asserts
- runner.py            running cases on engines, one failure never stops the run
- report.py            JSON, Markdown, JUnit XML and the terminal matrix
- cli_check.py         ``lmconform check``
- pytest_plugin.py     ``pytest --pyargs conformance --engine ... --model ...``
"""
