"""Reaching engines: the layer that ``conformance`` and ``benchmarks`` share.

- protocol.py          requests, events and capabilities (plain data)
- serialization.py     JSON round-trip of protocol messages, with validation
- jsonl_protocol.py    the JSON-lines wire protocol of ``cmd:`` engines (PROTOCOL.md)
- registry.py          engine specs -> adapters: built-in names, module:Class, cmd:
- models.py            the model table: names, default profiles, file formats, export cache
- byte_level.py        how byte-level BPE vocabularies spell bytes (reading token names back)
- deadline.py          per-case time limits
- adapters/            the built-in engines: reference, mlx-lm, transformers, cmd:
"""
