"""Reading the bus as events: the one loop every consumer uses (projector, sweep watcher, tail,
push, export). It reads from positions, decodes each record, and hands over every record once:
with its events, or with the reason its bytes are not events (the consumer decides what a dead
letter becomes; none is skipped unseen)."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

from producers.bus.base import Bus, BusRecord
from schemas import Event, EventCodec
from schemas.codec import MetricColumns


@dataclass(frozen=True, slots=True)
class Delivery:
    """One bus record: its events in order, or (`events` empty) why it does not decode.

    A subscription made with `columns=True` gives a record of metric events only (the usual record
    of a run's log_metric points) as `metrics`, its columns, with `events` empty: `all_events()`
    gives its events either way."""

    record: BusRecord
    events: list[Event] = field(default_factory=list)
    error: str | None = None
    metrics: MetricColumns | None = None

    def all_events(self) -> list[Event]:
        """The record's events, made from `metrics` when it came as columns."""
        return self.metrics.events() if self.metrics is not None else self.events

    def count(self, object_cost: float = 1.0) -> float:
        """How many events the record holds (1 for one that does not decode), those decoded as
        objects (not columns) counted `object_cost` each."""
        if self.metrics is not None:
            return len(self.metrics)
        return max(1, len(self.events)) * object_cost


class Subscription:
    """Records of `bus` from `positions` on (every partition from 0 when absent).

    With `until` (end offsets, e.g. `bus.end_offsets()`), reading stops there: a snapshot of the log
    as it was, even while writers go on appending. With `keys`, only records with one of those keys
    (a run's records are keyed by its uid) are decoded and delivered; the others are passed over.
    With `columns`, records of metric events only are delivered as columns (`Delivery.metrics`).
    A consumer that stores its positions with what it made of the records (the projector: in the
    DuckDB transaction of the batch) makes one from those positions for each batch, so a batch read
    and not committed is read again.
    """

    def __init__(self, bus: Bus, codec: EventCodec, positions: Mapping[int, int] | None = None,
                 until: Mapping[int, int] | None = None, keys: Collection[str] | None = None,
                 columns: bool = False) -> None:
        self.bus, self.codec, self.columns = bus, codec, columns
        self.positions: dict[int, int] = dict(positions or {})
        self.until = dict(until) if until is not None else None
        self.keys = set(keys) if keys is not None else None
        self.undecodable = 0

    @classmethod
    def whole_log(cls, bus: Bus, codec: EventCodec) -> Subscription:
        """From offset 0 to the end the bus has now."""
        return cls(bus, codec, until=bus.end_offsets())

    def caught_up(self) -> bool:
        """True when a bounded subscription has read up to `until`."""
        return self.until is not None and all(self.positions.get(p, 0) >= end for p, end in self.until.items())

    def poll(self, max_records: int = 10_000, timeout: float = 0.0,
             max_events: float | None = None, object_cost: float = 1.0) -> list[Delivery]:
        """The next records (waiting up to `timeout` for the first), decoded; positions advance past them
        (and past the records `keys` passes over). With `max_events`, no record is delivered once
        those delivered hold that many events (the first always is; see `Delivery.count` for
        `object_cost`): the rest are read again next."""
        if self.caught_up():
            return []
        records = self.bus.read(self.positions, max_records, timeout)
        if self.until is not None:
            records = [r for r in records if r.offset < self.until.get(r.partition, 0)]
        deliveries: list[Delivery] = []
        events = 0
        for record in records:
            if max_events is not None and events >= max_events:
                break
            self.positions[record.partition] = record.offset + 1
            if self.keys is None or record.key in self.keys:
                delivery = self._decode(record)
                deliveries.append(delivery)
                events += delivery.count(object_cost)
        return deliveries

    def _decode(self, record: BusRecord) -> Delivery:
        try:
            if self.columns:
                decoded = self.codec.decode_columns(record.value)
                if isinstance(decoded, MetricColumns):
                    return Delivery(record, metrics=decoded)
                return Delivery(record, decoded)
            return Delivery(record, self.codec.decode_all(record.value))
        except Exception as exc:  # untrusted bytes: whatever fails to decode is the consumer's dead letter
            self.undecodable += 1
            return Delivery(record, error=f"{type(exc).__name__}: {exc}")

    def deliveries(self, batch: int = 10_000, timeout: float = 1.0) -> Iterator[Delivery]:
        """Every delivery up to `until` (or until the bus has nothing new for `timeout`)."""
        while not self.caught_up():
            before = dict(self.positions)
            found = self.poll(batch, timeout)
            if not found and self.positions == before:
                return
            yield from found

    def events(self, batch: int = 10_000) -> Iterator[Event]:
        """The events of `deliveries()`, in order; records that do not decode are counted in
        `undecodable`."""
        for delivery in self.deliveries(batch):
            yield from delivery.all_events()
