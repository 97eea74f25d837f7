"""The background writer's records are columnar batches, with event ids made in bulk."""

from __future__ import annotations

import uuid

from producers.bus.memory import MemoryBus
from producers.writer import BackgroundWriter, event_ids
from schemas import EventCodec
from schemas.codec import HEADER_LEN, MAGIC


def test_event_ids_are_distinct_uuid4_hex() -> None:
    ids = event_ids(2000)
    assert len(set(ids)) == 2000
    for made in ids:
        parsed = uuid.UUID(hex=made)
        assert parsed.hex == made and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_the_writer_appends_one_streams_events_as_columnar_records_in_order() -> None:
    bus, codec = MemoryBus(), EventCodec()
    writer = BackgroundWriter(bus, codec, events_per_record=3)
    try:
        writer.emit("run", 0, "heartbeat", {"interval_s": 5.0}, stream="beats")
        for seq in range(5):
            writer.emit("run", seq, "metric", {"key": "m", "value": seq, "step": seq, "timestamp": 1.0}, stream="own")
        writer.emit("run", 5, "label", {"key": "k", "value": "v"}, stream="own")
        writer.flush(30)
    finally:
        writer.close()
    records = bus.read({0: 0}, 100)
    columnar = MAGIC + codec._columnar_writer.fingerprint
    assert all(r.value[:HEADER_LEN] == columnar for r in records)
    events = [e for r in records for e in codec.decode_all(r.value)]
    assert [(e.stream, e.seq, e.type) for e in events] == [
        ("beats", 0, "heartbeat"), *(("own", seq, "metric") for seq in range(5)), ("own", 5, "label")]
    assert [len(codec.decode_all(r.value)) for r in records] == [1, 3, 3]
