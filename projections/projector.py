"""The projector: reads the bus from its stored positions and folds events into DuckDB.

Positions, per-run progress and the rows they produced commit in one DuckDB transaction, so a
projector killed at any point resumes exactly where its last commit left off. An event whose
(run uid, seq) was already applied is skipped, so replaying a record changes nothing.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import orjson

from producers.bus import Bus, BusRecord
from projections.database import connection_is_prepared, mark_prepared
from projections.fold import TableBatch, fold
from projections.replay import stored_events
from projections.tables import PROJECTION_VERSION, create_tables, drop_tables, stored_version
from projections.user import UserProjection
from projections.writer import write_batch
from schemas import DecodeError, Event, EventCodec


@contextmanager
def _gc_paused() -> Iterator[None]:
    """A batch allocates ~10 objects per event that all live until it commits; cyclic GC passes
    over them cost more than the fold itself, and they hold no cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class Progress:
    """How far the projector is: events applied in this call, and records still unread."""

    applied: int
    lag: int


class Projector:
    def __init__(self, bus: Bus, con: duckdb.DuckDBPyConnection, codec: EventCodec | None = None,
                 batch_size: int = 50_000, user_projections: Sequence[UserProjection] = (),
                 events_per_batch: int = 50_000) -> None:
        """`batch_size` caps the bus records per transaction, `events_per_batch` the events (a
        record holds one or more events of a run)."""
        self.bus = bus
        self.con = con
        self.codec = codec or EventCodec()
        self.batch_size = batch_size
        self.events_per_batch = events_per_batch
        # learnt from each batch; start from the writer's most (500) so a first read stays small
        self._events_per_record = 500.0
        self.user_projections = list(user_projections)
        if connection_is_prepared(con):
            return  # a reused connection: the tables were checked when it was opened
        con.execute("SET TimeZone = 'UTC'")
        version = stored_version(con)
        if version != PROJECTION_VERSION:
            if version is not None:
                self._drop_all()  # built by another version: fold the log again
            create_tables(con)
        for projection in self.user_projections:
            self._ensure_user_projection(projection)
        mark_prepared(con)

    def positions(self) -> dict[int, int]:
        return dict(self.con.execute("SELECT partition, next_offset FROM positions").fetchall())

    def run_once(self, timeout: float = 0.0) -> int:
        """Fold one batch of new records; returns how many records it consumed."""
        positions = self.positions()
        wanted = max(1, min(self.batch_size, int(self.events_per_batch / self._events_per_record)))
        records = self.bus.read(positions, wanted, timeout)
        if records:
            events = self._apply(records, positions)
            self._events_per_record = max(1.0, events / len(records))
        return len(records)

    def catch_up(self, on_progress: Callable[[Progress], None] | None = None) -> int:
        """Fold everything appended up to now; returns the number of records consumed."""
        target = self.bus.end_offsets()
        total = 0
        while True:
            positions = self.positions()
            remaining = sum(max(0, end - positions.get(p, 0)) for p, end in target.items())
            if on_progress:
                on_progress(Progress(total, remaining))
            if remaining == 0:
                return total
            consumed = self.run_once()
            if consumed == 0:
                return total
            total += consumed

    def rebuild(self, on_progress: Callable[[Progress], None] | None = None) -> int:
        """Drop every table (user projections' too) and fold the whole log again."""
        self.con.execute("BEGIN")
        self._drop_all()
        create_tables(self.con)
        for projection in self.user_projections:
            projection.create(self.con)
            self._set_user_version(projection)
        self.con.execute("COMMIT")
        return self.catch_up(on_progress)

    def apply_events(self, decoded: list[tuple[BusRecord, Event]]) -> None:
        """Fold already-decoded events (e.g. replayed from another projection); positions unchanged."""
        self._fold_and_commit(decoded, TableBatch(), self.positions())

    def _drop_all(self) -> None:
        for projection in self.user_projections:
            projection.drop(self.con)
        drop_tables(self.con)

    def _ensure_user_projection(self, projection: UserProjection) -> None:
        """Create a new user projection, or rebuild one of another version, from the events table."""
        key = f"user:{projection.name}"
        row = self.con.execute("SELECT value FROM projection_meta WHERE key = ?", [key]).fetchone()
        if row is not None and int(row[0]) == projection.version:
            projection.create(self.con)
            return
        self.con.execute("BEGIN")
        try:
            projection.drop(self.con)
            projection.create(self.con)
            for chunk in stored_events(self.con):
                projection.apply(self.con, [event for _, event in chunk])
            self._set_user_version(projection)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def _set_user_version(self, projection: UserProjection) -> None:
        self.con.execute("INSERT OR REPLACE INTO projection_meta VALUES (?, ?)",
                         [f"user:{projection.name}", str(projection.version)])

    def _apply(self, records: list[BusRecord], positions: dict[int, int]) -> int:
        with _gc_paused():
            return self._decode_and_fold(records, positions)

    def _decode_and_fold(self, records: list[BusRecord], positions: dict[int, int]) -> int:
        """Fold the records' events in one transaction; returns how many events they held."""
        batch = TableBatch()
        decoded = []
        received = time.time()
        for record in records:
            try:
                decoded.extend((record, event) for event in self.codec.decode_all(record.value))
            except DecodeError as exc:
                batch.dead_letters.append((record.partition, record.offset, record.key, str(exc),
                                           record.value, received))
        for record in records:
            positions[record.partition] = record.offset + 1
        self._fold_and_commit(decoded, batch, positions)
        return len(decoded)

    def _fold_and_commit(self, decoded: list[tuple[BusRecord, Event]], batch: TableBatch,
                         positions: dict[int, int]) -> None:
        accepted: list[Event] = []
        uids = list({event.run_uid for _, event in decoded})
        last_seq = self._last_seqs(uids)
        touched: set[tuple[str, str]] = set()
        position = self._next_position()
        for record, event in decoded:
            stream = (event.run_uid, event.stream)
            if event.seq <= last_seq.get(stream, -1):
                continue  # already applied (a replayed or pushed-twice record)
            last_seq[stream] = event.seq
            touched.add(stream)
            fold(batch, event)
            accepted.append(event)
            batch.events.append((position, record.partition, record.offset, event.event_id,
                                 event.run_uid, event.seq, event.type, event.ts,
                                 orjson.dumps(event.payload).decode(), event.stream))
            position += 1
        batch.positions = positions
        batch.run_progress = {stream: last_seq[stream] for stream in touched}
        batch.next_position = position
        con = self.con
        con.execute("BEGIN")
        try:
            write_batch(con, batch)
            for projection in self.user_projections:
                if accepted:
                    projection.apply(con, accepted)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _last_seqs(self, uids: list[str]) -> dict[tuple[str, str], int]:
        if not uids:
            return {}
        rows = self.con.execute("SELECT uid, stream, last_seq FROM run_progress WHERE uid IN "
                                "(SELECT unnest(?::VARCHAR[]))", [uids]).fetchall()
        return {(uid, stream): seq for uid, stream, seq in rows}

    def _next_position(self) -> int:
        row = self.con.execute("SELECT value FROM projection_meta WHERE key = 'next_position'").fetchone()
        return int(row[0]) if row else 0
