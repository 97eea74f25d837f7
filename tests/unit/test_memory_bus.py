"""The in-memory bus passes the bus contract (its concurrent writers are threads)."""

from __future__ import annotations

import pytest

from producers.bus import Bus
from producers.bus.memory import MemoryBus
from tests.contract.bus_contract import BusContract


class TestMemoryBus(BusContract):
    shared_across_processes = False

    @pytest.fixture(autouse=True)
    def _bus(self) -> None:
        self.bus = MemoryBus(partitions=3)

    def make_bus(self) -> Bus:
        return self.bus

    def bus_factory(self) -> object:
        raise NotImplementedError("a memory bus lives in one process")

    def make_bus_same(self, bus: Bus) -> Bus:
        return bus
