"""Fold events into table rows: one function per event type, writing into a `TableBatch`.

Events come from an untrusted bus, so `check_event` finds, event by event and before anything is
folded, what the tables could not hold (strings that are not valid UTF-8, times outside what DuckDB
and pandas can show, unknown run states, JSON values DuckDB does not read); such an event is
quarantined by the projector instead of being folded. Checking each event on its own, rather than
waiting for DuckDB to refuse a batch, keeps the outcome independent of how the log is batched
(a bad result value overwritten by a later one in the same batch would never reach DuckDB).

A run's state follows these rules, whatever process wrote the event:
- a run_finished written on the run's own stream (the stream of its run_started) sets its state.
- a run_finished from any other stream is a verdict (the reaper's 'lost', a resumed sweep's end,
  or a stranger's): it ends a run only while it is 'running' and never overwrites the run's own end.
- any other event (heartbeat, metric, ...) of a run marked 'lost' makes it 'running' again:
  the run was not dead, and ends in the state of its own last event.
Events of a run not started yet (no run_started applied) touch no run row.

Edits (run_deleted, run_restored, run_amended: `EDIT_TYPES`) are written by another process than
the run's: they never revive a lost run nor move its last_event_at. An amendment sets and removes
labels (in `labels` and runs.labels) and sets runs.note. A run_deleted or run_restored folds to
nothing here: the projector applies it between the batch's events (see projections.projector).
Events of a hidden run (deleted, or an iteration of a deleted run: `TableBatch.hidden`) are not
folded, and a run_started whose parent is deleted hides its run.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import duckdb
import orjson

from producers.amendments import MAX_BY_CHARS, MAX_LABELS_CHARS, MAX_NOTE_CHARS
from producers.console import EVENT_MAX_CHARS, EVENT_MAX_LINES, LINE_MAX_CHARS, STREAMS
from producers.values import MAX_DEPTH, MAX_TIMESTAMP_S, numeric_or_none
from schemas import Event
from schemas.codec import MetricColumns
from schemas.events import EDIT_TYPES

# Times a TIMESTAMPTZ column holds and pandas (datetime64[ns]) can read: years 1678 to 2261.
MIN_TS = -MAX_TIMESTAMP_S
MAX_TS = MAX_TIMESTAMP_S  # what the SDK accepts at the call is what the projection holds
RUN_STATES = frozenset({"completed", "error", "aborted", "lost"})
_FINISH_COLUMNS = ("finished_at", "duration_s", "error", "traceback", "return_value")


def printable(text: object) -> str:
    """`text` as a string DuckDB accepts: lone surrogates become backslash escapes."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def identity_problem(event: Event) -> str | None:
    """Why the event's identity (event id, run uid, stream) cannot be stored, or None."""
    if (event.event_id + event.run_uid + event.stream).isascii():  # the usual uuid hex
        return None
    for name in ("event_id", "run_uid", "stream"):
        value = getattr(event, name)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{name} {printable(value)!r} is not valid UTF-8 (lone surrogate)"
    return None


def _is_time(value: float) -> bool:
    return MIN_TS <= value <= MAX_TS  # also False for NaN


def _time_problem(what: str, value: float) -> str:
    return f"{what} {value!r} is not a time in seconds since the epoch within years 1678-2261"


_json_checker: list[duckdb.DuckDBPyConnection] = []  # one private in-memory database, made on first use
_json_lock = threading.Lock()


def is_storable_json(text: str) -> bool:
    """True when DuckDB stores `text` in a JSON column and it nests lists and objects at most
    MAX_DEPTH deep, as the SDK writes values (producers.values): readers parse what is stored with
    Python's json, whose recursion a value nested thousands deep exhausted (one such param failed
    every runs page and read_run). Strict JSON passes orjson; what orjson refuses (NaN, huge
    numbers, deep nesting, lone surrogates) is asked of DuckDB itself."""
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        with _json_lock:
            if not _json_checker:
                _json_checker.append(duckdb.connect(":memory:"))
            row = _json_checker[0].execute("SELECT json_valid(?)", [text]).fetchone()
        if row is None or not row[0]:
            return False
    return _nests_within(text, MAX_DEPTH)


