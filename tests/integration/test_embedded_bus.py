from __future__ import annotations

import functools
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
