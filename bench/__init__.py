"""Benchmarks of BIMIP: `python -m bench.messaging` (see BENCHMARKS.md)."""
