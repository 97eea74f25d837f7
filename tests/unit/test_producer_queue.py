"""What a producer queues per event: metric points travel as flat tuples of atoms (nothing for the
cyclic garbage collector to walk in a backlog), become the same events as a payload dict does, and
the writer's batches end at a flush without losing or reordering what was queued after it."""

from __future__ import annotations

import gc
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from producers.artifact_store import ArtifactStore
from producers.bus.memory import MemoryBus
from producers.context import RunContext
from producers.writer import BackgroundWriter
from schemas import EventCodec
from schemas.events import Event

IDLE = 3600.0  # a writer interval long enough that nothing is taken from the queue during a test


def _events(bus: MemoryBus) -> list[Event]:
    codec = EventCodec()
    return [event for record in bus.read({0: 0}, 10**6) for event in codec.decode_all(record.value)]


def test_a_backlog_of_metric_points_gives_the_garbage_collector_nothing_to_walk(tmp_path: Path) -> None:
    bus = MemoryBus()
    writer = BackgroundWriter(bus, flush_interval_s=IDLE, heartbeat_interval_s=IDLE)
    context = RunContext(writer, ArtifactStore(tmp_path), uid="run", name="gc")
    try:
        context.start()
        gc.collect()
        before = len(gc.get_objects())  # the objects the collector tracks
        for step in range(20_000):
            context.log_metric("loss", step / 2, step=step)
        gc.collect()
        tracked = len(gc.get_objects()) - before
        assert tracked < 1_000, f"20,000 queued metric points left {tracked} objects for the collector to track"
        context.finish()
    finally:
        writer.close()
    points = [e.payload for e in _events(bus) if e.type == "metric"]
    assert len(points) == 20_000
    assert points[7]["key"] == "loss" and points[7]["value"] == 3.5 and points[7]["step"] == 7
    assert points[7]["timestamp"] > 0


def test_a_metric_given_as_its_point_is_the_same_event_as_one_given_as_a_payload_dict() -> None:
    bus = MemoryBus()
    writer = BackgroundWriter(bus, flush_interval_s=0.01)
    try:
        writer.emit("run", 0, "metric", ("m", 1.5, None, 12.0), ts=100.0, stream="s")
        writer.emit("run", 1, "metric", {"key": "m", "value": 1.5, "step": None, "timestamp": 12.0}, ts=100.0,
                    stream="s")
        writer.emit("run", 2, "metric", ("m", -2.0, 2**63 - 1, 13.0), ts=101.0, stream="s")
        assert writer.flush(30)
    finally:
        writer.close()
    first, second, third = _events(bus)
    assert (first.payload, first.ts, first.stream) == (second.payload, second.ts, second.stream)
    assert third.payload == {"key": "m", "value": -2.0, "step": 2**63 - 1, "timestamp": 13.0}


def test_a_tuple_payload_is_refused_at_the_call_unless_it_is_a_metric_point() -> None:
    writer = BackgroundWriter(MemoryBus(), flush_interval_s=0.01)
    try:
        with pytest.raises(TypeError, match="label"):
            writer.emit("run", 0, "label", ("k", "v", None, 1.0))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="metric"):
            writer.emit("run", 0, "metric", ("k", 1.0, None))  # type: ignore[arg-type]
    finally:
        writer.close()


class _GatedBus(MemoryBus):
    """A memory bus whose appends wait for `gate` (so events queue up behind the one being appended)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.entered = threading.Event(), threading.Event()

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        self.entered.set()
        self.gate.wait(30)
        super().append(records)


def test_events_queued_after_a_flush_are_written_after_the_events_before_it_once_and_in_order() -> None:
    bus = _GatedBus()
    writer = BackgroundWriter(bus, flush_interval_s=0.01)
    try:
        writer.emit("run", 0, "metric", ("m", 0.0, 0, 1.0))
        assert bus.entered.wait(30)  # the writer is appending event 0; the rest queue behind it
        for seq in range(1, 5):
            writer.emit("run", seq, "metric", ("m", float(seq), seq, 1.0))
        assert not writer.flush(timeout=0)  # leaves a flush marker after event 4
        for seq in range(5, 10):
            writer.emit("run", seq, "metric", ("m", float(seq), seq, 1.0))
        bus.gate.set()
        assert writer.flush(30)
    finally:
        bus.gate.set()
        writer.close()
    records = bus.read({0: 0}, 100)
    codec = EventCodec()
    assert [[e.seq for e in codec.decode_all(r.value)] for r in records] == [[0], [1, 2, 3, 4], [5, 6, 7, 8, 9]]
