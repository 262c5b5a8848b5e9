"""Benchmarks run by `python -m launch.bench <name>`; shared helpers live in `bench.common`."""