_JSON_NESTING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # a string (skipped), or one bracket


def _nests_within(text: str, limit: int) -> bool:
    """Whether the JSON text `text` nests lists and objects at most `limit` deep."""
    if text.count("[") + text.count("{") <= limit:  # (the usual value: no scan)
        return True
    depth = 0
    for token in _JSON_NESTING.finditer(text):
        bracket = token.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth > limit:
                return False
        elif bracket in ("]", "}"):
            depth -= 1
    return True


def _json_problem(what: str, text: str) -> str:
    return (f"{what} is not JSON Runbus can store (JSON DuckDB reads, nested at most {MAX_DEPTH} deep): "
            f"{printable(text)[:80]!r}")


def _log_problem(chunks: Any) -> str | None:
    """Why a log event's chunks cannot be folded into `logs` (the bounds a RunContext keeps), or None."""
    if not isinstance(chunks, list):
        return f"log chunks is a {type(chunks).__name__}, not a list"
    lines = chars = 0
    for number, chunk in enumerate(chunks):
        if not isinstance(chunk, dict):
            return f"log chunk {number} is a {type(chunk).__name__}, not a record"
        ts, stream, text = chunk.get("ts"), chunk.get("stream"), chunk.get("text")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not _is_time(ts):
            return _time_problem(f"log chunk {number} ts", ts)  # type: ignore[arg-type]
        if stream not in STREAMS:
            return f"log chunk {number} stream {printable(stream)[:40]!r} is not one of {', '.join(sorted(STREAMS))}"
        if not isinstance(text, str):
            return f"log chunk {number} text is a {type(text).__name__}, not a string"
        chars += len(text) + 1
        if chars > EVENT_MAX_CHARS:
            return f"log event holds more than {EVENT_MAX_CHARS} characters of text"
        lines += text.count("\n") + 1
        if lines > EVENT_MAX_LINES:
            return f"log event holds more than {EVENT_MAX_LINES} lines"
        if len(text) > LINE_MAX_CHARS and max(map(len, text.split("\n"))) > LINE_MAX_CHARS:
            return f"log chunk {number} holds a line longer than {LINE_MAX_CHARS} characters"
        if not _is_utf8(text):
            return f"log chunk {number} text is not valid UTF-8 (lone surrogate)"
    return None


def _is_utf8(text: str) -> bool:
    """False for a string holding a lone surrogate (it cannot be stored as UTF-8)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_problem(what: str, text: object, max_chars: int, empty: bool = True) -> str | None:
    """Why `text` cannot be an edit's text field (not a string, empty when it may not be, too long,
    not valid UTF-8), or None."""
    if not isinstance(text, str):
        return f"{what} is a {type(text).__name__}, not a string"
    if not text and not empty:
        return f"{what} is empty"
    if len(text) > max_chars:
        return f"{what} holds {len(text)} characters, at most {max_chars}"
    if not _is_utf8(text):
        return f"{what} {printable(text)[:40]!r} is not valid UTF-8 (lone surrogate)"
    return None


def _edit_problem(event: Event) -> str | None:
    """Why an edit's payload cannot be folded (the rules producers.amendments applies at the call)."""
    p = event.payload
    problem = _text_problem(f"{event.type} by", p.get("by"), MAX_BY_CHARS, empty=False)
    if problem or event.type == "run_restored":
        return problem
    if event.type == "run_deleted":
        return _text_problem("run_deleted reason", p.get("reason"), MAX_NOTE_CHARS)
    note = p.get("note")
    if note is not None and (problem := _text_problem("run_amended note", note, MAX_NOTE_CHARS)):
        return problem
    labels, removed = p.get("labels"), p.get("removed_labels")
    if not isinstance(labels, dict) or not isinstance(removed, list):
        return "run_amended labels is not a map or removed_labels not a list"
    size = 0
    for key, value in [*labels.items(), *((key, "") for key in removed)]:
        if problem := (_text_problem("run_amended label key", key, MAX_LABELS_CHARS, empty=False)
                       or _text_problem(f"run_amended label {printable(key)[:40]!r} value", value, MAX_LABELS_CHARS)):
            return problem
        size += len(key) + len(value)
    if size > MAX_LABELS_CHARS:
        return f"run_amended labels hold {size} characters, at most {MAX_LABELS_CHARS}"
    both = sorted(set(labels) & set(removed))
    if both:
        return f"run_amended label {printable(both[0])[:40]!r} is both set and removed"
    if not labels and not removed and note is None:
        return "run_amended changes nothing"
    return None


