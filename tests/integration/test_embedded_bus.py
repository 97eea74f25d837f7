from __future__ import annotations

import functools
import threading
from pathlib import Path

import pytest

from producers.bus import Bus, BusError
from producers.bus.embedded import EmbeddedBus
from tests.contract.bus_contract import BusContract, read_all


class TestEmbeddedBus(BusContract):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.path = tmp_path / "log.sqlite"

    def make_bus(self) -> Bus:
        return EmbeddedBus(self.path)

    def bus_factory(self) -> object:
        return functools.partial(EmbeddedBus, self.path)


def test_an_append_that_fails_midway_stores_none_of_its_batch(tmp_path: Path) -> None:
    """The embedded log's append is one SQLite transaction: the partial store the bus contract
    allows is, here, always empty."""
    bus = EmbeddedBus(tmp_path / "log.sqlite")
    bus.append([("k", b"0")])
    unstorable: bytes = None  # type: ignore[assignment]  # NOT NULL refuses it after two inserts
    with pytest.raises(BusError, match="append 4 records"):
        bus.append([("k", b"1"), ("k", b"2"), ("k", unstorable), ("k", b"3")])
    assert bus.end_offsets() == {0: 1}
    bus.append([("k", b"4")])
    assert [r.value for r in read_all(bus, 2)] == [b"0", b"4"]


def test_connections_opening_a_new_log_together_all_open_it(tmp_path: Path) -> None:
    """Dask workers of a fresh home open its log at once: SQLite answers all but one of the
    connections switching a new file to WAL "database is locked" without waiting (it did so in about
    one round in ten of 8 threads here); each must open it."""
    for attempt in range(50):
        path = tmp_path / f"log{attempt}.sqlite"
        start = threading.Barrier(8)
        failures: list[BaseException] = []

        def open_log(path: Path = path, start: threading.Barrier = start,
                     failures: list[BaseException] = failures) -> None:
            start.wait()
            try:
                EmbeddedBus(path).close()
            except BaseException as exc:  # the test's failure, named below
                failures.append(exc)

        openers = [threading.Thread(target=open_log) for _ in range(8)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join()
        assert not failures, f"round {attempt}: {failures[0]}"
