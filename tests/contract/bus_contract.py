"""The bus contract: every backend's test module subclasses `BusContract`.

An append that fails (the bus raised) may have stored part of its batch: none of it on the embedded
log (one SQLite transaction), any of its records on Kafka (each partition's records are acknowledged
on their own; a refused record does not stop the others). What a failed append stored is read like
any other record, in batch order per key, and the bus goes on: a later append lands after it. A
retry of the whole batch (the writer's) therefore stores that part twice; consumers tell the copies
apart by event id (the projector records the second one as a duplicate: tests/contract/projector_contract.py).
`PartialAppend` makes a real backend store part of a batch and then fail, on every backend.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import pytest

from producers.bus import Bus, BusError, BusRecord


def read_all(bus: Bus, expected: int, timeout: float = 30.0) -> list[BusRecord]:
    """Read from offset 0 on every partition until `expected` records arrived or time ran out."""
    positions: dict[int, int] = {}
    records: list[BusRecord] = []
    deadline = time.monotonic() + timeout
    while len(records) < expected and time.monotonic() < deadline:
        batch = bus.read(positions, 10_000, timeout=0.5)
        for record in batch:
            positions[record.partition] = record.offset + 1
        records.extend(batch)
    return records


class PartialAppend(Bus):
    """Fault injector over a real bus: each of the next `failures` appends stores its first `stored`
    records on `inner` (really: they are on the log), then raises BusError, as a connection lost
    mid-batch does. Everything else goes straight to `inner`."""

    def __init__(self, inner: Bus, stored: int, failures: int = 1) -> None:
        self.inner, self.stored, self.failures = inner, stored, failures
        self.url = inner.url
        self.topic = getattr(inner, "topic", None)  # a writer's spill file is kept per bus and topic

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        if self.failures <= 0:
            self.inner.append(records)
            return
        self.failures -= 1
        self.inner.append(records[:self.stored])
        raise BusError(f"{self.url}: append of {len(records)} records failed after storing "
                       f"{min(self.stored, len(records))}")

    def partitions(self) -> list[int]:
        return self.inner.partitions()

    def end_offsets(self) -> dict[int, int]:
        return self.inner.end_offsets()

    def read(self, positions: Mapping[int, int], max_records: int = 10_000,
             timeout: float = 0.0) -> list[BusRecord]:
        return self.inner.read(positions, max_records, timeout)

    def commit(self, group: str, positions: Mapping[int, int]) -> None:
        self.inner.commit(group, positions)

    def committed(self, group: str) -> dict[int, int]:
        return self.inner.committed(group)

    def close(self) -> None:
        self.inner.close()


def _per_key(records: Sequence[BusRecord]) -> dict[str | None, list[bytes]]:
    found: dict[str | None, list[bytes]] = {}
    for record in records:
        found.setdefault(record.key, []).append(record.value)
    return found


def _per_key_of(records: Sequence[tuple[str | None, bytes]]) -> dict[str | None, list[bytes]]:
    return _per_key([BusRecord(0, 0, key, value, 0.0) for key, value in records])


def _append_from_process(bus_factory: object, writer: int, count: int) -> None:
    bus = bus_factory()  # type: ignore[operator]
    for start in range(0, count, 500):
        bus.append([(f"run-{writer}", f"{writer}:{i}".encode())
                    for i in range(start, min(start + 500, count))])
    bus.close()


class BusContract(ABC):
    """Behaviour every bus backend must show. Subclasses provide `make_bus`."""

    processes: ClassVar[int] = 4
    events_per_process: ClassVar[int] = 5_000
    # False for a bus held in one process: its concurrent writers are threads
    shared_across_processes: ClassVar[bool] = True

    @abstractmethod
    def make_bus(self) -> Bus:
        """A fresh, empty bus."""

    @abstractmethod
    def bus_factory(self) -> object:
        """A picklable zero-argument callable opening the same bus in another process."""

    def test_append_then_read_returns_records_in_order(self) -> None:
        bus = self.make_bus()
        bus.append([("a", b"1"), ("a", b"2"), ("a", b"3")])
        records = read_all(bus, 3)
        assert [r.value for r in records] == [b"1", b"2", b"3"]
        assert [r.key for r in records] == ["a", "a", "a"]
        offsets = [r.offset for r in records]
        assert offsets == sorted(offsets) and len(set(offsets)) == 3

    def test_end_offsets_count_appended_records(self) -> None:
        bus = self.make_bus()
        assert sum(bus.end_offsets().values()) == 0
        bus.append([(f"k{i}", b"x") for i in range(10)])
        assert sum(bus.end_offsets().values()) == 10
        assert set(bus.end_offsets()) == set(bus.partitions())

    def test_read_from_a_position_skips_what_was_read(self) -> None:
        bus = self.make_bus()
        bus.append([("k", str(i).encode()) for i in range(5)])
        first = read_all(bus, 5)
        positions = {r.partition: r.offset + 1 for r in first[:2]}
        rest = bus.read(positions, 100, timeout=2)
        assert [r.value for r in rest] == [b"2", b"3", b"4"]

    def test_read_waits_for_records_appended_later(self) -> None:
        bus = self.make_bus()
        threading.Timer(0.3, lambda: self.make_bus_same(bus).append([("late", b"v")])).start()
        records = bus.read({}, 10, timeout=15)
        assert [r.value for r in records] == [b"v"]

    def test_read_with_nothing_new_returns_empty_after_timeout(self) -> None:
        bus = self.make_bus()
        assert bus.read({}, 10, timeout=0.2) == []

    def test_records_of_one_key_stay_in_order_across_many_keys(self) -> None:
        bus = self.make_bus()
        bus.append([(f"run-{i % 7}", f"{i % 7}:{i // 7}".encode()) for i in range(700)])
        records = read_all(bus, 700)
        assert len(records) == 700
        seen: dict[str, list[int]] = {}
        for record in records:
            key, seq = record.value.decode().split(":")
            seen.setdefault(key, []).append(int(seq))
            assert record.key == f"run-{key}"
        assert all(seqs == list(range(100)) for seqs in seen.values())

    def test_committed_positions_round_trip(self) -> None:
        bus = self.make_bus()
        bus.append([("k", b"x")])
        assert bus.committed("projector") == {}
        partition = bus.partitions()[0]
        bus.commit("projector", {partition: 1})
        assert bus.committed("projector") == {partition: 1}

    def test_concurrent_writers_lose_and_reorder_nothing(self) -> None:
        bus = self.make_bus()
        if self.shared_across_processes:
            factory = self.bus_factory()
            context = multiprocessing.get_context("spawn")
            workers = [context.Process(target=_append_from_process, args=(factory, w, self.events_per_process))
                       for w in range(self.processes)]
        else:
            workers = [threading.Thread(target=_append_from_process,
                                        args=(lambda: self.make_bus_same(bus), w, self.events_per_process))
                       for w in range(self.processes)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
            assert not worker.is_alive() and getattr(worker, "exitcode", 0) == 0
        total = self.processes * self.events_per_process
        records = read_all(bus, total, timeout=60)
        assert len(records) == total
        per_writer: dict[str, list[int]] = {}
        for record in records:
            writer, seq = record.value.decode().split(":")
            per_writer.setdefault(writer, []).append(int(seq))
        assert all(seqs == list(range(self.events_per_process)) for seqs in per_writer.values())

    def test_an_append_that_stored_part_of_its_batch_raises_and_its_retry_stores_the_batch_after_it(
            self) -> None:
        bus = self.make_bus()
        bus.append([("before", b"0")])
        batch = [(f"run-{i % 3}", f"{i % 3}:{i // 3}".encode()) for i in range(12)]
        flaky = PartialAppend(bus, stored=5)
        with pytest.raises(BusError, match="after storing 5"):
            flaky.append(batch)
        stored = read_all(bus, 1 + 5)
        assert sum(bus.end_offsets().values()) == 6
        assert _per_key(stored) == _per_key_of([("before", b"0"), *batch[:5]])

        flaky.append(batch)  # the writer's retry: the whole batch again
        bus.append([("after", b"1")])
        records = read_all(bus, 1 + 5 + 12 + 1)
        assert sum(bus.end_offsets().values()) == 19
        # per key: the stored part, then the whole batch, then what came later
        assert _per_key(records) == _per_key_of([("before", b"0"), *batch[:5], *batch, ("after", b"1")])
        for partition in bus.partitions():  # offsets grow by one, no gap left by the failure
            offsets = [r.offset for r in records if r.partition == partition]
            assert offsets == list(range(len(offsets)))

    def make_bus_same(self, bus: Bus) -> Bus:
        """Another handle on the same bus (as a second producer would open it)."""
        return self.bus_factory()()  # type: ignore[operator]
