"""Fold events into table rows: one function per event type, writing into a `TableBatch`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from producers.values import numeric_or_none
from schemas import Event


def _number_of(value_json: str | None) -> float | None:
    if value_json is None:
        return None
    try:
        return numeric_or_none(orjson.loads(value_json))
    except orjson.JSONDecodeError:
        return None


@dataclass
class TableBatch:
    """Rows produced by one batch of events, ready to be written in one transaction."""

    new_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[tuple[str, str], tuple[str, float | None]] = field(default_factory=dict)
    results: dict[tuple[str, str], tuple[str, float | None]] = field(default_factory=dict)
    labels: dict[tuple[str, str], str] = field(default_factory=dict)
    artifacts: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    metrics: list[tuple[str, str, int | None, float, float]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    dead_letters: list[tuple[Any, ...]] = field(default_factory=list)
    labelled_runs: set[str] = field(default_factory=set)
    run_progress: dict[tuple[str, str], int] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)
    next_position: int = 0

    def update_run(self, uid: str, **columns: Any) -> None:
        """Change columns of a run, whether it started in this batch or before."""
        target = self.new_runs.get(uid)
        if target is None:
            target = self.run_updates.setdefault(uid, {})
        target.update(columns)


def _run_started(batch: TableBatch, event: Event) -> None:
    p = event.payload
    batch.new_runs[event.run_uid] = {
        "uid": event.run_uid, "parent_uid": p["parent_uid"], "iteration": p["iteration"],
        "project": p["project"], "name": p["name"], "state": "running", "handler": p["handler"],
        "runtime": p["runtime"], "host": p["host"], "labels": json.dumps(p["labels"]),
        "started_at": event.ts, "finished_at": None, "duration_s": None, "error": None,
        "return_value": None, "traceback": None, "inputs": json.dumps(p["inputs"]),
        "extra": json.dumps({k: json.loads(v) for k, v in p["extra"].items()}),
        "last_event_at": event.ts,
    }
    for key, value in p["params"].items():
        batch.params[(event.run_uid, key)] = (value, _number_of(value))
    for key, value in p["labels"].items():
        batch.labels[(event.run_uid, key)] = value


def _param(batch: TableBatch, event: Event) -> None:
    value = event.payload["value"]
    batch.params[(event.run_uid, event.payload["key"])] = (value, _number_of(value))


def _result(batch: TableBatch, event: Event) -> None:
    value = event.payload["value"]
    batch.results[(event.run_uid, event.payload["key"])] = (value, _number_of(value))


def _metric(batch: TableBatch, event: Event) -> None:
    p = event.payload
    batch.metrics.append((event.run_uid, p["key"], p["step"], p["value"], p["timestamp"]))


def _label(batch: TableBatch, event: Event) -> None:
    batch.labels[(event.run_uid, event.payload["key"])] = event.payload["value"]
    batch.labelled_runs.add(event.run_uid)


def _artifact(batch: TableBatch, event: Event) -> None:
    p = event.payload
    batch.artifacts[(event.run_uid, p["key"])] = (
        p["kind"], p["uri"], p["sha256"], p["size"], p["format"], json.dumps(p["labels"]), p["meta"])


def _run_finished(batch: TableBatch, event: Event) -> None:
    p = event.payload
    batch.update_run(event.run_uid, state=p["state"], finished_at=event.ts,
                     duration_s=p["duration_s"], error=p["error"], traceback=p["traceback"],
                     return_value=p["return_value"])


def _ignore(batch: TableBatch, event: Event) -> None:
    """Events kept only in the events table (heartbeats, sweep requests)."""


FOLDS: dict[str, Callable[[TableBatch, Event], None]] = {
    "run_started": _run_started,
    "param": _param,
    "result": _result,
    "metric": _metric,
    "label": _label,
    "artifact": _artifact,
    "run_finished": _run_finished,
    "heartbeat": _ignore,
    "iteration_requested": _ignore,
}


def fold(batch: TableBatch, event: Event) -> None:
    """Apply one event to the batch; every event also touches its run's last_event_at."""
    FOLDS[event.type](batch, event)
    if event.type != "run_started":
        batch.update_run(event.run_uid, last_event_at=event.ts)
