"""Benchmarks: each `bench/bench_<name>.py` measures one thing and updates docs/BENCHMARKS.md."""
