"""Properties of the one bus loop (producers/subscription.py) and of where events sit (events.position).

However a consumer sizes its polls and wherever it stops and resumes from its positions, every record
is delivered exactly once, in order per partition, with its events when it decodes and with the reason
when it does not. events.position orders a partition's events as they sit on the bus and never gives
two events one position.
"""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from producers.bus.memory import MemoryBus
from producers.subscription import Subscription
from projections.projector import event_position
from schemas import EventCodec
from tests.support.foreign import envelope, metric

CODEC = EventCodec()
GARBAGE = [b"", b"garbage", b"\xc3\x01" + b"\x00" * 8]

# a record: (key number, events in it; 0 means garbage bytes, with garbage kind)
records_strategy = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4), st.sampled_from(GARBAGE)),
                            max_size=40)


def _fill(bus: MemoryBus, records: list[tuple[int, int, bytes]]) -> dict[bytes, list[str]]:
    """Append the records; returns each value's event ids (absent for garbage)."""
    expected: dict[bytes, list[str]] = {}
    for number, (key, events, garbage) in enumerate(records):
        if events == 0:
            value = garbage + str(number).encode()  # unique, and still not a record
        else:
            made = [envelope(f"run{key}", i, "metric", metric("m", float(i), step=i), event_id=uuid.uuid4().hex)
                    for i in range(events)]
            value = CODEC.encode_batch(made)
            expected[value] = [e["event_id"] for e in made]
        bus.append([(f"run{key}", value)])
    return expected


@settings(max_examples=60, deadline=None)
@given(records=records_strategy,
       polls=st.lists(st.tuples(st.integers(1, 7), st.one_of(st.none(), st.integers(1, 9))), min_size=1, max_size=20),
       restarts=st.sets(st.integers(0, 19)), partitions=st.integers(1, 3))
def test_every_record_is_delivered_once_in_order_whatever_the_poll_sizes_and_restarts(
        records: list[tuple[int, int, bytes]], polls: list[tuple[int, int | None]], restarts: set[int],
        partitions: int) -> None:
    """Polls of any number of records, bounded or not by the events they hold (`max_events`)."""
    bus = MemoryBus(partitions=partitions)
    expected = _fill(bus, records)
    subscription = Subscription(bus, CODEC)
    delivered = []
    step = 0
    while True:
        if step in restarts:  # a consumer that resumes from the positions it stored
            subscription = Subscription(bus, CODEC, dict(subscription.positions))
        max_records, max_events = polls[step % len(polls)]
        found = subscription.poll(max_records, max_events=max_events)
        step += 1
        if not found:
            break
        assert len(found) <= max_records
        if max_events is not None:  # every record but the last came while fewer events were delivered
            assert sum(d.count() for d in found[:-1]) < max_events
        delivered.extend(found)
    stored = bus.read({}, 1_000_000)
    assert [(d.record.partition, d.record.offset) for d in sorted(delivered, key=lambda d: (
        d.record.partition, d.record.offset))] == sorted((r.partition, r.offset) for r in stored)
    assert len(delivered) == len(records)
    for partition in range(partitions):
        offsets = [d.record.offset for d in delivered if d.record.partition == partition]
        assert offsets == sorted(offsets)
    for delivery in delivered:
        if delivery.record.value in expected:
            assert delivery.error is None
            assert [e.event_id for e in delivery.events] == expected[delivery.record.value]
        else:
            assert delivery.events == [] and delivery.error  # the reason, for the dead letter
    assert subscription.positions == {p: end for p, end in bus.end_offsets().items() if end}


@settings(max_examples=200, deadline=None)
@given(a=st.tuples(st.integers(0, 255), st.integers(0, 2**38), st.integers(0, 2**16 - 1)),
       b=st.tuples(st.integers(0, 255), st.integers(0, 2**38), st.integers(0, 2**16 - 1)))
def test_event_positions_are_distinct_and_order_a_partition_as_it_sits_on_the_bus(
        a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    position_a, position_b = event_position(*a), event_position(*b)
    assert position_a is not None and position_b is not None
    assert (position_a == position_b) == (a == b)
    if a[0] == b[0]:  # one partition: (offset, index in the record) order
        assert (position_a < position_b) == (a[1:] < b[1:])
    assert position_a >> 24 == a[1] and (position_a >> 16) & 0xFF == a[0] and position_a & 0xFFFF == a[2]


@given(partition=st.integers(256, 10_000) | st.integers(-5, -1), offset=st.integers(0, 100),
       index=st.integers(0, 10))
def test_an_event_that_cannot_be_placed_has_no_position(partition: int, offset: int, index: int) -> None:
    assert event_position(partition, offset, index) is None
    assert event_position(0, offset, 2**16 + index) is None
