"""A purge asked while the projection is rebuilt refuses: the rebuild refills the tables, so the
deleted runs a purge reads from them are not all there yet, and it would purge none of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import close_session, session
from engine.bootstrap import make_bus
from engine.projection_service import build_service
from projections.service import serving_in_thread
from tests.support import handlers


def test_a_purge_asked_during_a_rebuild_refuses_and_purges_after_it(home: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_PROJECTION", "service")  # the readers ask the service below
    close_session()
    settings = session().services.settings
    bus = make_bus(settings.bus_url, settings)
    service = build_service(settings, bus)
    try:
        with serving_in_thread(service):
            deleted = new_function().run(NewRun(handler=handlers.seed_like, name="gone")).uid
            get_run_db().delete_runs([deleted], reason="test")
            assert service._projector is not None
            rebuild: Callable[..., int] = service._projector.rebuild
            refused: list[str] = []

            def rebuild_asked_to_purge(*args: Any) -> int:  # the purge comes while the tables are refilled
                with pytest.raises(RuntimeError, match="is being rebuilt") as refusal:
                    get_run_db().purge()
                refused.append(str(refusal.value))
                return rebuild(*args)

            service._projector.rebuild = rebuild_asked_to_purge  # type: ignore[method-assign]
            service.rebuild()
            assert refused and "nothing was purged" in refused[0]
            assert get_run_db().purgeable() == [deleted]  # nothing was purged

            report = get_run_db().purge()  # once the rebuild ended
            assert report.runs == [deleted]
    finally:
        bus.close()
