"""The bounds of a handover agree: a service a reader started, stopped by a follower while a reader's
session is open and a past projection is being built, releases the home within the time the
follower waits for it (RUNBUS_DB_TIMEOUT for the stopping service's sessions and builds together;
the follower waits that plus RELEASE_MARGIN_S)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.api import close_session, session
from engine.bootstrap import make_bus
from engine.projection_service import build_service, serve_as_follower
from projections.client import ServiceClient
from projections.database import ProjectionBusy
from projections.query import RunDB
from tests.support.foreign import append, envelope, finished, started
from tests.support.polling import wait_until


@pytest.fixture
def short_timeout(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RUNBUS_DB_TIMEOUT", "2")
    close_session()
    yield home


def test_a_follower_gets_the_home_of_a_service_stopped_with_a_session_open_and_a_past_build_under_way(
        short_timeout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = session().services
    settings = svc.settings
    append(svc.bus, "run0", [envelope("run0", 0, "run_started", started(name="run0")),
                             envelope("run0", 1, "run_finished", finished())])
    released = threading.Event()  # the end of the test: what it holds lets go
    building = threading.Event()

    def stuck_replay(*_: Any) -> Iterator[Any]:  # a replay that does not look at `stop` for a while
        building.set()
        released.wait(60)
        return iter(())

    monkeypatch.setattr("projections.service.stored_events", stuck_replay)
    readers_bus, followers_bus = (make_bus(settings.bus_url, settings) for _ in range(2))
    readers = build_service(settings, readers_bus)
    follower = build_service(settings, followers_bus, follow=True)
    threading.Thread(target=readers.run, daemon=True).start()
    readers.ready.wait(60)
    client = ServiceClient(readers.address, svc.bus, start=None, timeout_s=30)
    session_open = threading.Event()

    def hold_a_session() -> None:
        with client.snapshot() as query:
            query("SELECT 1")
            session_open.set()
            released.wait(60)

    def ask_the_past() -> None:
        hurried = ServiceClient(readers.address, svc.bus, start=None, timeout_s=0.5)
        with pytest.raises(ProjectionBusy):  # it gives up; the build goes on
            RunDB(svc.bus, "", as_of=1, source=hurried).sql("SELECT 1")

    served: list[bool] = []
    try:
        threading.Thread(target=hold_a_session, daemon=True).start()
        # the session opens once the fold has reached the bus: the hurried reader then waits for no fold
        wait_until(session_open.is_set, "a session is open")
        threading.Thread(target=ask_the_past, daemon=True).start()
        wait_until(lambda: session_open.is_set() and building.is_set(),
                   "a session is open and a past projection is being built")
        taking = threading.Thread(target=lambda: served.append(serve_as_follower(settings, follower)), daemon=True)
        taking.start()
        wait_until(lambda: served or (follower.ready.is_set() and follower._listener is not None),
                   "the follower serves the home, or gives up")
        assert served == [], "the follower gave up while the stopped service still held the home"
        assert (client.running() or {}).get("follow") is True
    finally:
        released.set()
        follower.shutdown()
        readers.shutdown()
        wait_until(lambda: served or not taking.is_alive(), "the follower has stopped")  # type: ignore[possibly-undefined]
        readers_bus.close()
        followers_bus.close()
