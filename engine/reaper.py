"""Runs whose process died never send run_finished: find them by their silent heartbeats and
end them as 'lost', writing the event on their behalf."""

from __future__ import annotations

import uuid

import pandas as pd

from engine.bootstrap import Services


def mark_lost(svc: Services, uid: str, reason: str) -> None:
    """End a run whose process died: run_finished with state 'lost', on a stream of its own so it
    can never take a seq number the run's own process still uses."""
    svc.writer.emit(uid, 0, "run_finished", {
        "state": "lost", "error": f"lost: {reason}", "traceback": None, "return_value": None,
        "duration_s": 0.0}, stream=uuid.uuid4().hex)


def running_runs(svc: Services, parent_uid: str | None = None) -> pd.DataFrame:
    """Runs in state 'running' with how long they have been silent."""
    where = "state = 'running'" + (" AND parent_uid = ?" if parent_uid else "")
    return svc.run_db().sql(
        "SELECT r.uid, epoch(now()) - epoch(r.last_event_at) AS silent_s "
        f"FROM runs r WHERE {where}", [parent_uid] if parent_uid else [])


def reap(svc: Services, silent_s: float | None = None, parent_uid: str | None = None) -> list[str]:
    """Mark 'lost' every running run silent for longer than `silent_s` (default: 3 heartbeats)."""
    limit = 3 * svc.settings.heartbeat_interval_s if silent_s is None else silent_s
    running = running_runs(svc, parent_uid)
    stale = running[running.silent_s > limit]
    for row in stale.itertuples():
        mark_lost(svc, row.uid, f"no heartbeat for {row.silent_s:.0f}s")
    svc.writer.flush()
    return list(stale.uid)
