"""Benchmarks: throughput, latency and scale, side by side with Huey (see README.md)."""
