"""The projector: reads the bus from its stored positions and folds events into DuckDB.

Positions, per-stream progress and the rows they produced commit in one DuckDB transaction, so a
projector killed at any point resumes exactly where its last commit left off.

The bus is untrusted, and the projector quarantines, never stops. Each event read is, exactly once:
- applied (`events` and the tables it folds into);
- a duplicate (`duplicates`): an event with the same event id already holds its place
  (run uid, stream, seq), e.g. a record appended twice;
- a conflict (`conflicts`, with the reason): a different event already holds its place, or the
  run was already started by another run_started;
- a dead letter (`dead_letters`, with the error and the event's identity): the event cannot be
  folded (see `fold.check_event`), or DuckDB refused its rows. When a batch fails to write, the
  projector bisects it in transactions it rolls back until it has the events DuckDB refuses, then
  commits the rest. A record that does not decode is one dead letter.
A dead-lettered event keeps its place, so its duplicate is a duplicate and another event at its
place a conflict, whatever the batch boundaries. An edit (run_deleted, run_restored, run_amended)
of a run with no run_started before it is a dead letter ("not known").

A record of metric events only comes as columns (see `Subscription(columns=True)`): when its run's
stream takes its events at places not taken, at times the tables hold, it is classified, folded and
written column-wise (no Python object per event), with exactly the rows its events would give one
by one. Anything else (a place taken or replayed, a bad time, an identity that is not plain ASCII, a
batch DuckDB refuses, user projections) goes event by event.

A run_deleted or run_restored ends a segment of its batch: the events before it are folded and
written, then it is applied (the run and its iterations hidden, or folded again from `events`),
then the events after it are folded, all in the batch's one transaction. So a rebuild, which
batches the log differently, gives the same tables.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import pairwise, repeat
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from producers.bus import Bus, BusRecord
from producers.subscription import Delivery, Subscription
from projections.database import connection_is_prepared, fallback_heartbeat_interval_s, mark_prepared
from projections.fold import (
    MAX_TS,
    MIN_TS,
    TableBatch,
    check_event,
    fold,
    fold_metric_columns,
    identity_problem,
    printable,
)
from projections.readonly import ARROW_TEXT
from projections.replay import StoredRecord, events_of_runs, stored_events
from projections.tables import (
    PROJECTION_VERSION,
    create_tables,
    drop_tables,
    has_running_runs,
    stored_version,
    write_runs_wide,
)
from projections.user import UserProjection
from projections.writer import delete_run, hide_runs, refresh_judgement, undelete_run, write_batch
from schemas import Event, EventCodec
from schemas.codec import MetricColumns
from schemas.events import EDIT_TYPES

_TOMBSTONES = ("run_deleted", "run_restored")  # applied between the events of a batch

# A rebuild folds the whole log at once, in batches of this many events: more than a DuckDB row
# group (122,880 rows), so each table's rows of a batch are written to the file as compressed row
# groups by the statement that appends them, not to the WAL and again at the next checkpoint, and
# each batch's fixed statements (runs, runs_wide, progress, positions) are shared by more events.
# Its cost is memory while the batch is alive: 1M metric events rebuilt peak at ~390 MB against
# ~285 MB in the live fold's 20,000-event batches (14.3-15.5 s -> 9.5-12.5 s on 2 cores).
REBUILD_EVENTS_PER_BATCH = 130_000
# The least events per record a read is sized by: a batch's records are read before they are
# decoded, so after one-event records their bytes would be those of events_per_batch records
_MIN_EVENTS_PER_RECORD_ESTIMATE = 25.0
_FIRST_EVENTS_PER_RECORD_ESTIMATE = 500.0  # the writer's most: a first read of a log stays small

# Errors that say the database or the machine is unwell, not an event: raised, never quarantined.
_NOT_POISON = (duckdb.IOException, duckdb.FatalException, duckdb.InternalException,
               duckdb.InterruptException, duckdb.OutOfMemoryException, duckdb.TransactionException,
               duckdb.PermissionException, MemoryError)

Key = tuple[str, str, int]  # (run uid, stream, seq): an event's place
Item = Event | MetricColumns  # one event, or a record's metric events as columns


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


@dataclass
class _Plan:
    """What becomes of each event of a batch, decided before anything is folded."""

    # with its payload JSON; a MetricColumns (no JSON: made when written) holds several events
    apply: list[tuple[BusRecord, Item, str | None]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # events.position of each item in `apply` (its first)
    dead_letters: list[tuple[Any, ...]] = field(default_factory=list)
    conflicts: list[tuple[Any, ...]] = field(default_factory=list)
    duplicates: list[tuple[Any, ...]] = field(default_factory=list)
    run_progress: dict[tuple[str, str], int] = field(default_factory=dict)
    run_starts: dict[str, tuple[str, str]] = field(default_factory=dict)


def _dead_letter(record: BusRecord, error: str, received: float, event: Event | None = None) -> tuple[Any, ...]:
    identity = ((event.event_id, event.run_uid, event.stream, event.seq, event.type)
                if event is not None else (None,) * 5)
    key = None if record.key is None else printable(record.key)
    return (record.partition, record.offset, key, printable(error), record.value, received, *identity)


# events.position = (record offset << 24) | (partition << 16) | the event's index in its record: where
# the event sits on the bus, so every rebuild (and every projector) gives it the same position, and
# `as_of=<position>` is the same cut of the log (each run's events are a prefix: a run's records share
# a key, so a partition). Records of partition >= 256 or events past the 65,536th of a record have no
# position: dead letters with that reason (the writer puts at most 500 events in a record).
_INDEX_BITS, _PARTITION_BITS = 16, 8
_UNPLACEABLE = (f"no events.position for it: partition >= {1 << _PARTITION_BITS} or more than "
                f"{1 << _INDEX_BITS} events in its record")


def event_position(partition: int, offset: int, index: int) -> int | None:
    """The events.position of the `index`-th event of the record at (partition, offset), or None
    when it cannot have one (see _UNPLACEABLE)."""
    if not (0 <= partition < 1 << _PARTITION_BITS and 0 <= index < 1 << _INDEX_BITS and offset >= 0):
        return None
    return (offset << (_INDEX_BITS + _PARTITION_BITS)) | (partition << _INDEX_BITS) | index


def _with_positions(decoded: list[tuple[BusRecord, Item]]) -> Iterator[tuple[BusRecord, Item, int | None]]:
    """Each event with its position: the one stored with it (replayed from the events table), or
    from its record's place and its index in the record (the record's events come together, in order).
    Metric columns come whole with their first event's position when each of their events has one,
    else event by event."""
    index, last, last_place, first = 0, None, None, None
    limit = 1 << _INDEX_BITS

    def place(record: BusRecord) -> int | None:
        nonlocal index, last, last_place, first
        if record is not last:  # the events of one record share its object: work out its place once
            last = record
            if isinstance(record, StoredRecord):
                first = None
            else:
                here = (record.partition, record.offset)
                index = index + 1 if here == last_place else 0
                last_place = here
                first = event_position(record.partition, record.offset, index)
                first = None if first is None else first - index
        else:
            index += 1
        if first is None:
            return (record.position if isinstance(record, StoredRecord)
                    else event_position(record.partition, record.offset, index))
        return first + index if index < limit else None

    for record, item in decoded:
        if not isinstance(item, MetricColumns):
            yield record, item, place(record)
            continue
        position = place(record)
        if position is not None and first is not None and index + len(item) <= limit:
            index += len(item) - 1
            yield record, item, position
            continue
        events = item.events()
        yield record, events[0], position
        for event in events[1:]:
            yield record, event, place(record)


def _one_by_one(decoded: list[tuple[BusRecord, Item]]) -> list[tuple[BusRecord, Item]]:
    """The items with every MetricColumns replaced by its events."""
    out: list[tuple[BusRecord, Item]] = []
    for record, item in decoded:
        if isinstance(item, MetricColumns):
            out.extend((record, event) for event in item.events())
        else:
            out.append((record, item))
    return out


def _plain_identity(columns: MetricColumns) -> bool:
    """True when every event id, the run uid and the stream are ASCII (identity_problem finds none)."""
    return (columns.run_uid + columns.stream).isascii() and "".join(columns.event_id).isascii()


def _increasing(seqs: list[int]) -> bool:
    return all(a < b for a, b in pairwise(seqs))


def _storable_times(values: list[float]) -> bool:
    """True when every value is a time the tables hold (check_event's test, for a column)."""
    # the sum is NaN when a value is (min and max would pass a NaN over)
    return min(values) >= MIN_TS and max(values) <= MAX_TS and not math.isnan(sum(values))


def _describe(exc: BaseException) -> str:
    """One line naming what refused the event."""
    lines = str(exc).strip().splitlines()
    return printable(f"{type(exc).__name__}: {lines[0] if lines else ''}")


class Projector:
    """Folds the bus into one DuckDB connection's tables, exactly once, quarantining what it cannot fold."""

    def __init__(self, bus: Bus, con: duckdb.DuckDBPyConnection, codec: EventCodec | None = None,
                 batch_size: int = 50_000, user_projections: Sequence[UserProjection] = (),
                 events_per_batch: int = 20_000) -> None:
        """`batch_size` caps the bus records per transaction, `events_per_batch` the events (a
        record holds one or more events of a run). The events of a batch are all alive until it
        commits (~3 KB each as Python objects): 20,000 keeps a projector near 300 MB at no
        measurable cost per event against 50,000."""
        self.bus = bus
        self.con = con
        self.codec = codec or EventCodec()
        self.batch_size = batch_size
        self.events_per_batch = events_per_batch
        self._events_per_record = _FIRST_EVENTS_PER_RECORD_ESTIMATE  # then learnt from each batch
        # what an event decoded as a Python object counts towards events_per_batch (~3-4 KB each,
        # against ~1.3 KB as metric columns): 1 in the live fold; a rebuild's larger batches are
        # sized for columns, so there it holds no more such events than a live batch
        self._object_cost = 1.0
        self.user_projections = list(user_projections)
        self.changes = 0  # commits that changed the tables: a snapshot begun before the last one is stale
        # what this projector last read or wrote of `positions` and the bus epoch: an idle projector
        # (the service's, polling every 0.1 s) then runs no DuckDB statement per poll. Only this
        # projector writes them on its connection; every write of its own forgets them first.
        self._known_positions: dict[int, int] | None = None
        self._known_epoch: str | None = None
        if connection_is_prepared(con):
            return  # a reused connection: the tables were checked when it was opened
        con.execute("SET TimeZone = 'UTC'")
        con.execute(ARROW_TEXT)
        version = stored_version(con)
        if version != PROJECTION_VERSION:
            if version is not None:
                self._drop_all()  # built by another version: fold the log again
            create_tables(con)
        for projection in self.user_projections:
            self._ensure_user_projection(projection)
        mark_prepared(con)

    def positions(self) -> dict[int, int]:
        """The bus positions the projection has folded up to (as last committed)."""
        if self._known_positions is None:
            self._known_positions = dict(self.con.execute("SELECT partition, next_offset FROM positions").fetchall())
        return dict(self._known_positions)

    def run_once(self, timeout: float = 0.0) -> int:
        """Fold one batch of new records (waiting up to `timeout` for the first); returns how many
        records it consumed. Reading starts at the positions the last commit stored, whatever an
        earlier call read and failed to commit."""
        self._follow_epoch()
        # metric records as columns, unless user projections want every event as an Event
        subscription = Subscription(self.bus, self.codec, self.positions(), columns=not self.user_projections)
        # the records to read, from the events per record seen last; after a stretch of one-event
        # records (heartbeats) a read is still at most 1/_MIN_ESTIMATE of events_per_batch records,
        # and decoding stops at events_per_batch events whatever the records hold
        estimate = max(self._events_per_record, _MIN_EVENTS_PER_RECORD_ESTIMATE)
        wanted = max(1, min(self.batch_size, int(self.events_per_batch / estimate)))
        with _gc_paused():  # decoding allocates the batch's events too
            deliveries = subscription.poll(wanted, timeout, max_events=self.events_per_batch,
                                           object_cost=self._object_cost)
            if not deliveries:
                return 0
            events = self._fold_deliveries(deliveries, subscription.positions)
        self._events_per_record = max(1.0, events / len(deliveries))
        return len(deliveries)

    def catch_up(self, on_progress: Callable[[Progress], None] | None = None) -> int:
        """Fold everything appended up to now; returns the number of records consumed."""
        self._follow_epoch()
        target = self.bus.end_offsets()
        total = 0
        while True:
            positions = self.positions()
            remaining = sum(max(0, end - positions.get(p, 0)) for p, end in target.items())
            if on_progress:
                on_progress(Progress(total, remaining))
            consumed = self.run_once() if remaining else 0
            if consumed == 0:
                self.judge_silent_runs()
                return total
            total += consumed

    def judge_silent_runs(self, now: float | None = None) -> None:
        """Show as 'lost' the running runs silent for 3 of their heartbeat intervals (at `now`),
        and as 'running' again those that spoke since."""
        if not has_running_runs(self.con):
            return  # at 100k runs each refresh below scans the runs table: skip it when none can change
        moment, fallback = time.time() if now is None else now, fallback_heartbeat_interval_s()
        # a live run keeps being judged: most turns change no run, and end no reader's kept session
        self.changes += refresh_judgement(self.con, moment, fallback) > 0

    def rebuild(self, on_progress: Callable[[Progress], None] | None = None,
                events_per_batch: int = REBUILD_EVENTS_PER_BATCH) -> int:
        """Drop every table (user projections' too) and fold the whole log again, in batches of up
        to `events_per_batch` events, each committed with its positions (`on_progress` is called
        between them: a stop it raises ends the rebuild there)."""
        self._reset()
        usual = self.events_per_batch
        self.events_per_batch = events_per_batch
        # what the live fold learnt says nothing of the log's start
        self._events_per_record = _FIRST_EVENTS_PER_RECORD_ESTIMATE
        self._object_cost = max(1.0, events_per_batch / usual)
        try:
            return self.catch_up(on_progress)
        finally:
            self.events_per_batch = usual
            self._object_cost = 1.0

    def _reset(self) -> None:
        """Drop every table (user projections' too) and create them empty, for the bus's epoch."""
        epoch = self._bus_epoch()
        self._known_positions = self._known_epoch = None
        self.con.execute("BEGIN")
        self._drop_all()
        create_tables(self.con)
        for projection in self.user_projections:
            projection.create(self.con)
            self._set_user_version(projection)
        if epoch is not None:
            self.con.execute("INSERT OR REPLACE INTO projection_meta VALUES ('bus_epoch', ?)", [epoch])
        self.con.execute("COMMIT")
        self.changes += 1

    def _bus_epoch(self) -> str | None:
        """The bus's epoch (see EmbeddedBus.epoch), or None for a bus whose records are never rewritten."""
        return self.bus.epoch()

    def _follow_epoch(self) -> None:
        """Start over (empty tables, positions 0) when the bus's records were rewritten (a purge)
        since this projection folded them; a projection that folded nothing only records the epoch."""
        epoch = self._bus_epoch()
        if epoch is None or epoch == self._known_epoch:
            return
        row = self.con.execute("SELECT value FROM projection_meta WHERE key = 'bus_epoch'").fetchone()
        if (row[0] if row else "") != epoch:
            if self.positions():
                self._reset()
            else:
                self.con.execute("INSERT OR REPLACE INTO projection_meta VALUES ('bus_epoch', ?)", [epoch])
        self._known_epoch = epoch

    def apply_events(self, decoded: list[tuple[BusRecord, Event]]) -> None:
        """Fold already-decoded events (e.g. replayed from another projection); positions unchanged."""
        self._fold_and_commit(decoded, self.positions())

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

    def _fold_deliveries(self, deliveries: list[Delivery], positions: dict[int, int]) -> int:
        """Fold the deliveries' events in one transaction that also stores `positions` (past them);
        a record that does not decode is one dead letter with its reason. Returns the events held."""
        decoded: list[tuple[BusRecord, Item]] = []
        undecodable = []
        received = time.time()
        events = 0
        for delivery in deliveries:
            if delivery.metrics is not None:
                decoded.append((delivery.record, delivery.metrics))
                events += len(delivery.metrics)
            elif delivery.error is None:
                decoded.extend(zip(repeat(delivery.record), delivery.events))
                events += len(delivery.events)
            else:
                undecodable.append(_dead_letter(delivery.record, delivery.error, received))
        self._fold_and_commit(decoded, positions, undecodable, received)
        return events

    def _fold_and_commit(self, decoded: list[tuple[BusRecord, Item]], positions: dict[int, int],
                         undecodable: Sequence[tuple[Any, ...]] = (), received: float | None = None) -> None:
        """Classify, fold and commit the events; events DuckDB refuses are found and quarantined."""
        received = time.time() if received is None else received
        self._known_positions = None  # this transaction may store new ones (or fail half-way)
        plan = self._classify(decoded, received)
        plan.dead_letters[:0] = undecodable
        quarantined: dict[int, str] = {}
        while True:
            try:
                self._commit(plan, quarantined, positions, received)
                # the positions table now holds these (they began as its rows): no SELECT next batch
                self._known_positions = dict(positions)
                return
            except Exception as exc:
                if isinstance(exc, _NOT_POISON):
                    raise
                if any(isinstance(item, MetricColumns) for _, item, _ in plan.apply):
                    # find what DuckDB refuses event by event: classify again without columns
                    plan = self._classify(_one_by_one(decoded), received)
                    plan.dead_letters[:0] = undecodable
                    continue
                found = self._find_poison(plan, quarantined)
                if not found:
                    raise
                quarantined.update(found)

    # classification ---------------------------------------------------------------------------

    def _classify(self, decoded: list[tuple[BusRecord, Item]], received: float) -> _Plan:
        plan = _Plan()
        placed: list[tuple[BusRecord, Item, int]] = []

        def admit(record: BusRecord, event: Event, position: int | None) -> None:
            problem = identity_problem(event) or (position is None and _UNPLACEABLE)
            if problem:  # cannot even be stored under its own name
                plan.dead_letters.append(_dead_letter(record, problem, received))
            else:
                placed.append((record, event, position))  # type: ignore[arg-type]

        for record, item, position in _with_positions(decoded):
            if not isinstance(item, MetricColumns):
                admit(record, item, position)
            elif _plain_identity(item):
                placed.append((record, item, position))  # type: ignore[arg-type]
            else:
                for offset, event in enumerate(item.events()):
                    admit(record, event, position + offset)  # type: ignore[operator]
        last_seq = self._last_seqs(list({item.run_uid for _, item, _ in placed}))
        valid: list[tuple[BusRecord, Item, int]] = []
        for record, item, position in placed:
            if isinstance(item, MetricColumns) and not (
                    item.seq[0] > last_seq.get((item.run_uid, item.stream), -1) and _increasing(item.seq)
                    and _storable_times(item.ts) and _storable_times(item.timestamp)):
                # a place it may find taken, or an event to dead-letter: event by event
                valid.extend((record, event, position + offset) for offset, event in enumerate(item.events()))
            else:
                valid.append((record, item, position))
        replayed = [event for _, event, _ in valid if isinstance(event, Event)
                    and event.seq <= last_seq.get((event.run_uid, event.stream), -1)]
        occupants = self._stored_occupants(replayed)
        starts = self._stored_starts([event.run_uid for _, event, _ in valid
                                      if event.type == "run_started" or event.type in EDIT_TYPES])
        conflicted = self._stored_conflicts(
            [event.event_id for _, event, _ in valid if event.type == "run_started"]  # type: ignore[union-attr]
            + [e.event_id for e in replayed])
        apply, applied_at, progress = plan.apply, plan.positions, plan.run_progress
        events: list[tuple[BusRecord, int, Event]] = []  # consecutive events, classified together
        for record, item, position in valid:
            if not isinstance(item, MetricColumns):
                events.append((record, position, item))
                continue
            self._classify_events(plan, events, received, occupants, conflicted, starts, last_seq)
            events = []
            stream = (item.run_uid, item.stream)
            if item.seq[0] > last_seq.get(stream, -1) and conflicted.isdisjoint(item.event_id):
                # places nobody took (seqs past the stream's last), ids in no conflict: all applied
                run_uid, stream_id = stream
                occupants.update(zip([(run_uid, stream_id, seq) for seq in item.seq], item.event_id, strict=True))
                last_seq[stream] = progress[stream] = item.seq[-1]
                apply.append((record, item, None))
                applied_at.append(position)
            else:
                self._classify_events(plan, [(record, at, event) for at, event in enumerate(item.events(), position)],
                                      received, occupants, conflicted, starts, last_seq)
        self._classify_events(plan, events, received, occupants, conflicted, starts, last_seq)
        return plan

    @staticmethod
    def _classify_events(plan: _Plan, events: list[tuple[BusRecord, int, Event]], received: float,
                         occupants: dict[Key, str], conflicted: set[str], starts: dict[str, tuple[str, str]],
                         last_seq: dict[tuple[str, str], int]) -> None:
        """Classify events (with their records and positions) against what the batch has seen so far
        (`occupants`, `conflicted`, `starts`, `last_seq`: updated)."""
        apply, applied_at, progress = plan.apply, plan.positions, plan.run_progress
        for record, position, event in events:
            key = (event.run_uid, event.stream, event.seq)
            if key in occupants or event.event_id in conflicted or event.type == "run_started":
                refused = _refusal(event, occupants.get(key), starts.get(event.run_uid))
                if refused == "":
                    plan.duplicates.append((record.partition, record.offset, event.event_id, event.run_uid,
                                            event.stream, event.seq, event.type, received))
                    continue
                if refused is not None and event.event_id not in conflicted:
                    conflicted.add(event.event_id)
                    plan.conflicts.append((record.partition, record.offset, event.event_id, event.run_uid,
                                           event.stream, event.seq, event.type, refused,
                                           _payload_text(event), received))
                    continue
                if refused is not None:  # the conflicting event again
                    plan.duplicates.append((record.partition, record.offset, event.event_id, event.run_uid,
                                            event.stream, event.seq, event.type, received))
                    continue
                if event.type == "run_started":
                    starts[event.run_uid] = plan.run_starts[event.run_uid] = (event.stream, event.event_id)
            occupants[key] = event.event_id
            stream = key[:2]
            if event.seq > last_seq.get(stream, -1):
                last_seq[stream] = progress[stream] = event.seq
            payload_json, problem = check_event(event)
            if event.type in EDIT_TYPES and event.run_uid not in starts:
                payload_json, problem = None, (f"run {printable(event.run_uid)} is not known: "
                                               f"no run_started before this {event.type}")
            if problem:
                plan.dead_letters.append(_dead_letter(record, problem, received, event))
            else:
                apply.append((record, event, payload_json))
                applied_at.append(position)

    def _stored_occupants(self, events: list[Event]) -> dict[Key, str]:
        """For places that may be taken already: the event id stored there (applied or dead)."""
        if not events:
            return {}
        keys = pa.table({"uid": [e.run_uid for e in events], "stream": [e.stream for e in events],
                         "seq": [e.seq for e in events]})
        rows = self._with_staged("_keys", keys, """
            SELECT e.run_uid, e.stream, e.seq, e.event_id FROM events e
            JOIN _keys k ON e.run_uid = k.uid AND e.stream = k.stream AND e.seq = k.seq
            UNION ALL
            SELECT d.run_uid, d.stream, d.seq, d.event_id FROM dead_letters d
            JOIN _keys k ON d.run_uid = k.uid AND d.stream = k.stream AND d.seq = k.seq""")
        return {(uid, stream, seq): event_id for uid, stream, seq, event_id in rows}

    def _stored_starts(self, uids: list[str]) -> dict[str, tuple[str, str]]:
        if not uids:
            return {}
        rows = self.con.execute("SELECT uid, stream, event_id FROM run_starts WHERE uid IN "
                                "(SELECT unnest(?::VARCHAR[]))", [uids]).fetchall()
        return {uid: (stream, event_id) for uid, stream, event_id in rows}

    def _stored_conflicts(self, event_ids: list[str]) -> set[str]:
        if not event_ids:
            return set()
        rows = self.con.execute("SELECT event_id FROM conflicts WHERE event_id IN "
                                "(SELECT unnest(?::VARCHAR[]))", [event_ids]).fetchall()
        return {row[0] for row in rows}

    def _with_staged(self, name: str, table: pa.Table, query: str) -> list[tuple[Any, ...]]:
        self.con.register(name, table)
        try:
            return self.con.execute(query).fetchall()
        finally:
            self.con.unregister(name)

    # folding and writing ----------------------------------------------------------------------

    def _commit(self, plan: _Plan, quarantined: dict[int, str], positions: dict[int, int],
                received: float) -> None:
        bookkeeping = {"dead_letters": list(plan.dead_letters), "conflicts": plan.conflicts,
                       "duplicates": plan.duplicates, "run_progress": plan.run_progress,
                       "run_starts": plan.run_starts, "positions": positions}
        self._apply(plan, quarantined, None, commit=True, bookkeeping=bookkeeping, received=received)

    def _apply(self, plan: _Plan, skipped: dict[int, str], only: Sequence[int] | None, commit: bool,
               bookkeeping: dict[str, Any] | None = None, received: float = 0.0) -> None:
        """Fold and write the plan's events (those in `only`, all but `skipped`) in one transaction,
        committed or rolled back; an event whose fold raises is added to `skipped`. Segments end at
        each run_deleted/run_restored, applied once the events before it are written. The last
        segment's batch carries `bookkeeping` (positions, progress, refused events) and the dead
        letters of the skipped events."""
        indices = range(len(plan.apply)) if only is None else only
        segments = _segments(plan, [i for i in indices if i not in skipped])
        con = self.con
        con.execute("BEGIN")
        try:
            for number, segment in enumerate(segments):
                last = number == len(segments) - 1
                batch = self._new_batch(**bookkeeping) if last and bookkeeping else self._new_batch()
                accepted = self._fold_into(batch, plan, skipped, only=segment)
                if last and bookkeeping is not None:
                    for index, error in sorted(skipped.items()):
                        record, event, _ = plan.apply[index]
                        batch.dead_letters.append(_dead_letter(record, error, received, event))
                self._write(batch, accepted)
                last_item = plan.apply[segment[-1]][1] if segment else None
                if isinstance(last_item, Event) and last_item.type in _TOMBSTONES and segment[-1] not in skipped:
                    self._apply_tombstone(last_item, plan.positions[segment[-1]])
        except BaseException:
            with suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        con.execute("COMMIT" if commit else "ROLLBACK")
        self.changes += commit

    def _apply_tombstone(self, event: Event, position: int) -> None:
        """Delete or restore the event's run (inside the batch's transaction)."""
        if event.type == "run_deleted":
            p = event.payload
            delete_run(self.con, event.run_uid, event.ts, p["by"], p["reason"], position)
        else:
            self._refold(undelete_run(self.con, event.run_uid))

    def _refold(self, uids: list[str]) -> None:
        """Fold the runs' stored events again (they hold no rows now), as they were first folded
        less the tombstones; user projections saw them once already and are not given them again."""
        if not uids:
            return
        for chunk in events_of_runs(self.con, uids):
            batch = self._new_batch()
            self._load_runs(batch, uids)
            self._load_log_lines(batch, uids)
            self._load_hidden(batch, [event for _, event in chunk])
            for _, event in chunk:
                if event.type not in _TOMBSTONES:
                    fold(batch, event)
            self._write(batch, [])

    @staticmethod
    def _new_batch(**rows: Any) -> TableBatch:
        return TableBatch(**rows, judged_at=time.time(), fallback_interval_s=fallback_heartbeat_interval_s())

    def _fold_into(self, batch: TableBatch, plan: _Plan, skipped: dict[int, str],
                   only: Sequence[int] | None = None) -> list[Event]:
        """Fold the plan's events (those in `only`, all but `skipped`); an event whose fold raises
        is added to `skipped`. Returns the events folded."""
        indices = range(len(plan.apply)) if only is None else only
        chosen = [i for i in indices if i not in skipped]
        self._load_runs(batch, list({plan.apply[i][1].run_uid for i in chosen}))
        self._load_log_lines(batch, list({plan.apply[i][1].run_uid for i in chosen if plan.apply[i][1].type == "log"}))
        self._load_hidden(batch, [plan.apply[i][1] for i in chosen])
        accepted = []
        for index in chosen:
            record, event, payload_json = plan.apply[index]
            if isinstance(event, MetricColumns):
                fold_metric_columns(batch, event, plan.positions[index], record.partition, record.offset)
                continue
            try:
                fold(batch, event)
            except Exception as exc:  # a shape check_event did not foresee
                skipped[index] = _describe(exc)
                continue
            accepted.append(event)
            batch.events.append((plan.positions[index], record.partition, record.offset, event.event_id,
                                 event.run_uid, event.seq, event.type, event.ts, payload_json, event.stream))
        return accepted

    def _write(self, batch: TableBatch, accepted: list[Event]) -> None:
        """Write the batch's rows (inside the caller's transaction) and give user projections its events."""
        con = self.con
        write_batch(con, batch)
        write_runs_wide(con, batch)
        _write_logs(con, batch)
        hide_runs(con, batch.newly_hidden)
        for projection in self.user_projections:
            if accepted:
                projection.apply(con, accepted)

    def _probe(self, plan: _Plan, indices: Sequence[int]) -> BaseException | None:
        """The error writing only these events gives, in a transaction rolled back; None if none."""
        try:
            self._apply(plan, {}, indices, commit=False)
        except Exception as exc:
            if isinstance(exc, _NOT_POISON):
                raise
            return exc
        return None

    def _find_poison(self, plan: _Plan, quarantined: dict[int, str]) -> dict[int, str]:
        """The events DuckDB refuses, by bisection; empty when the failure is not theirs."""
        candidates = [i for i in range(len(plan.apply)) if i not in quarantined]
        found: dict[int, str] = {}
        if self._probe(plan, []) is not None:
            return found  # writing nothing fails too: the database, not an event

        def search(indices: list[int]) -> None:
            error = self._probe(plan, indices)
            if error is None:
                return
            if len(indices) == 1:
                found[indices[0]] = _describe(error)
                return
            middle = len(indices) // 2
            search(indices[:middle])
            search(indices[middle:])

        search(candidates)
        return found

    def _load_runs(self, batch: TableBatch, uids: list[str]) -> None:
        """The stored state (as folded: not the derived 'lost') and own stream of each run that has
        a row, into the batch."""
        if not uids:
            return
        rows = self.con.execute("SELECT uid, state, stream FROM run_rows WHERE uid IN "
                                "(SELECT unnest(?::VARCHAR[]))", [uids]).fetchall()
        for uid, state, stream in rows:
            batch.states[uid] = state
            batch.owners[uid] = stream

    def _load_hidden(self, batch: TableBatch, events: Sequence[Event]) -> None:
        """Which of the events' runs are hidden, and which parents of the runs they start are
        deleted, into the batch."""
        uids = list({event.run_uid for event in events})
        parents = list({event.payload["parent_uid"] for event in events
                        if event.type == "run_started" and event.payload["parent_uid"] is not None})
        rows = self.con.execute(
            "SELECT uid, false FROM hidden_runs WHERE uid IN (SELECT unnest(?::VARCHAR[])) "
            "UNION ALL SELECT uid, true FROM deleted_runs WHERE uid IN (SELECT unnest(?::VARCHAR[]))",
            [uids, parents]).fetchall()
        for uid, deleted in rows:
            (batch.deleted if deleted else batch.hidden).add(uid)

    def _load_log_lines(self, batch: TableBatch, uids: list[str]) -> None:
        """How many lines each run's log holds so far (its next line number), into the batch."""
        if not uids:
            return
        rows = self.con.execute("SELECT uid, lines FROM log_progress WHERE uid IN "
                                "(SELECT unnest(?::VARCHAR[]))", [uids]).fetchall()
        batch.log_lines.update(dict(rows))

    def _last_seqs(self, uids: list[str]) -> dict[tuple[str, str], int]:
        if not uids:
            return {}
        rows = self.con.execute("SELECT uid, stream, last_seq FROM run_progress WHERE uid IN "
                                "(SELECT unnest(?::VARCHAR[]))", [uids]).fetchall()
        return {(uid, stream): seq for uid, stream, seq in rows}


def _segments(plan: _Plan, chosen: list[int]) -> list[list[int]]:
    """`chosen` cut after each run_deleted/run_restored (at least one segment, maybe empty)."""
    segments: list[list[int]] = [[]]
    for index in chosen:
        segments[-1].append(index)
        if plan.apply[index][1].type in _TOMBSTONES:
            segments.append([])
    if len(segments) > 1 and not segments[-1]:
        segments.pop()
    return segments


def _write_logs(con: duckdb.DuckDBPyConnection, batch: TableBatch) -> None:
    """The batch's console lines into `logs`, and each run's line count (inside the transaction)."""
    if not batch.logs:
        return
    columns = list(zip(*batch.logs, strict=True))
    lines = pa.table({"uid": columns[0], "stream": columns[1], "line_no": columns[2], "ts": columns[3],
                      "text": columns[4]})
    counts = pa.table({"uid": list(batch.log_lines), "lines": list(batch.log_lines.values())})
    con.register("_logs", lines)
    con.register("_log_progress", counts)
    try:
        con.execute("INSERT INTO logs SELECT uid, stream, line_no, to_timestamp(ts), text FROM _logs")
        con.execute("INSERT OR REPLACE INTO log_progress SELECT * FROM _log_progress")
    finally:
        for name in ("_logs", "_log_progress"):
            with suppress(duckdb.Error):  # an aborted transaction refuses it too
                con.unregister(name)


def _refusal(event: Event, occupant: str | None, started: tuple[str, str] | None) -> str | None:
    """Why the event cannot take its place: "" for an exact duplicate, the reason of a conflict,
    or None when it may."""
    if occupant == event.event_id or (event.type == "run_started" and started and started[1] == event.event_id):
        return ""
    if occupant is not None:
        return printable(f"seq {event.seq} of stream {event.stream!r} of run {event.run_uid} "
                         f"already holds event {occupant}")
    if event.type == "run_started" and started is not None:
        return printable(f"run {event.run_uid} was already started by event {started[1]} "
                         f"on stream {started[0]!r}")
    return None


def _payload_text(event: Event) -> str:
    """The payload as text for the conflicts table, whatever it holds (surrogates escaped)."""
    try:
        return orjson.dumps(event.payload).decode()
    except TypeError:
        return printable(repr(event.payload))
