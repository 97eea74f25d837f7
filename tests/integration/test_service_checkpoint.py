"""The projection service writes DuckDB's WAL to the file once the fold is idle and the WAL holds
enough (rows left in the WAL are kept in memory uncompressed and slow every query down)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.api import session
from engine.bootstrap import make_bus
from engine.projection_service import build_service
from projections import service as service_module
from projections.client import ServiceClient
from projections.database import wal_path
from projections.service import serving_in_thread
from tests.support.foreign import envelope, started
from tests.support.polling import wait_until


def _wal(db_path: Path) -> int:
    wal = wal_path(db_path)
    return wal.stat().st_size if wal.exists() else 0


def test_an_idle_fold_writes_the_wal_to_the_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "CHECKPOINT_WAL_BYTES", 1)
    settings = session().services.settings
    bus = make_bus(settings.bus_url, settings)
    service = build_service(settings, bus)
    try:
        with serving_in_thread(service):
            service.pause_folding()  # the events below are folded (into the WAL) in one go
            codec = session().services.codec
            bus.append([(f"r{i}", codec.encode_batch([envelope(f"r{i}", 0, "run_started", started(name=f"n{i}"))]))
                        for i in range(50)])
            service.fold_gate.set()
            client = ServiceClient(service.address, session().services.bus, start=None, timeout_s=60)
            assert client.answer([("SELECT count(*) AS n FROM runs", None)])[0].n[0] == 50
            wait_until(lambda: _wal(settings.db_path) == 0, "the WAL is written to the file once the fold is idle")
            assert client.answer([("SELECT count(*) AS n FROM runs", None)])[0].n[0] == 50
    finally:
        bus.close()
