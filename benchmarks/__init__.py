"""Benchmarks (not shipped): the pytest-benchmark loss suite in `suite/` and one-off scripts."""
