"""Hyper-parameter sweeps: a parent run fans out iterations as events; runtimes execute them."""
