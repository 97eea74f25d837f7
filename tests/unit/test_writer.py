"""The background writer against a bus that fails: it retries, never drops, never hangs forever."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

import pytest

from producers.bus import Bus, BusRecord
from producers.writer import BackgroundWriter
from schemas import EventCodec


class FlakyBus(Bus):
    """Refuses appends until `healthy` is set; then keeps what it is given."""

    url = "flaky://"

    def __init__(self) -> None:
        self.healthy = threading.Event()
        self.records: list[tuple[str | None, bytes]] = []

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        if not self.healthy.is_set():
            raise ConnectionError("broker down")
        self.records.extend(records)

    def partitions(self) -> list[int]:
        return [0]

    def end_offsets(self) -> dict[int, int]:
        return {0: len(self.records)}

    def read(self, positions: Mapping[int, int], max_records: int = 10_000, timeout: float = 0.0) -> list[BusRecord]:
        return []

    def commit(self, group: str, positions: Mapping[int, int]) -> None:
        pass

    def committed(self, group: str) -> dict[int, int]:
        return {}


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