def _payload_problem(event: Event) -> str | None:
    """Why a field of the payload cannot be folded into its table, or None (messages are only
    made for a problem: this runs for every event)."""
    p = event.payload
    kind = event.type
    if kind == "log":
        return _log_problem(p.get("chunks"))
    if kind == "metric":
        ok = _is_time(p["timestamp"])
        return None if ok else _time_problem(f"metric {printable(p['key'])!r} timestamp", p["timestamp"])
    if kind in ("param", "result"):
        ok = is_storable_json(p["value"])
        return None if ok else _json_problem(f"{kind} {printable(p['key'])!r} value", p["value"])
    if kind == "artifact":
        ok = is_storable_json(p["meta"])
        return None if ok else _json_problem(f"artifact {printable(p['key'])!r} meta", p["meta"])
    if kind == "run_finished":
        if p["state"] not in RUN_STATES:
            return f"run_finished state {printable(p['state'])!r} is not one of {', '.join(sorted(RUN_STATES))}"
        value = p["return_value"]
        return None if value is None or is_storable_json(value) else _json_problem("return_value", value)
    if kind in EDIT_TYPES:
        return _edit_problem(event)
    if kind == "run_started":
        for field_name in ("params", "extra"):
            for key, value in p[field_name].items():
                if not is_storable_json(value):
                    return _json_problem(f"run_started {field_name} {printable(key)!r}", value)
    return None


def check_event(event: Event) -> tuple[str | None, str | None]:
    """(payload as JSON text, None) for an event the tables can hold, else (None, the reason)."""
    if not _is_time(event.ts):
        return None, _time_problem("ts", event.ts)
    try:
        payload_json = orjson.dumps(event.payload).decode()
    except TypeError as exc:
        return None, f"payload cannot be stored: {exc}"
    problem = _payload_problem(event)
    return (None, problem) if problem else (payload_json, None)


def _number_of(value_json: str | None) -> float | None:
    if value_json is None:
        return None
    try:
        return numeric_or_none(orjson.loads(value_json))
    except orjson.JSONDecodeError:
        return None


def _interval(value: Any) -> float | None:
    """A usable heartbeat interval, or None for a missing or meaningless one."""
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return float(value)
    return None


