"""Background writer: takes events from job threads and appends them to the bus in batches.

Each bus record holds up to `events_per_record` consecutive events of one run (keyed by its uid).

A job thread only validates and enqueues (a few microseconds). The writer thread stamps each
event with its id and producer, encodes it and appends a batch at least every `flush_interval_s`.
A crash loses at most the events enqueued since the last append (<= one interval, by default
200 ms); `flush()` and a normal interpreter exit lose nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from producers.bus.base import Bus
from schemas import SCHEMA_VERSION, EventCodec
from schemas.events import RECORD_OF_TYPE

log = logging.getLogger("runbus.writer")

_RETRY_MAX_S = 5.0


class _FlushMarker:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class BackgroundWriter:
    """One per process and bus; shared by every run in the process."""

    def __init__(self, bus: Bus, codec: EventCodec | None = None, flush_interval_s: float = 0.2,
                 max_batch: int = 20_000, max_pending: int = 1_000_000,
                 heartbeat_interval_s: float = 5.0, events_per_record: int = 500) -> None:
        self.bus = bus
        self._codec = codec or EventCodec()
        self._interval = flush_interval_s
        self._max_batch = max_batch
        # Several events of one run per bus record: a Kafka record costs tens of microseconds in
        # kafka-python whatever its size, so one per event would cap throughput.
        self._events_per_record = events_per_record
        self._max_pending = max_pending
        self._pending: deque[Any] = deque()
        self._wake = threading.Event()
        self._closed = False
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self.heartbeat_interval_s = heartbeat_interval_s
        self._beating: dict[str, Callable[[], None]] = {}
        self._retrying = 0  # records of the batch being retried against an unreachable bus
        self._next_beat = time.monotonic() + heartbeat_interval_s
        self._thread = threading.Thread(target=self._loop, name="runbus-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def emit(self, run_uid: str, seq: int, event_type: str, payload: dict[str, Any],
             ts: float | None = None, stream: str = "") -> None:
        """Queue one event of `stream` (see `Event`); the caller has validated the payload."""
        if self._closed:
            raise RuntimeError("the event writer is closed")
        if event_type not in RECORD_OF_TYPE:
            raise ValueError(f"unknown event type {event_type!r}")
        self._pending.append((run_uid, seq, event_type, time.time() if ts is None else ts, payload, stream))
        if len(self._pending) > self._max_pending:
            self._wait_for_room()

    def track(self, run_uid: str, beat: Callable[[], None]) -> None:
        """Call `beat` (which emits the run's heartbeat) every `heartbeat_interval_s` until `untrack`."""
        self._beating[run_uid] = beat

    def untrack(self, run_uid: str) -> None:
        self._beating.pop(run_uid, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every event queued before this call is on the bus; False on timeout."""
        marker = _FlushMarker()
        self._pending.append(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    def close(self, timeout_s: float = 120.0) -> None:
        """Flush and stop the writer thread. If the bus stays unreachable for `timeout_s`, say how
        many events were not written instead of hanging the process forever."""
        if self._closed:
            return
        flushed = self.flush(timeout_s)
        if not flushed:
            queued = sum(1 for item in self._pending if not isinstance(item, _FlushMarker))
            log.error("the bus %s was unreachable for %gs: %d queued events and %d bus records being "
                      "retried were not written", self.bus.url, timeout_s, queued, self._retrying)
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10 if flushed else 0.1)
        atexit.unregister(self.close)

    def _wait_for_room(self) -> None:
        if threading.current_thread() is self._thread:
            return  # a heartbeat emitted by the writer itself must not wait for the writer
        self._wake.set()
        while len(self._pending) > self._max_pending // 2 and self._thread.is_alive():
            time.sleep(0.001)

    def _loop(self) -> None:
        while not (self._closed and not self._pending):
            self._wake.wait(min(self._interval, self.heartbeat_interval_s))
            self._wake.clear()
            if self._beating and time.monotonic() >= self._next_beat:
                self._beat()
            self._drain()

    def _beat(self) -> None:
        self._next_beat = time.monotonic() + self.heartbeat_interval_s
        for beat in list(self._beating.values()):
            beat()

    def _drain(self) -> None:
        while self._pending:
            by_run: dict[str, list[dict[str, Any]]] = {}
            markers: list[_FlushMarker] = []
            taken = 0
            while self._pending and taken < self._max_batch:
                item = self._pending.popleft()
                if isinstance(item, _FlushMarker):
                    markers.append(item)
                    break
                by_run.setdefault(item[0], []).append(self._record(item))
                taken += 1
            self._append_with_retry([record for run_uid, records in by_run.items()
                                     for record in self._encode(run_uid, records)])
            for marker in markers:
                marker.done.set()

    def _record(self, item: tuple[str, int, str, float, dict[str, Any], str]) -> dict[str, Any]:
        run_uid, seq, event_type, ts, payload, stream = item
        return {"event_id": uuid.uuid4().hex, "run_uid": run_uid, "seq": seq, "stream": stream,
                "type": event_type, "ts": ts,
                "host": self._host, "pid": self._pid, "schema_version": SCHEMA_VERSION,
                "payload": (self._codec.record_name(event_type), payload)}

    def _encode(self, run_uid: str, records: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
        """One run's events as batch records of at most `events_per_record` events each."""
        encoded = []
        for start in range(0, len(records), self._events_per_record):
            chunk = records[start:start + self._events_per_record]
            try:
                encoded.append((run_uid, self._codec.encode_batch(chunk)))
            except ValueError:  # validated at the call, so a bug: keep every event that does fit
                for record in chunk:
                    try:
                        encoded.append((run_uid, self._codec.encode_batch([record])))
                    except ValueError:
                        log.exception("dropping an event that does not fit its schema: %s #%s %s",
                                      run_uid, record["seq"], record["type"])
        return encoded

    def _append_with_retry(self, batch: list[tuple[str, bytes]]) -> None:
        """Keep trying: the events are the truth, and the bus may come back (broker restart)."""
        delay = 0.05
        while batch:
            try:
                self._retrying = len(batch)
                self.bus.append(batch)
                self._retrying = 0
                return
            except Exception as exc:  # any bus failure: retry, never drop
                log.warning("appending %d events failed (%s); retrying in %.2fs", len(batch), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
