"""Producers: the run context, artifacts and their store, and the bus writers."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"RunContext": "producers.context", "DataItem": "producers.data_item"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # imported on first use: the bus writers need no pandas
    if name not in _EXPORTS:
        raise AttributeError(f"module 'producers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
