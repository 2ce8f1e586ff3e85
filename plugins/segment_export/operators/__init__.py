"""Operators: thin wiring of a spec, a source, a destination and the exporter."""
