"""The background writer against a bus that fails: it retries what may pass, spills what the bus
refuses for good, never drops, never hangs forever."""

from __future__ import annotations

import json
import logging
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

import producers.writer
from producers.bus.base import BusRefused
from producers.bus.memory import MemoryBus
from producers.spill import deliver_spill
from producers.writer import BackgroundWriter, EventsNotWritten
from schemas import EventCodec


class FlakyBus(MemoryBus):
    """A memory bus that refuses appends (a transient error) until `healthy` is set."""

    address = "flaky://"

    def __init__(self) -> None:
        super().__init__()
        self.url = self.address
        self.healthy = threading.Event()

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        if not self.healthy.is_set():
            raise ConnectionError("broker down")
        super().append(records)

    @property
    def records(self) -> list[tuple[str | None, bytes]]:
        """What the bus holds, as (key, value)."""
        return [(r.key, r.value) for r in self.read({}, 10**9)]


def _metric(step: int) -> dict:
    return {"key": "m", "value": float(step), "step": step, "timestamp": 1.0}


def test_events_wait_out_an_outage_and_arrive_once_in_order() -> None:
    bus = FlakyBus()
    writer = BackgroundWriter(bus, flush_interval_s=0.01)
    for step in range(1000):
        writer.emit("run", step, "metric", _metric(step))
    assert not writer.flush(timeout=0.3)  # still down: nothing written, nothing dropped
    bus.healthy.set()
    assert writer.flush(timeout=30)
    codec = EventCodec()
    events = [e for _, value in bus.records for e in codec.decode_all(value)]
    assert [e.seq for e in events] == list(range(1000))
    writer.close()


def test_close_gives_up_with_a_clear_message_when_the_bus_never_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    writer = BackgroundWriter(FlakyBus(), flush_interval_s=0.01)
    writer.emit("run", 0, "metric", _metric(0))
    with caplog.at_level(logging.ERROR, logger="runbus.writer"):
        writer.close(timeout_s=0.5)
    assert "flaky:// was unreachable for 0.5s: 0 queued events and 1 bus records being retried" in caplog.text


def test_an_unknown_event_type_is_refused_at_the_call() -> None:
    writer = BackgroundWriter(FlakyBus())
    with pytest.raises(ValueError, match="unknown event type 'metrik'"):
        writer.emit("run", 0, "metrik", _metric(0))
    writer.close(timeout_s=0.1)


class RefusingBus(FlakyBus):
    """Refuses for good (BusRefused) until `healthy` is set."""

    address = "refusing://"

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        if not self.healthy.is_set():
            raise BusRefused("refusing://: cannot append: PermissionError: read-only")
        MemoryBus.append(self, records)


def _events(bus: FlakyBus) -> list:
    codec = EventCodec()
    return [e for _, value in bus.records for e in codec.decode_all(value)]


def test_a_refusing_bus_ends_the_wait_at_once_and_the_next_writer_delivers_the_spill(tmp_path: Path) -> None:
    refusing = RefusingBus()
    writer = BackgroundWriter(refusing, flush_interval_s=0.01, spill_dir=tmp_path)
    for step in range(100):
        writer.emit("run", step, "metric", _metric(step))
    with pytest.raises(EventsNotWritten, match=r"PermissionError: read-only.*kept in .*\.spill"):
        writer.flush(timeout=30)
    writer.close(timeout_s=1)
    (spill,) = tmp_path.glob("*.spill")
    assert stat.S_IMODE(spill.stat().st_mode) == 0o600

    healthy = FlakyBus()
    healthy.url = refusing.url  # the same bus, writable again
    healthy.healthy.set()
    later = BackgroundWriter(healthy, flush_interval_s=0.01, spill_dir=tmp_path)
    assert later.flush(timeout=30)
    assert [e.seq for e in _events(healthy)] == list(range(100))
    assert later.delivered_spill.records > 0 and not list(tmp_path.glob("*.spill"))
    later.close()


def test_a_spill_meant_for_another_bus_is_left_alone(tmp_path: Path) -> None:
    writer = BackgroundWriter(RefusingBus(), flush_interval_s=0.01, spill_dir=tmp_path)
    writer.emit("run", 0, "metric", _metric(0))
    with pytest.raises(EventsNotWritten):
        writer.flush(timeout=30)
    writer.close(timeout_s=1)
    other = FlakyBus()
    other.healthy.set()
    assert deliver_spill(tmp_path, other).skipped == 1 and other.records == []


def test_a_writer_hands_its_spill_to_the_bus_once_it_takes_writes_again(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producers.writer, "_SPILL_RETRY_S", 0.05)
    bus = RefusingBus()
    writer = BackgroundWriter(bus, flush_interval_s=0.01, spill_dir=tmp_path)
    writer.emit("run", 0, "metric", _metric(0))
    with pytest.raises(EventsNotWritten):
        writer.flush(timeout=30)
    bus.healthy.set()
    deadline = time.monotonic() + 30
    while not bus.records and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.emit("run", 1, "metric", _metric(1))
    assert writer.flush(timeout=30)
    assert [e.seq for e in _events(bus)] == [0, 1]
    writer.close()


def test_a_bus_away_at_close_leaves_the_events_in_the_spill_file(tmp_path: Path) -> None:
    writer = BackgroundWriter(FlakyBus(), flush_interval_s=0.01, spill_dir=tmp_path)
    for step in range(10):
        writer.emit("run", step, "metric", _metric(step))
    writer.close(timeout_s=0.5)
    healthy = FlakyBus()
    healthy.healthy.set()
    assert deliver_spill(tmp_path, healthy).records >= 1
    assert [e.seq for e in _events(healthy)] == list(range(10))


def test_a_wait_for_room_is_bounded_while_the_bus_is_away() -> None:
    writer = BackgroundWriter(FlakyBus(), flush_interval_s=0.01, max_pending=10, flush_timeout_s=0.3)
    writer.emit("run", 0, "metric", _metric(0))
    assert not writer.flush(timeout=0.3)  # the writer holds that event and retries it
    for step in range(1, 12):
        writer.emit("run", step, "metric", _metric(step), wait=False)
    with pytest.raises(EventsNotWritten, match="ConnectionError: broker down"):
        writer.wait_for_room()
    writer.close(timeout_s=0.1)


def test_records_are_split_to_stay_under_the_size_bound() -> None:
    bus = FlakyBus()
    bus.healthy.set()
    writer = BackgroundWriter(bus, flush_interval_s=0.01, max_record_bytes=2000)
    for seq in range(20):
        writer.emit("run", seq, "result", {"key": f"r{seq}", "value": json.dumps("x" * 300)})
    assert writer.flush(timeout=30)
    assert len(bus.records) > 1 and all(len(value) <= 2000 for _, value in bus.records)
    assert [e.seq for e in _events(bus)] == list(range(20))
    writer.close()


def test_heartbeats_are_appended_ahead_of_a_backlog() -> None:
    bus = FlakyBus()
    writer = BackgroundWriter(bus, flush_interval_s=0.01)
    for step in range(5):
        writer.emit("run", step, "metric", _metric(step))
    writer.emit("run", 0, "heartbeat", {"interval_s": 1.0}, stream="beats", urgent=True)
    bus.healthy.set()
    assert writer.flush(timeout=30)
    assert _events(bus)[0].type == "heartbeat"
    writer.close()
