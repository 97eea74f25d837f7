"""While the service rebuilds the projection (drops its tables and refills them batch by batch), no
reader sees them half full: a read waits for the rebuild's end (ProjectionBusy naming it when its
timeout comes first), and a purge refuses (the deleted runs it reads are not all back yet)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import close_session, session
from engine.bootstrap import make_bus
from engine.projection_service import build_service
from projections.client import ServiceClient
from projections.database import ProjectionBusy
from projections.service import ProjectionService, serving_in_thread
from tests.support import handlers


@pytest.fixture
def service(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProjectionService]:
    """The test's home served by a service in this process, which this process's readers ask."""
    monkeypatch.setenv("RUNBUS_PROJECTION", "service")
    close_session()
    settings = session().services.settings
    bus = make_bus(settings.bus_url, settings)
    served = build_service(settings, bus)
    try:
        with serving_in_thread(served):
            yield served
    finally:
        bus.close()


def _during_rebuild(service: ProjectionService, probe: Callable[[], None]) -> None:
    """Rebuild, calling `probe` once the rebuild is under way (before its first batch)."""
    assert service._projector is not None
    rebuild: Callable[..., int] = service._projector.rebuild

    def probed(*args: Any) -> int:
        probe()
        return rebuild(*args)

    service._projector.rebuild = probed  # type: ignore[method-assign]
    service.rebuild()


def test_a_read_during_a_rebuild_waits_for_the_whole_projection(service: ProjectionService) -> None:
    uids = sorted(new_function().run(NewRun(handler=handlers.seed_like, name=f"r{i}")).uid for i in range(3))
    answers: list[list[str]] = []
    patient: list[threading.Thread] = []

    def probe() -> None:
        hasty = ServiceClient(service.address, session().services.bus, start=None, timeout_s=0.5)
        with pytest.raises(ProjectionBusy, match="is being rebuilt"):
            hasty.answer([("SELECT uid FROM runs", None)])
        hasty.close()
        reader = threading.Thread(target=lambda: answers.append(sorted(get_run_db().sql("SELECT uid FROM runs").uid)))
        reader.start()
        patient.append(reader)

    _during_rebuild(service, probe)
    patient[0].join(timeout=60)
    assert answers == [uids]  # the whole projection, after the rebuild


def test_a_purge_asked_during_a_rebuild_refuses_and_purges_after_it(service: ProjectionService) -> None:
    deleted = new_function().run(NewRun(handler=handlers.seed_like, name="gone")).uid
    get_run_db().delete_runs([deleted], reason="test")
    refused: list[str] = []

    def probe() -> None:  # the purge comes while the tables are refilled
        with pytest.raises(RuntimeError, match="is being rebuilt") as refusal:
            get_run_db().purge()
        refused.append(str(refusal.value))

    _during_rebuild(service, probe)
    assert refused and "nothing was purged" in refused[0]
    assert get_run_db().purgeable() == [deleted]  # nothing was purged
    assert get_run_db().purge().runs == [deleted]  # once the rebuild ended


def test_a_session_sees_the_projection_as_it_was_when_it_began(service: ProjectionService) -> None:
    """DuckDB takes a transaction's snapshot at its first read of the database, not at BEGIN: a
    session begun before a rebuild, whose first statement ran after the rebuild's commits, answered
    from the refilled tables (half full while the rebuild goes on). Its snapshot is taken at begin."""
    new_function().run(NewRun(handler=handlers.seed_like, name="before"))
    get_run_db().sql("SELECT 1")  # folded
    service.pause_folding()
    new_function().run(NewRun(handler=handlers.seed_like, name="unfolded"))  # on the bus, not in the tables
    session, _ = service._session_once_whole(time.monotonic() + 30)
    try:
        service.rebuild()  # folds the whole bus again, the new run too
        assert session.fetch("SELECT name FROM runs").column("name").to_pylist() == ["before"]
    finally:
        session.close()
        service.fold_gate.set()
