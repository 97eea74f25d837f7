"""In-memory bus: the log held in this process, for unit tests and single-process use.

It passes the same contract suite as the embedded and Kafka backends, except that it cannot be
shared with another process: handles on it are the one object.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Mapping, Sequence

from producers.bus.base import Bus, BusRecord


class MemoryBus(Bus):
    """`partitions` lists of records; a key always lands in the same partition (crc32 of the key),
    records without a key in partition 0."""

    def __init__(self, partitions: int = 1, name: str = "default") -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        self.url = f"memory://{name}"
        self._log: list[list[BusRecord]] = [[] for _ in range(partitions)]
        self._committed: dict[str, dict[int, int]] = {}
        self._changed = threading.Condition()

    def partition_of(self, key: str | None) -> int:
        if key is None:
            return 0
        return zlib.crc32(key.encode("utf-8", "surrogateescape")) % len(self._log)

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        now = time.time()
        with self._changed:
            for key, value in records:
                number = self.partition_of(key)
                partition = self._log[number]
                partition.append(BusRecord(number, len(partition), key, bytes(value), now))
            self._changed.notify_all()

    def partitions(self) -> list[int]:
        return list(range(len(self._log)))

    def end_offsets(self) -> dict[int, int]:
        with self._changed:
            return {p: len(records) for p, records in enumerate(self._log)}

    def read(self, positions: Mapping[int, int], max_records: int = 10_000,
             timeout: float = 0.0) -> list[BusRecord]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found: list[BusRecord] = []
                for p, records in enumerate(self._log):
                    found.extend(records[positions.get(p, 0):][:max_records - len(found)])
                    if len(found) >= max_records:
                        break
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                self._changed.wait(left)

    def commit(self, group: str, positions: Mapping[int, int]) -> None:
        with self._changed:
            self._committed.setdefault(group, {}).update(positions)

    def committed(self, group: str) -> dict[int, int]:
        with self._changed:
            return dict(self._committed.get(group, {}))
