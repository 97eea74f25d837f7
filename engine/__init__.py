"""Runbus engine: functions, tasks, runtimes and the query entry point.

Names are imported on first use, so that a process that needs only part of Runbus (the projector
service, a Dask worker) does not load matplotlib, pandas and the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Function": "engine.function", "new_function": "engine.function",
    "NewRun": "engine.task", "RunTemplate": "engine.task", "new_task": "engine.task",
    "RunObject": "engine.run", "RunDB": "projections.query",
    "EngineRunDB": "engine.api", "get_run_db": "engine.api", "resume": "engine.api",
    "run_function": "engine.function",
    "get_or_create_ctx": "engine.script", "start_run": "engine.script",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