@dataclass
class TableBatch:
    """Rows produced by one batch of events, ready to be written in one transaction.

    `states` holds the state of every run the batch may touch (loaded before folding), `owners`
    the stream of its run_started; a run missing from them has no row yet.
    """

    new_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    params: dict[tuple[str, str], tuple[str, float | None]] = field(default_factory=dict)
    results: dict[tuple[str, str], tuple[str, float | None]] = field(default_factory=dict)
    labels: dict[tuple[str, str], str | None] = field(default_factory=dict)  # None: the label is removed
    artifacts: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    metrics: list[tuple[str, str, int | None, float, float]] = field(default_factory=list)
    # (len(metrics) when folded, a record's metric events as columns): rows that come before the
    # later entries of `metrics`; events_columns likewise for `events`, with the first event's
    # position, the record's partition and offset
    metric_columns: list[tuple[int, MetricColumns]] = field(default_factory=list)
    event_columns: list[tuple[int, tuple[int, int, int, MetricColumns]]] = field(default_factory=list)
    logs: list[tuple[str, str, int, float, str]] = field(default_factory=list)
    log_lines: dict[str, int] = field(default_factory=dict)  # lines in `logs` of each run, as loaded
    events: list[tuple[Any, ...]] = field(default_factory=list)
    dead_letters: list[tuple[Any, ...]] = field(default_factory=list)
    conflicts: list[tuple[Any, ...]] = field(default_factory=list)
    duplicates: list[tuple[Any, ...]] = field(default_factory=list)
    labelled_runs: set[str] = field(default_factory=set)
    run_progress: dict[tuple[str, str], int] = field(default_factory=dict)
    run_starts: dict[str, tuple[str, str]] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)  # runs whose events are not folded (loaded, and hidden here)
    deleted: set[str] = field(default_factory=set)  # the deleted runs among the parents of runs started here
    newly_hidden: dict[str, str | None] = field(default_factory=dict)  # run -> parent, hidden by this batch
    next_position: int = 0
    judged_at: float = 0.0  # the clock the public runs.state judges silence by
    fallback_interval_s: float = 5.0

    def update_run(self, uid: str, **columns: Any) -> None:
        """Set columns of a run (None clears one), whether it started in this batch or before."""
        target = self.new_runs.get(uid)
        if target is None:
            target = self.run_updates.setdefault(uid, {})
        target.update(columns)

    def touch(self, uid: str, ts: float) -> None:
        """The run spoke at `ts`: last_event_at only moves forward."""
        target = self.new_runs.get(uid)
        if target is None:
            target = self.run_updates.get(uid)
            if target is None:
                self.run_updates[uid] = {"last_event_at": ts}
                return
        known = target.get("last_event_at")
        if known is None or ts > known:
            target["last_event_at"] = ts


def _run_started(batch: TableBatch, event: Event) -> None:
    p = event.payload
    row = {
        "uid": event.run_uid, "parent_uid": p["parent_uid"], "iteration": p["iteration"],
        "project": p["project"], "name": p["name"], "state": "running", "handler": p["handler"],
        "runtime": p["runtime"], "host": p["host"], "labels": json.dumps(p["labels"]),
        "started_at": event.ts, "finished_at": None, "duration_s": None, "error": None,
        "return_value": None, "traceback": None, "inputs": json.dumps(p["inputs"]),
        "extra": json.dumps({k: json.loads(v) for k, v in p["extra"].items()}),
        "last_event_at": event.ts, "stream": event.stream,
        "heartbeat_interval_s": _interval(p.get("heartbeat_interval_s")), "note": None,
    }
    batch.new_runs[event.run_uid] = row
    batch.states[event.run_uid] = "running"
    batch.owners[event.run_uid] = event.stream
    params = {(event.run_uid, key): (value, _number_of(value)) for key, value in p["params"].items()}
    batch.params.update(params)
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
    if event.run_uid in batch.states:  # a run not started yet has no row to label, whatever the batching
        batch.labelled_runs.add(event.run_uid)


def _artifact(batch: TableBatch, event: Event) -> None:
    p = event.payload
    batch.artifacts[(event.run_uid, p["key"])] = (
        p["kind"], p["uri"], p["sha256"], p["size"], p["format"], json.dumps(p["labels"]), p["meta"])


def _run_finished(batch: TableBatch, event: Event) -> None:
    p = event.payload
    current = batch.states.get(event.run_uid)
    verdict = p["state"] == "lost" or batch.owners.get(event.run_uid) != event.stream
    if current is None or (verdict and current != "running"):
        return  # not started here yet, or a verdict that comes after the run's own end
    batch.states[event.run_uid] = p["state"]
    batch.update_run(event.run_uid, state=p["state"], finished_at=event.ts,
                     duration_s=p["duration_s"], error=p["error"], traceback=p["traceback"],
                     return_value=p["return_value"])


def _heartbeat(batch: TableBatch, event: Event) -> None:
    interval = _interval(event.payload.get("interval_s"))
    if interval is not None and event.run_uid in batch.states:
        batch.update_run(event.run_uid, heartbeat_interval_s=interval)


