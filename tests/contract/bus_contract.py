"""The bus contract: every backend's test module subclasses `BusContract`."""

from __future__ import annotations

import multiprocessing
import threading
import time
from abc import ABC, abstractmethod
from typing import ClassVar

from producers.bus import Bus, BusRecord


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

    def make_bus_same(self, bus: Bus) -> Bus:
        """Another handle on the same bus (as a second producer would open it)."""
        return self.bus_factory()()  # type: ignore[operator]
