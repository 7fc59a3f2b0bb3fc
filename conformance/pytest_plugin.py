"""pytest plugin (placeholder until the conformance plugin lands)."""
