"""Projections: consumers that fold events into DuckDB tables, and the query API over them."""

from __future__ import annotations

import importlib
from typing import Any

from projections.database import ProjectionBusy, open_projection
from projections.projector import Progress, Projector

_QUERY_EXPORTS = ("ReadOnlyError", "RunDB", "check_read_only")

__all__ = ["Progress", "ProjectionBusy", "Projector", "ReadOnlyError", "RunDB", "check_read_only",
           "open_projection"]


def __getattr__(name: str) -> Any:  # the query API (pandas) is imported on first use
    if name not in _QUERY_EXPORTS:
        raise AttributeError(f"module 'projections' has no attribute {name!r}")
    return getattr(importlib.import_module("projections.query"), name)
