"""Runtimes: where a run's handler executes."""
