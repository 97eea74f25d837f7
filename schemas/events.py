"""Events as plain frozen dataclasses: one envelope, a payload shaped by the event type's Avro record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# 3: the `log` event (console output). 4: run_deleted, run_restored, run_amended (written about a
# run by another process). Each earlier version's expanded schema is in avro/history.
SCHEMA_VERSION = 4

# Event type name (the envelope's `type`) -> Avro record name of its payload.
RECORD_OF_TYPE: dict[str, str] = {
    "run_started": "runbus.RunStarted",
    "param": "runbus.ParamLogged",
    "result": "runbus.ResultLogged",
    "metric": "runbus.MetricLogged",
    "label": "runbus.LabelSet",
    "artifact": "runbus.ArtifactLogged",
    "run_finished": "runbus.RunFinished",
    "heartbeat": "runbus.Heartbeat",
    "iteration_requested": "runbus.IterationRequested",
    "log": "runbus.LogLines",
    "run_deleted": "runbus.RunDeleted",
    "run_restored": "runbus.RunRestored",
    "run_amended": "runbus.RunAmended",
}
TYPE_OF_RECORD: dict[str, str] = {record: kind for kind, record in RECORD_OF_TYPE.items()}
EVENT_TYPES: tuple[str, ...] = tuple(RECORD_OF_TYPE)
# Events written about a run by someone else than the run (on a stream of their own): they change
# what the projection shows of the run, never its state or the time it last spoke.
EDIT_TYPES = frozenset({"run_deleted", "run_restored", "run_amended"})


@dataclass(frozen=True, slots=True)
class Event:
    """One immutable fact about a run.

    A run's events come on one or more streams: the run's own process writes one, and another
    process that writes about the run (the reaper marking it lost, resume) writes its own. `seq`
    orders the events of one (run_uid, stream) pair: 0, 1, 2, ...
    """

    event_id: str
    run_uid: str
    seq: int
    type: str
    ts: float
    host: str
    pid: int
    payload: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    stream: str = ""

    def __post_init__(self) -> None:
        if self.type not in RECORD_OF_TYPE:
            raise ValueError(f"unknown event type {self.type!r}; known: {', '.join(EVENT_TYPES)}")
