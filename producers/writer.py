"""Background writer: takes events from job threads and appends them to the bus in batches.

Each bus record holds up to `events_per_record` consecutive events of one run (keyed by its uid),
and at most about `max_record_bytes` unless a single event is larger.

A job thread only validates and enqueues (a few microseconds). The writer thread stamps each
event with its id and producer, encodes it and appends a batch at least every `flush_interval_s`.
A crash loses at most the events enqueued since the last append (<= one interval, by default
200 ms); `flush()` and a normal interpreter exit lose nothing.

Nothing is dropped silently. While the bus is away (a transient error) the writer retries; a bus
that refuses for good (BusRefused: permission, read-only log, authorization, record too large)
gets no more appends: the records go to the writer's spill file, and the next writer that starts on
that bus delivers them (so does `deliver_spill`, or this writer once the bus takes its spill again).
An event that does not fit its schema (a bug: the calls validate) is kept as JSON in the spill
folder. Either way `flush()` raises EventsNotWritten, so the run that waits for its events learns it.
Heartbeats jump the queue (they travel on a stream of their own), so a backlog does not silence them.

Memory is bounded: `wait_for_room` holds callers back while more than `max_pending` events, or
events carrying more than `max_pending_text` characters of console output, are queued.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any

from producers.bus.base import Bus, BusError, BusRefused
from producers.spill import SpillDelivery, SpillFile, bus_target, deliver_spill
from schemas import SCHEMA_VERSION, EventCodec
from schemas.codec import MetricColumns
from schemas.events import RECORD_OF_TYPE

log = logging.getLogger("runbus.writer")

_RETRY_MAX_S = 5.0
_SPILL_RETRY_S = 30.0  # how often a writer whose bus refused tries to hand it the spill again
_RECENT_PROBLEMS = 20


class EventsNotWritten(BusError):
    """Events a caller waited for are not on the bus: kept in a spill file, or still queued."""


class _GiveUp(Exception):
    """close() stopped waiting for the bus: keep the batch in the spill file."""


_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


def _orphan_writers_in_child() -> None:
    """A forked child has none of its parent's writer threads: their writers refuse events there
    (with an error rather than queueing them for nobody) and their exit hooks do nothing."""
    for writer in list(_writers):
        writer._closed = True
        writer._closed_why = (f"the event writer of process {writer._pid} cannot be used in its forked child "
                              f"{os.getpid()}: the child needs a writer of its own")
        atexit.unregister(writer.close)


_paused: list[threading.Lock] = []


def _pause_appends() -> None:
    _paused[:] = [writer._appending for writer in list(_writers)]
    for lock in _paused:
        lock.acquire()


def _resume_appends() -> None:
    for lock in _paused:
        lock.release()
    _paused.clear()


def _resume_appends_in_child() -> None:
    _resume_appends()
    _orphan_writers_in_child()


os.register_at_fork(before=_pause_appends, after_in_parent=_resume_appends, after_in_child=_resume_appends_in_child)


class _FlushMarker:
    __slots__ = ("done", "problem", "since")

    def __init__(self, since: int) -> None:
        self.done = threading.Event()
        self.since = since  # how many problems were known when the flush was asked for
        self.problem: str | None = None


# A metric's payload as (key, value, step, timestamp): a queued metric event carries it flattened
# (see _Item), a tuple of atoms, which the cyclic GC stops tracking at its first pass. A payload
# dict would keep the queued item tracked, and every collection would walk the backlog (it was
# a third of a producer's CPU).
MetricPoint = tuple[str, float, int | None, float]
# A queued event: (run uid, seq, type, ts, stream, characters of text it carries (for the memory
# bound), payload dict), or for a metric given as its point (run uid, seq, "metric", ts, stream,
# 0, key, value, step, timestamp).
_Item = tuple[Any, ...]
_POINT = 6  # where an item's payload, or its metric point, begins
_run_and_stream = itemgetter(0, 4)
_run_of = itemgetter(0)

_UUID_BYTES = 16
# byte 6 of a uuid4 holds its version (4) in the high nibble, byte 8 its variant (10xx) in the high bits
_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_RFC = bytes((b & 0x3F) | 0x80 for b in range(256))


def event_ids(count: int) -> list[str]:
    """`count` random uuid4 ids as 32-character hex (what uuid.uuid4().hex gives), from one
    os.urandom call: a call and a UUID object per event cost more than encoding the event."""
    raw = bytearray(os.urandom(_UUID_BYTES * count))
    raw[6::_UUID_BYTES] = raw[6::_UUID_BYTES].translate(_VERSION_4)
    raw[8::_UUID_BYTES] = raw[8::_UUID_BYTES].translate(_VARIANT_RFC)
    text = raw.hex()
    width = 2 * _UUID_BYTES
    return [text[start:start + width] for start in range(0, len(text), width)]


class BackgroundWriter:
    """One per process and bus; shared by every run in the process."""

    def __init__(self, bus: Bus, codec: EventCodec | None = None, flush_interval_s: float = 0.2,
                 max_batch: int = 20_000, max_pending: int = 1_000_000,
                 heartbeat_interval_s: float = 5.0, events_per_record: int = 500,
                 spill_dir: Path | None = None, flush_timeout_s: float = 120.0,
                 max_record_bytes: int = 768 * 1024, max_pending_text: int = 8 * 1024 * 1024) -> None:
        self.bus = bus
        self._codec = codec or EventCodec()
        self._interval = flush_interval_s
        self._max_batch = max_batch
        # Several events of one run per bus record: a Kafka record costs tens of microseconds in
        # kafka-python whatever its size, so one per event would cap throughput.
        self._events_per_record = events_per_record
        self._max_record_bytes = max_record_bytes
        self._max_pending = max_pending
        self._max_pending_text = max_pending_text
        self._pending_text = 0  # characters in queued events that declared them (console output)
        self._text_lock = threading.Lock()
        self.flush_timeout_s = flush_timeout_s
        self._pending: deque[Any] = deque()
        self._urgent: deque[_Item] = deque()  # heartbeats: appended ahead of any backlog
        self._wake = threading.Event()
        self._give_up = threading.Event()
        self._closed = False
        self._closed_why = "the event writer is closed"
        # held while the bus appends (its C code runs without the GIL): a fork waits for it, so no
        # child starts with a copy of the bus library's locks held by a thread it does not have
        self._appending = threading.Lock()
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self.heartbeat_interval_s = heartbeat_interval_s
        self._beating: dict[str, Callable[[], None]] = {}
        self._tickers: dict[str, Callable[[], None]] = {}
        self._retrying = 0  # records of the batch being retried against an unreachable bus
        self._last_error: str | None = None  # the bus's last transient failure
        self._refused: str | None = None  # why the bus refuses for good; records go to the spill meanwhile
        self._next_spill_retry = 0.0
        self._last_spill_reason: str | None = None
        self._spill = SpillFile(spill_dir, bus_target(bus))
        self._problems = 0  # events kept off the bus (spilled, unencodable) or writer failures so far
        self._recent_problems: deque[str] = deque(maxlen=_RECENT_PROBLEMS)
        self._next_beat = time.monotonic() + heartbeat_interval_s
        self.delivered_spill = SpillDelivery()
        self._thread = threading.Thread(target=self._run, name="runbus-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        _writers.add(self)

    # -- job threads ------------------------------------------------------------------------------

    def emit(self, run_uid: str, seq: int, event_type: str, payload: dict[str, Any] | MetricPoint,
             ts: float | None = None, stream: str = "", *, wait: bool = True, urgent: bool = False,
             text_chars: int = 0) -> None:
        """Queue one event of `stream` (see `Event`); the caller has validated the payload. A
        metric's payload may be given as its MetricPoint (the cheaper form: see `MetricPoint`).

        `urgent` events (heartbeats, on a stream of their own) are appended ahead of the queue.
        `text_chars` is how much text the payload carries (console output counts towards
        `max_pending_text`). With `wait`, a full queue makes the caller wait for room afterwards
        (see `wait_for_room`)."""
        if self._closed:
            raise RuntimeError(self._closed_why)
        if event_type not in RECORD_OF_TYPE:
            raise ValueError(f"unknown event type {event_type!r}")
        if ts is None:
            ts = time.time()
        if type(payload) is not tuple:
            item = (run_uid, seq, event_type, ts, stream, text_chars, payload)
        elif event_type == "metric" and len(payload) == 4:
            key, value, step, timestamp = payload
            item = (run_uid, seq, event_type, ts, stream, text_chars, key, value, step, timestamp)
        else:
            raise TypeError(f"the payload of a {event_type} event must be a dict (or for a metric, its "
                            f"(key, value, step, timestamp)), not a tuple of {len(payload)}")
        if text_chars:
            with self._text_lock:
                self._pending_text += text_chars
        if urgent:
            self._urgent.append(item)
            return
        self._pending.append(item)
        if wait:
            self.wait_for_room()

    def wait_for_room(self) -> None:
        """Block while the queue holds more than `max_pending` events (or `max_pending_text`
        characters of console output), until it is half empty.

        Call it holding no lock the writer thread may need (heartbeats). EventsNotWritten when the
        bus takes nothing for `flush_timeout_s`."""
        if ((len(self._pending) <= self._max_pending and self._pending_text <= self._max_pending_text)
                or threading.current_thread() is self._thread):
            return
        self._wake.set()
        deadline = time.monotonic() + self.flush_timeout_s
        while ((len(self._pending) > self._max_pending // 2 or self._pending_text > self._max_pending_text // 2)
               and self._thread.is_alive()):
            if time.monotonic() > deadline:
                raise EventsNotWritten(f"the bus {self.bus.url} took too few events for {self.flush_timeout_s:g}s "
                                       f"and {len(self._pending)} are queued ({self._last_error or 'slow bus'}); "
                                       f"the event was not logged")
            time.sleep(0.001)

    def track(self, run_uid: str, beat: Callable[[], None]) -> None:
        """Call `beat` (which emits the run's heartbeat) every `heartbeat_interval_s` until `untrack`."""
        self._beating[run_uid] = beat

    def untrack(self, run_uid: str) -> None:
        self._beating.pop(run_uid, None)

    def every_interval(self, key: str, tick: Callable[[], None]) -> None:
        """Call `tick` on the writer thread before each batch (at least every `flush_interval_s`)
        until `stop_interval(key)`. It must not block: a run's buffered console output uses it."""
        self._tickers[key] = tick

    def stop_interval(self, key: str) -> None:
        self._tickers.pop(key, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every event queued before this call is on the bus; False on timeout.

        EventsNotWritten when some of them could not be appended (kept in the spill file instead)."""
        if self._closed and not self._thread.is_alive():
            raise EventsNotWritten(self._closed_why)
        marker = _FlushMarker(self._problems)
        self._pending.append(marker)
        self._wake.set()
        if not marker.done.wait(timeout):
            return False
        if marker.problem:
            raise EventsNotWritten(marker.problem)
        return True

    def sync(self, what: str) -> None:
        """`flush()` bounded by `flush_timeout_s`; EventsNotWritten naming the cause on timeout."""
        if not self.flush(self.flush_timeout_s):
            raise EventsNotWritten(
                f"the bus {self.bus.url} has not taken {what} within {self.flush_timeout_s:g}s "
                f"({self._last_error or 'no error yet: a slow bus'}); they stay queued and are retried, "
                f"and what is unwritten when the process exits is kept in the spill file")

    def close(self, timeout_s: float = 120.0) -> None:
        """Flush and stop the writer thread. If the bus stays unreachable for `timeout_s`, what is
        not written is kept in the spill file (and logged) instead of hanging the process forever."""
        if self._closed:
            return
        flushed = self._quiet_flush(timeout_s)
        if not flushed:
            queued = sum(1 for item in self._pending if not isinstance(item, _FlushMarker))
            retrying = self._retrying
            self._give_up.set()
            self._quiet_flush(30.0)
            log.error("the bus %s was unreachable for %gs: %d queued events and %d bus records being "
                      "retried were kept in %s", self.bus.url, timeout_s, queued, retrying,
                      self._spill.path or "memory (no spill folder): they are lost")
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10 if flushed else 0.1)
        self._spill.close()
        atexit.unregister(self.close)

    def _quiet_flush(self, timeout: float) -> bool:
        try:
            return self.flush(timeout)
        except EventsNotWritten as exc:
            log.error("%s", exc)
            return True

    # -- the writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        self._deliver_earlier_spills()
        while not (self._closed and not self._pending and not self._urgent):
            self._wake.wait(min(self._interval, self.heartbeat_interval_s))
            self._wake.clear()
            try:
                self._drain()
            except Exception as exc:  # a bug (in a heartbeat or the spill retry): keep the thread alive
                log.exception("the event writer failed")
                self._problem(f"the event writer failed: {type(exc).__name__}: {exc}")

    def _deliver_earlier_spills(self) -> None:
        """Hand the bus what earlier writers on it could not (their spill files)."""
        if self._spill.folder is None:
            return
        try:
            with self._appending:
                self.delivered_spill = deliver_spill(self._spill.folder, self.bus)
        except Exception as exc:  # the bus refuses still: the files stay for the next start
            log.warning("spill files in %s are not delivered yet: %s", self._spill.folder, exc)

    def _beat(self) -> None:
        if not self._beating or time.monotonic() < self._next_beat:
            return
        self._next_beat = time.monotonic() + self.heartbeat_interval_s
        for beat in list(self._beating.values()):
            try:
                beat()
            except Exception:  # a heartbeat must never stop the writer
                log.exception("a heartbeat failed")

    def _tick(self) -> None:
        for tick in list(self._tickers.values()):
            try:
                tick()
            except Exception:  # a tick must never stop the writer
                log.exception("a writer tick failed")

    def _drain(self) -> None:
        while True:
            self._beat()  # between batches too: a backlog must not silence the heartbeats
            self._tick()
            self._retry_spill()
            if not (self._pending or self._urgent):
                return
            items, markers = self._take()
            try:
                self._write(items)
            except Exception as exc:  # a bug: say so at the flush that waits for these events
                log.exception("the event writer failed")
                self._problem(f"{len(items)} events were not written: the event writer failed: "
                              f"{type(exc).__name__}: {exc}")
            for marker in markers:
                new = self._problems - marker.since
                if new:
                    more = f" (and {new - 1} more problems: see the runbus.writer log)" if new > 1 else ""
                    marker.problem = self._recent_problems[-min(new, len(self._recent_problems))] + more
                marker.done.set()

    def _take(self) -> tuple[list[_Item], list[_FlushMarker]]:
        """The next batch: the urgent events, then up to `max_batch` queued ones, ending at the
        first flush marker (which is returned, to be set once the batch is written)."""
        urgent, pending = self._urgent, self._pending
        items: list[Any] = [urgent.popleft() for _ in range(len(urgent))]
        # only this thread takes from the queues; job threads append meanwhile
        taken = [pending.popleft() for _ in range(min(len(pending), self._max_batch))]
        markers: list[_FlushMarker] = []
        for at, item in enumerate(taken):
            if type(item) is _FlushMarker:
                markers.append(item)
                pending.extendleft(reversed(taken[at + 1:]))  # after the marker: the next batch's
                del taken[at:]
                break
        items += taken
        if self._pending_text:  # only console output declares text
            text = sum(item[5] for item in items)
            if text:
                with self._text_lock:
                    self._pending_text -= text
        return items, markers

    def _problem(self, message: str, logged: bool = True) -> None:
        if logged:
            log.error("%s", message)
        self._problems += 1
        self._recent_problems.append(message)

    def _write(self, items: list[_Item]) -> None:
        records = self._encode(items)
        if not records:
            return
        if self._refused is None:
            try:
                self._append_with_retry(records)
                return
            except BusRefused as exc:
                self._refused = str(exc)
                self._next_spill_retry = time.monotonic() + _SPILL_RETRY_S
                log.error("the bus refuses writes for good: %s; events go to the spill file", exc)
            except _GiveUp:
                pass
        self._keep(records, self._refused or f"the bus stayed unreachable ({self._last_error})")

    def _encode(self, items: list[_Item]) -> list[tuple[str, bytes]]:
        """The events as bus records (run uid, bytes): each run's events in order, cut where the
        stream changes (heartbeats travel on a stream of their own) and every `events_per_record`
        events (a columnar record, see EventCodec.encode_batch); runs in the order they came."""
        runs = dict.fromkeys(map(_run_of, items))
        if len(runs) > 1:
            rank = {run_uid: at for at, run_uid in enumerate(runs)}
            items = sorted(items, key=lambda item: rank[item[0]])  # stable: a run's events keep their order
        encoded: list[tuple[str, bytes]] = []
        size = self._events_per_record
        for (run_uid, _), segment in groupby(items, key=_run_and_stream):
            events = list(segment)
            for start in range(0, len(events), size):
                chunk = events[start:start + size]
                if not self._encode_points(chunk, encoded):
                    # a chunk's records at a time: they are GC-tracked, so they should die young
                    self._encode_chunk(run_uid, self._records(chunk), encoded)
        return encoded

    def _encode_points(self, chunk: list[_Item], out: list[tuple[str, bytes]]) -> bool:
        """Encode a chunk of metric points (one run's, one stream's) straight from its columns, with
        no record per event; False (nothing added) when it holds another event, does not encode or
        is too large: the records path then halves it or keeps what does not encode."""
        if any(len(item) != _POINT + 4 for item in chunk):
            return False
        _, seqs, _, stamps, _, _, keys, values, steps, timestamps = zip(*chunk, strict=True)
        run_uid, stream = chunk[0][0], chunk[0][4]
        columns = MetricColumns(run_uid, stream, self._host, self._pid, SCHEMA_VERSION, event_ids(len(chunk)),
                                list(seqs), list(stamps), list(keys), list(values), list(steps), list(timestamps))
        try:
            data = self._codec.encode_metric_columns(columns)
        except ValueError:
            return False
        if len(data) > self._max_record_bytes:
            return False
        out.append((run_uid, data))
        return True

    def _records(self, chunk: list[_Item]) -> list[dict[str, Any]]:
        """The events of `chunk` as Avro records (envelope form), each with a new event id."""
        host, pid, version, names = self._host, self._pid, SCHEMA_VERSION, RECORD_OF_TYPE
        return [{"event_id": event_id, "run_uid": item[0], "seq": item[1], "stream": item[4], "type": item[2],
                 "ts": item[3], "host": host, "pid": pid, "schema_version": version,
                 "payload": (names[item[2]], item[_POINT] if len(item) == _POINT + 1 else  # else a metric point
                             {"key": item[6], "value": item[7], "step": item[8], "timestamp": item[9]})}
                for item, event_id in zip(chunk, event_ids(len(chunk)), strict=True)]

    def _encode_chunk(self, run_uid: str, chunk: list[dict[str, Any]], out: list[tuple[str, bytes]]) -> None:
        try:
            data = self._codec.encode_batch(chunk)
        except ValueError as exc:
            if len(chunk) == 1:  # validated at the call, so a bug: keep it and say so
                self._keep_unencodable(run_uid, chunk[0], exc)
                return
        else:
            if len(data) <= self._max_record_bytes or len(chunk) == 1:
                out.append((run_uid, data))
                return
        half = len(chunk) // 2  # too large, or one event in it does not encode: halve, keep the order
        self._encode_chunk(run_uid, chunk[:half], out)
        self._encode_chunk(run_uid, chunk[half:], out)

    def _keep_unencodable(self, run_uid: str, record: dict[str, Any], exc: Exception) -> None:
        try:
            where = self._spill.keep_unencodable(record, str(exc))
        except OSError as error:
            where = f"nowhere ({error}): it is lost"
        message = (f"event {record['type']} #{record['seq']} of run {run_uid} does not fit its schema "
                   f"({exc}); it is kept in {where}")
        self._problem(message)

    def _append_with_retry(self, batch: list[tuple[str, bytes]]) -> None:
        """Keep trying: the events are the truth, and the bus may come back (broker restart).

        BusRefused (retrying cannot help) and _GiveUp (close() stopped waiting) end the retries."""
        delay = 0.05
        self._retrying = len(batch)
        try:
            while True:
                try:
                    with self._appending:
                        self.bus.append(batch)
                    self._last_error = None
                    return
                except BusRefused:
                    raise
                except Exception as exc:  # any other bus failure: retry, never drop
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    if self._give_up.is_set():
                        raise _GiveUp from exc
                    log.warning("appending %d records failed (%s); retrying in %.2fs", len(batch), exc, delay)
                    self._give_up.wait(delay)
                    delay = min(delay * 2, _RETRY_MAX_S)
        finally:
            self._retrying = 0

    def _keep(self, records: list[tuple[str, bytes]], reason: str) -> None:
        runs = sorted({run_uid for run_uid, _ in records})
        try:
            where = self._spill.keep(records)
        except OSError as exc:
            self._problem(f"{len(records)} bus records of run(s) {', '.join(runs)} are lost: the bus refused "
                          f"them ({reason}) and the spill file cannot be written ({exc})")
            return
        message = (f"events of run(s) {', '.join(runs)} are not on the bus ({reason}); "
                   f"they are kept in {where} and delivered by the next writer that starts on this bus")
        # one line per cause in the log, not one per batch while the bus refuses
        self._problem(message, logged=reason != self._last_spill_reason)
        self._last_spill_reason = reason

    def _retry_spill(self) -> None:
        """While the bus refuses, hand it the spill now and then; once it takes it, append as usual."""
        if self._refused is None or time.monotonic() < self._next_spill_retry:
            return
        self._next_spill_retry = time.monotonic() + _SPILL_RETRY_S
        try:
            with self._appending:
                delivered = self._spill.redeliver(self.bus)
        except Exception as exc:
            log.warning("the bus still refuses the spill: %s", exc)
            return
        log.warning("the bus takes writes again: delivered %d spilled records", delivered)
        self._refused = None
