"""Writing events straight to the bus, as a foreign producer would: no SDK validation at all."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import duckdb

from producers.bus import Bus, BusRecord
from schemas import SCHEMA_VERSION, EventCodec

CODEC = EventCodec()
PLACEHOLDER = "@@@"  # three bytes, swapped for three other bytes after encoding


def envelope(run_uid: str, seq: int, kind: str, payload: dict[str, Any], stream: str = "own",
             ts: float | None = None, event_id: str | None = None) -> dict[str, Any]:
    """An event in the codec's envelope form."""
    return {"event_id": event_id or uuid.uuid4().hex, "run_uid": run_uid, "seq": seq, "stream": stream,
            "type": kind, "ts": time.time() if ts is None else ts, "host": "elsewhere", "pid": 1,
            "schema_version": SCHEMA_VERSION, "payload": (EventCodec.record_name(kind), payload)}


def started(name: str = "foreign", interval_s: float | None = None, **fields: Any) -> dict[str, Any]:
    """A run_started payload."""
    return {"name": name, "project": "default", "handler": "nowhere:nothing", "runtime": "local",
            "params": {}, "inputs": {}, "input_digests": {}, "secret_keys": [], "labels": {},
            "parent_uid": None, "iteration": 0, "host": "elsewhere", "code_ref": None, "extra": {},
            "heartbeat_interval_s": interval_s, **fields}


def finished(state: str = "completed", **fields: Any) -> dict[str, Any]:
    """A run_finished payload."""
    return {"state": state, "error": None, "traceback": None, "return_value": None, "duration_s": 1.0,
            **fields}


def result(key: str, value_json: str) -> dict[str, Any]:
    return {"key": key, "value": value_json}


def metric(key: str, value: float, timestamp: float | None = None, step: int | None = None) -> dict[str, Any]:
    return {"key": key, "value": value, "step": step, "timestamp": time.time() if timestamp is None else timestamp}


def append(bus: Bus, key: str, records: Sequence[dict[str, Any]] | bytes) -> BusRecord:
    """Append one bus record (a batch of envelopes, or raw bytes); returns it as stored."""
    value = records if isinstance(records, bytes) else CODEC.encode_batch(list(records))
    before = bus.end_offsets()
    bus.append([(key, value)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for record in bus.read(before, 10_000, timeout=0.5):
            if record.key == key and record.value == value:
                return record
    raise AssertionError(f"the record appended under key {key!r} never showed up on the bus")


def with_bytes(records: Sequence[dict[str, Any]], replacement: bytes) -> bytes:
    """The encoded batch with the placeholder's bytes replaced (e.g. by invalid UTF-8)."""
    data = CODEC.encode_batch(list(records))
    assert data.count(PLACEHOLDER.encode()) == 1 and len(replacement) == len(PLACEHOLDER)
    return data.replace(PLACEHOLDER.encode(), replacement)


ACCOUNTING = """
    SELECT (SELECT count(*) FROM events) AS applied, (SELECT count(*) FROM duplicates) AS duplicates,
           (SELECT count(*) FROM conflicts) AS conflicts, (SELECT count(*) FROM dead_letters) AS dead
"""


def accounting(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """How many events were applied, skipped as duplicates, refused as conflicts, dead-lettered."""
    row = con.execute(ACCOUNTING).fetchone()
    assert row is not None
    return dict(zip(("applied", "duplicates", "conflicts", "dead"), row, strict=True))
