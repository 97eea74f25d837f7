"""The reader contract, run against both readers: folding in-process, and the projection service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.api import session
from engine.bootstrap import make_bus
from engine.projection_service import build_service
from projections.client import ServiceClient
from projections.query import RunDB
from projections.service import ServiceAddress, serving_in_thread
from tests.contract.reader_contract import Reader, ReaderContract


class TestInProcessReader(ReaderContract):
    @pytest.fixture
    def reader(self, home: Path) -> Reader:
        svc = session().services

        def make(as_of=None) -> RunDB:
            return RunDB(svc.bus, svc.settings.db_path, svc.codec, svc.settings.db_timeout_s, as_of=as_of)

        return make


class TestServiceReader(ReaderContract):
    @pytest.fixture
    def reader(self, home: Path) -> Iterator[Reader]:
        svc = session().services
        bus = make_bus(svc.settings.bus_url, svc.settings)  # the service's own, as in its process
        with serving_in_thread(build_service(svc.settings, bus)):
            client = ServiceClient(ServiceAddress.of(svc.settings.home), svc.bus, start=None, timeout_s=30)

            def make(as_of=None) -> RunDB:
                return RunDB(svc.bus, svc.settings.db_path, svc.codec, svc.settings.db_timeout_s, as_of=as_of,
                             source=client)

            yield make
        bus.close()
