"""The bus: an append-only, partitioned log of keyed records. Backends implement `Bus`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class BusError(RuntimeError):
    """The bus cannot do what was asked (unreachable, misconfigured, closed)."""


class BusRefused(BusError):
    """The bus refuses the write for good (permission, authorization, read-only log, record too
    large): retrying the same append cannot succeed until someone changes the bus."""


@dataclass(frozen=True, slots=True)
class BusRecord:
    """A record as stored: where it is (partition, offset) and what it holds."""

    partition: int
    offset: int
    key: str | None
    value: bytes
    timestamp: float


class Bus(ABC):
    """Records with the same key land in one partition, in append order.

    Positions are the next offset to read, per partition; offsets grow by one from 0.
    """

    url: str

    @abstractmethod
    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        """Durably append (key, value) records; returns once the bus holds all of them.

        Raises BusRefused when retrying cannot help, any other error when it may. When it raises,
        any of the batch's records may be stored (none on the embedded log): stored ones read in
        batch order per key, and a retry of the whole batch stores them again after them, so
        consumers deduplicate by event id (tests/contract/bus_contract.py)."""

    @abstractmethod
    def partitions(self) -> list[int]:
        """The partition numbers of the log."""

    @abstractmethod
    def end_offsets(self) -> dict[int, int]:
        """Per partition, the offset the next appended record will get."""

    @abstractmethod
    def read(self, positions: Mapping[int, int], max_records: int = 10_000,
             timeout: float = 0.0) -> list[BusRecord]:
        """Records at or after `positions` (missing partitions start at 0), in order per partition.

        Waits up to `timeout` seconds for the first record when none is there yet.
        """

    @abstractmethod
    def commit(self, group: str, positions: Mapping[int, int]) -> None:
        """Remember `group`'s positions (for consumers that keep them on the bus)."""

    @abstractmethod
    def committed(self, group: str) -> dict[int, int]:
        """The positions last committed by `group` (empty if none)."""

    def epoch(self) -> str | None:
        """An id that changes whenever stored records are rewritten (a purge of the embedded log);
        None for a bus whose records are never rewritten (Kafka, memory). A consumer that folded
        records stores it and starts over when it changes."""
        return None

    def wake(self) -> None:  # noqa: B027 - a backend whose reads learn of new records by themselves needs nothing
        """Make a `read` waiting in another thread look for records again at once: a caller that
        knows records were appended elsewhere (a reader whose writes are not folded yet) need not
        wait for the backend's next look (the embedded log's poll)."""

    def close(self) -> None:  # noqa: B027 - backends without resources need nothing
        """Release connections; the bus must not be used afterwards."""

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lag(bus: Bus, positions: Mapping[int, int]) -> int:
    """How many records lie beyond `positions`."""
    return sum(max(0, end - positions.get(p, 0)) for p, end in bus.end_offsets().items())
