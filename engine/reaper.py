"""Runs whose process died never send run_finished.

The projection already shows such a run as 'lost' once it has been silent for 3 of its own
heartbeat intervals (see projections.tables); `reap` writes that verdict to the log on the run's
behalf, so that every consumer of the log (exports, other projections) learns it too. A run marked
lost that speaks again is running again: the verdict never overrides the run's own events.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from engine.bootstrap import Services

if TYPE_CHECKING:
    import pandas as pd


def mark_lost(svc: Services, uid: str, reason: str, alive_s: float = 0.0) -> None:
    """End a run whose process died: run_finished with state 'lost', on a stream of its own so it
    can never take a seq number the run's own process still uses. Its duration is `alive_s`, how
    long it was heard from (its own end is not known)."""
    svc.writer.emit(uid, 0, "run_finished", {
        "state": "lost", "error": f"lost: {reason}", "traceback": None, "return_value": None,
        "duration_s": max(0.0, float(alive_s))}, stream=uuid.uuid4().hex)


def running_runs(svc: Services, parent_uid: str | None = None) -> pd.DataFrame:
    """Runs with no recorded end, with their state ('running', or 'lost' when judged silent by
    their own heartbeat interval), how long they have been silent and were heard from before."""
    where = "r.finished_at IS NULL AND r.state IN ('running', 'lost')"
    if parent_uid:
        where += " AND r.parent_uid = ?"
    return svc.run_db().sql(
        "SELECT r.uid, r.state, epoch(now()) - epoch(r.last_event_at) AS silent_s, "
        "epoch(r.last_event_at) - epoch(r.started_at) AS alive_s "
        f"FROM runs r WHERE {where}", [parent_uid] if parent_uid else [])


def reap(svc: Services, silent_s: float | None = None, parent_uid: str | None = None) -> list[str]:
    """Write the 'lost' verdict for every run judged lost (silent for 3 of its own heartbeat
    intervals), or with `silent_s`, for every unfinished run silent for longer than that."""
    unfinished = running_runs(svc, parent_uid)
    stale = unfinished[unfinished.state == "lost"] if silent_s is None else unfinished[unfinished.silent_s > silent_s]
    for row in stale.itertuples():
        mark_lost(svc, row.uid, f"no heartbeat for {row.silent_s:.0f}s", row.alive_s)
    svc.writer.flush()
    return list(stale.uid)
