"""Reading folded events back out of the `events` table (time travel, user projection rebuilds)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from producers.bus import BusRecord
from schemas import Event

_CHUNK = 50_000


@dataclass(frozen=True, slots=True)
class StoredRecord(BusRecord):
    """The address of a folded event's record, with the events.position the event was stored at."""

    position: int = 0


def stored_events(con: duckdb.DuckDBPyConnection, where: str = "TRUE",
                  params: Sequence[Any] = ()) -> Iterator[list[tuple[BusRecord, Event]]]:
    """Chunks of (record address, event) from the events table, in position order.

    Reads through its own cursor, so the caller may write on `con` between chunks.
    """
    cursor = con.cursor().execute(
        f'SELECT position, partition, "offset", event_id, run_uid, seq, type, epoch(ts), payload, stream '
        f"FROM events WHERE {where} ORDER BY position", list(params))
    while rows := cursor.fetchmany(_CHUNK):
        yield [(StoredRecord(partition, offset, run_uid, b"", ts, position),
                Event(event_id, run_uid, seq, kind, ts, "", 0, json.loads(payload), stream=stream))
               for position, partition, offset, event_id, run_uid, seq, kind, ts, payload, stream in rows]


def events_of_runs(con: duckdb.DuckDBPyConnection, uids: Sequence[str],
                   chunk: int = _CHUNK) -> Iterator[list[tuple[BusRecord, Event]]]:
    """Chunks of the stored events of the runs `uids`, in position order, read on `con` itself
    (so inside the caller's transaction, seeing what it wrote), a page of `chunk` at a time."""
    after = -1
    while True:
        rows = con.execute(
            'SELECT position, partition, "offset", event_id, run_uid, seq, type, epoch(ts), payload, stream '
            "FROM events WHERE run_uid IN (SELECT unnest(?::VARCHAR[])) AND position > ? "
            "ORDER BY position LIMIT ?", [list(uids), after, chunk]).fetchall()
        if not rows:
            return
        after = rows[-1][0]
        yield [(StoredRecord(partition, offset, run_uid, b"", ts, position),
                Event(event_id, run_uid, seq, kind, ts, "", 0, json.loads(payload), stream=stream))
               for position, partition, offset, event_id, run_uid, seq, kind, ts, payload, stream in rows]
