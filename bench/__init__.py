"""Benchmarks: `python -m bench` (or `make bench`). Figures live here, never in tests."""
