"""Benchmarks: throughput, latency and scale, side by side with Huey (see tests/bench/README.md)."""
