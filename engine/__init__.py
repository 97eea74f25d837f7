"""Runbus engine: functions, tasks, runtimes and the query entry point."""

from __future__ import annotations

from engine.bootstrap import services
from engine.function import Function, new_function
from engine.run import RunObject
from engine.sweep.runner import resume_sweep
from engine.task import NewRun, RunTemplate, new_task
from projections import RunDB


def get_run_db() -> RunDB:
    """The query API over the current RUNBUS_HOME / RUNBUS_BUS (waits for pending events)."""
    svc = services()
    svc.writer.flush()
    return svc.run_db()


def resume(parent_uid: str) -> RunObject:
    """Finish a sweep whose driver died: run only the iterations the log shows unfinished."""
    return RunObject.from_context(resume_sweep(parent_uid))


__all__ = ["Function", "NewRun", "RunDB", "RunObject", "RunTemplate", "get_run_db", "new_function",
           "new_task", "resume"]
