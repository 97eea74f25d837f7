"""The library's entry points that need the whole engine (the query API with actions, resume) and
the library's composition root: the process's one session.

MLRun's API (`new_function`, `get_run_db`, `get_or_create_ctx`...) takes no handle, so the library
keeps one session per process, built from the environment's settings on first use and rebuilt
in a forked child. Only the library's entry points call `session()`; everything they create
carries the session's Services explicitly (see engine.bootstrap).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from engine.bootstrap import Services, bootstrap
from engine.run import RunObject
from projections.query import RunDB

if TYPE_CHECKING:
    from engine.function import Function


@dataclass
class Session:
    """The library's services for this process and the functions `new_function` named in it
    (for MLRun's `run_function('name')`)."""

    services: Services
    functions: dict[str, Function] = field(default_factory=dict)


_lock = threading.Lock()
_session: Session | None = None


def session() -> Session:
    """The process's library session (built from the environment on first use). Called only by
    the library's entry points."""
    global _session
    with _lock:
        if _session is None:
            _session = Session(bootstrap())
        return _session


def close_session() -> None:
    """Flush and close the library session; the next entry point call builds a new one from the
    environment as it is then (tests; a process that changes its settings)."""
    global _session
    with _lock:
        found, _session = _session, None
    if found is not None:
        found.services.close()


def _forget_session_in_child() -> None:
    # a forked child builds a session of its own: the parent's writer thread does not exist in
    # it, and a bus connection must not be shared between processes
    global _lock, _session
    _lock = threading.Lock()
    _session = None


os.register_at_fork(after_in_child=_forget_session_in_child)


class EngineRunDB(RunDB):
    """The query API plus the actions that execute runs (rerun, resume), with the services it was
    made from."""

    def __init__(self, svc: Services, as_of: int | datetime | str | None = None) -> None:
        super().__init__(svc.bus, svc.settings.db_path, svc.codec, svc.settings.db_timeout_s,
                         svc.user_projections, as_of, source=svc.reads())
        self.services = svc

    def rerun(self, uid: str, params: dict | None = None, strict: bool = False, trust: bool = False) -> RunObject:
        """Execute a recorded run again (see `engine.rerun.rerun`; `trust` runs a handler that is not
        verified as this home's own code)."""
        from engine.rerun import rerun

        return rerun(self.services, uid, params, strict, trust=trust)

    def resume(self, parent_uid: str, trust: bool = False) -> RunObject:
        """Finish a sweep whose driver died (see `resume`)."""
        from engine.sweep.runner import resume_sweep

        return RunObject.from_context(resume_sweep(self.services, parent_uid, trust=trust))


def get_run_db(as_of: int | datetime | str | None = None) -> EngineRunDB:
    """The query API over the current RUNBUS_HOME / RUNBUS_BUS (waits for pending events).

    `as_of` answers from the tables as they were at that events.position or time.
    """
    svc = session().services
    svc.writer.flush()
    return EngineRunDB(svc, as_of)


def resume(parent_uid: str, trust: bool = False) -> RunObject:
    """Finish a sweep whose driver died: run only the iterations the log shows unfinished
    (`trust`: see `resume_sweep`)."""
    return get_run_db().resume(parent_uid, trust)
