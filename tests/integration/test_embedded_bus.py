from __future__ import annotations

import functools
from pathlib import Path

import pytest

from producers.bus import Bus
from producers.bus.embedded import EmbeddedBus
from tests.contract.bus_contract import BusContract


class TestEmbeddedBus(BusContract):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.path = tmp_path / "log.sqlite"

    def make_bus(self) -> Bus:
        return EmbeddedBus(self.path)

    def bus_factory(self) -> object:
        return functools.partial(EmbeddedBus, self.path)
