"""Benchmarks: ``python -m pipeline bench NAME`` prints one JSON object."""
