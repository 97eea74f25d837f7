"""Copying events between buses (push an offline embedded log to Kafka, import an export)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from producers.bus import Bus
from schemas import DecodeError, Event, EventCodec

_BATCH = 10_000
_EVENTS_PER_RECORD = 500


@dataclass(frozen=True)
class TransferReport:
    copied: int
    already_there: int
    undecodable: int


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


def decoded_events(values: Iterable[bytes], codec: EventCodec, undecodable: list[int] | None = None
                   ) -> Iterator[Event]:
    """The events of the records, in order; records that do not decode are counted and skipped."""
    for value in values:
        try:
            yield from codec.decode_all(value)
        except DecodeError:
            if undecodable is not None:
                undecodable[0] += 1


def event_ids(bus: Bus, codec: EventCodec) -> set[str]:
    """The ids of every event on `bus`."""
    return {event.event_id for event in decoded_events(all_values(bus), codec)}


def append_new(events: Iterable[Event], target: Bus, codec: EventCodec,
               events_per_record: int = _EVENTS_PER_RECORD) -> tuple[int, int]:
    """Append the events `target` does not hold yet (by event id), batched per run like the writer
    does; returns (copied, already there)."""
    present = event_ids(target, codec)
    copied = skipped = 0
    pending: list[Event] = []

    def flush() -> None:
        by_run: dict[str, list[dict]] = {}
        for event in pending:
            by_run.setdefault(event.run_uid, []).append(codec.to_record(event))
        target.append([(uid, codec.encode_batch(records[i:i + events_per_record]))
                       for uid, records in by_run.items() for i in range(0, len(records), events_per_record)])
        pending.clear()

    for event in events:
        if event.event_id in present:
            skipped += 1
            continue
        present.add(event.event_id)
        pending.append(event)
        copied += 1
        if len(pending) >= _BATCH:
            flush()
    flush()
    return copied, skipped


def push(source: Bus, target: Bus, codec: EventCodec) -> TransferReport:
    """Copy every event of `source` that `target` lacks; pushing twice copies nothing new."""
    undecodable = [0]
    copied, skipped = append_new(decoded_events(all_values(source), codec, undecodable), target, codec)
    return TransferReport(copied, skipped, undecodable[0])
