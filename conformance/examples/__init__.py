"""Example engines that speak the JSON-lines protocol (``conformance/PROTOCOL.md``).

- ``jsonl_engine``: the reference engine served over the protocol, a worked example.
- ``faulty_engines``: the same, with one deliberate fault each, for the suite's own tests.
"""
