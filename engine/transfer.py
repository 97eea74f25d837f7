"""Copying events between buses (push an offline embedded log to Kafka, import an export)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from producers.bus import Bus
from schemas import DecodeError, EventCodec

_BATCH = 10_000


@dataclass(frozen=True)
class TransferReport:
    copied: int
    already_there: int
    undecodable: int


def event_ids(bus: Bus, codec: EventCodec) -> set[str]:
    """The ids of every event on `bus`."""
    found: set[str] = set()
    for value in all_values(bus):
        try:
            found.add(codec.decode(value).event_id)
        except DecodeError:
            continue
    return found


def all_values(bus: Bus) -> Iterable[bytes]:
    """Every record's bytes, from offset 0 to the end as it was when reading began."""
    positions: dict[int, int] = {}
    end = bus.end_offsets()
    while any(positions.get(p, 0) < offset for p, offset in end.items()):
        records = bus.read(positions, _BATCH, timeout=1.0)
        if not records:
            return
        for record in records:
            positions[record.partition] = record.offset + 1
            yield record.value


def append_new(values: Iterable[bytes], target: Bus, codec: EventCodec) -> TransferReport:
    """Append the events `target` does not hold yet (by event id), keyed by run uid."""
    present = event_ids(target, codec)
    copied = skipped = bad = 0
    batch: list[tuple[str | None, bytes]] = []
    for value in values:
        try:
            event = codec.decode(value)
        except DecodeError:
            bad += 1
            continue
        if event.event_id in present:
            skipped += 1
            continue
        present.add(event.event_id)
        batch.append((event.run_uid, value))
        if len(batch) >= _BATCH:
            target.append(batch)
            copied += len(batch)
            batch = []
    target.append(batch)
    return TransferReport(copied + len(batch), skipped, bad)


def push(source: Bus, target: Bus, codec: EventCodec) -> TransferReport:
    """Copy every event of `source` that `target` lacks; pushing twice copies nothing new."""
    return append_new(all_values(source), target, codec)
