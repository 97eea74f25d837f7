"""Copying events between buses (push an offline embedded log to Kafka, import an export)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from producers.bus import Bus
from producers.subscription import Subscription
from schemas import Event, EventCodec

_BATCH = 10_000
_EVENTS_PER_RECORD = 500


@dataclass(frozen=True)
class TransferReport:
    copied: int
    already_there: int
    undecodable: int


def event_ids(bus: Bus, codec: EventCodec) -> set[str]:
    """The ids of every event on `bus`."""
    return {event.event_id for event in Subscription.whole_log(bus, codec).events()}


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
    subscription = Subscription.whole_log(source, codec)
    copied, skipped = append_new(subscription.events(), target, codec)
    return TransferReport(copied, skipped, subscription.undecodable)
