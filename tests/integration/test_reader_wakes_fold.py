"""A reader whose writes the fold has not reached yet wakes the fold: its answer does not wait for
the bus's next look for new records (on the embedded bus, a poll of the log)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.api import session
from engine.bootstrap import make_bus
from engine.projection_service import build_service
from producers.bus import embedded
from projections.client import ServiceClient
from projections.service import serving_in_thread
from tests.support.foreign import envelope, started


def test_a_reader_behind_the_bus_is_answered_without_waiting_for_the_folds_next_look(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = session().services.settings
    bus = make_bus(settings.bus_url, settings)
    assert isinstance(bus, embedded.EmbeddedBus)
    monkeypatch.setattr(embedded, "_POLL_S", 3600.0)  # the fold's next look for records: an hour away
    service = build_service(settings, bus)
    service.fold_wait_s = 3600.0  # and its wait for them
    try:
        with serving_in_thread(service):
            client = ServiceClient(service.address, session().services.bus, start=None, timeout_s=60)
            assert client.answer([("SELECT count(*) AS n FROM runs", None)])[0].n[0] == 0  # the fold sleeps
            # another process's job (its own bus handle) logs a run after the fold went to sleep
            writer = make_bus(settings.bus_url, settings)
            writer.append([("r1", session().services.codec.encode_batch(
                [envelope("r1", 0, "run_started", started(name="late"))]))])
            writer.close()
            # without the wake this waits an hour, and the reader gives up after 60 s (ProjectionBusy)
            assert client.answer([("SELECT name FROM runs", None)])[0].name.tolist() == ["late"]
    finally:
        bus.close()
