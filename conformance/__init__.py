"""Conformance suite: judge any generation engine against the reference.

Engines are reached through the shared ``engines`` package (protocol, registry,
adapters, models); this package only decides verdicts. Where to find things:

- cases.toml           the case catalogue, as data
- catalogue.py         loading cases and turning them into concrete requests
- profiles.py          precision profiles (tolerances per weight precision)
- conditioning.py      how well-conditioned a case's greedy path is
- comparator.py        the tie-aware comparison of two token traces
- validation.py        rules every engine's event stream must obey
- oracle.py            the oracle contract and the live reference oracle
- checks/              what each kind of case runs and asserts
- sampling/            sampler statistics: implied distributions, fit tests, draws
- snapshots/           golden snapshots: files, recording, replay, comparison, syrupy
- runner.py            running cases on engines, one failure never stops the run
- report.py            JSON, Markdown, JUnit XML and the terminal matrix
- cli/                 ``lmconform check`` and ``lmconform snapshot``
- pytest_plugin.py     ``pytest --pyargs conformance --lmconform-engine ...``
- examples/            a JSON-lines engine and deliberately faulty ones
"""
