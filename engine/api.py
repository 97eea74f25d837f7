"""The user-facing entry points that need the whole engine: the query API with actions, resume."""

from __future__ import annotations

from datetime import datetime

from engine.bootstrap import services
from engine.run import RunObject
from engine.sweep.runner import resume_sweep
from projections.query import RunDB


class EngineRunDB(RunDB):
    """The query API plus the actions that execute runs (rerun, resume)."""

    def rerun(self, uid: str, params: dict | None = None, strict: bool = False, trust: bool = False) -> RunObject:
        """Execute a recorded run again (see `engine.rerun.rerun`; `trust` runs a handler that is not
        verified as this home's own code)."""
        from engine.rerun import rerun

        return rerun(uid, params, strict, trust=trust)

    def resume(self, parent_uid: str, trust: bool = False) -> RunObject:
        return resume(parent_uid, trust)


def get_run_db(as_of: int | datetime | str | None = None) -> EngineRunDB:
    """The query API over the current RUNBUS_HOME / RUNBUS_BUS (waits for pending events).

    `as_of` answers from the tables as they were at that events.position or time.
    """
    svc = services()
    svc.writer.flush()
    return EngineRunDB(svc.bus, svc.settings.db_path, svc.codec, svc.settings.db_timeout_s,
                       svc.user_projections, as_of, source=svc.reads())


def resume(parent_uid: str, trust: bool = False) -> RunObject:
    """Finish a sweep whose driver died: run only the iterations the log shows unfinished
    (`trust`: see `resume_sweep`)."""
    return RunObject.from_context(resume_sweep(parent_uid, trust=trust))
