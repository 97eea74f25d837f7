"""Runbus benchmarks: `make bench` (python -m benchmarks)."""