def _log(batch: TableBatch, event: Event) -> None:
    """Lines numbered from 1 per run, in the order the log holds them (whatever stream wrote them)."""
    uid = event.run_uid
    number = batch.log_lines.get(uid, 0)
    rows = batch.logs
    for chunk in event.payload["chunks"]:
        stream, ts = chunk["stream"], chunk["ts"]
        for text in chunk["text"].split("\n"):
            number += 1
            rows.append((uid, stream, number, ts, text))
    batch.log_lines[uid] = number


def _run_amended(batch: TableBatch, event: Event) -> None:
    p = event.payload
    uid = event.run_uid
    for key, value in p["labels"].items():
        batch.labels[(uid, key)] = value
    for key in p["removed_labels"]:
        batch.labels[(uid, key)] = None
    if p["labels"] or p["removed_labels"]:
        batch.labelled_runs.add(uid)
    if p["note"] is not None and uid in batch.states:
        batch.update_run(uid, note=p["note"])


def _ignore(batch: TableBatch, event: Event) -> None:
    """Events kept only in the events table (sweep requests)."""


FOLDS: dict[str, Callable[[TableBatch, Event], None]] = {
    "run_started": _run_started,
    "param": _param,
    "result": _result,
    "metric": _metric,
    "label": _label,
    "artifact": _artifact,
    "run_finished": _run_finished,
    "heartbeat": _heartbeat,
    "iteration_requested": _ignore,
    "log": _log,
    "run_amended": _run_amended,
    "run_deleted": _ignore,  # applied by the projector between events (see the module docstring)
    "run_restored": _ignore,
}


def _revive(batch: TableBatch, uid: str) -> None:
    """A run marked lost spoke again: it is running, its recorded end is cleared."""
    batch.states[uid] = "running"
    batch.update_run(uid, state="running", **dict.fromkeys(_FINISH_COLUMNS))


def fold_metric_columns(batch: TableBatch, columns: MetricColumns, position: int, partition: int,
                        offset: int) -> None:
    """Fold a record's metric events given as columns (their times checked as `check_event` checks
    them), exactly as `fold` folds each and the projector adds its events row: events rows at
    positions from `position`, and unless the run is hidden, metrics rows, the revival of a lost run
    and its last_event_at."""
    batch.event_columns.append((len(batch.events), (position, partition, offset, columns)))
    uid = columns.run_uid
    if uid in batch.hidden:
        return
    state = batch.states.get(uid)
    if state == "lost":
        _revive(batch, uid)
    batch.metric_columns.append((len(batch.metrics), columns))
    if state is not None:
        batch.touch(uid, max(columns.ts))


def fold(batch: TableBatch, event: Event) -> None:
    """Apply one event (checked by `check_event`) to the batch; it also touches its run's
    last_event_at, and revives a run marked lost unless it is a run_finished. Events of a hidden
    run are not applied."""
    uid = event.run_uid
    if uid in batch.hidden:
        return
    if event.type == "metric":  # most of a log: the general path below, inlined
        p = event.payload
        row = (uid, p["key"], p["step"], p["value"], p["timestamp"])
        state = batch.states.get(uid)
        if state == "lost":
            _revive(batch, uid)
        batch.metrics.append(row)
        if state is not None:
            batch.touch(uid, event.ts)
        return
    if event.type == "run_started" and event.payload["parent_uid"] in batch.deleted:
        batch.hidden.add(uid)
        batch.newly_hidden[uid] = event.payload["parent_uid"]
        return
    if event.type in EDIT_TYPES:
        FOLDS[event.type](batch, event)
        return
    if event.type not in ("run_started", "run_finished") and batch.states.get(event.run_uid) == "lost":
        _revive(batch, event.run_uid)
    FOLDS[event.type](batch, event)
    if event.type != "run_started" and event.run_uid in batch.states:
        batch.touch(event.run_uid, event.ts)
