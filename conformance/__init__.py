"""Conformance suite: validate generation engines against the reference."""
