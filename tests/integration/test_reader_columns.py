"""Keys that differ only in case have no runs_wide column once both are numeric (DuckDB matches
quoted names whatever their case, so one column would answer for both), whichever came first; a
reader's remembered column of the first one is found gone, and its queries read params/results."""

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
from tests.support.foreign import append, envelope, finished, result, started


def _run(uid: str, key: str, value: str) -> None:
    append(session().services.bus, uid, [envelope(uid, 0, "run_started", started(name=uid)),
                                         envelope(uid, 1, "result", result(key, value)),
                                         envelope(uid, 2, "run_finished", finished())])


@pytest.fixture
def served(home: Path) -> Iterator[tuple[RunDB, ServiceClient]]:
    svc = session().services
    bus = make_bus(svc.settings.bus_url, svc.settings)
    with serving_in_thread(build_service(svc.settings, bus)):
        client = ServiceClient(ServiceAddress.of(svc.settings.home), svc.bus, start=None, timeout_s=30)
        yield RunDB(svc.bus, svc.settings.db_path, svc.codec, source=client), client
    bus.close()


def test_a_key_that_differs_in_case_takes_the_column_from_both_and_a_rebuild_agrees(
        served: tuple[RunDB, ServiceClient]) -> None:
    db, client = served
    _run("a", "lr", "1")
    _run("c", "lr", "2")
    assert db.list_runs(sort_by="result.lr").uid.tolist() == ["a", "c"]  # 'lr' has column "result.lr", remembered
    assert db.sql('SELECT uid FROM runs_wide ORDER BY "result.lr"').uid.tolist() == ["a", "c"]
    _run("b", "LR", "0")  # "result.LR" would be the same column: neither key has one from now on
    client.catch_up()
    for _ in range(2):  # as folded, then after a rebuild (one batch, other order)
        assert db.sql("SELECT key FROM runs_wide_columns WHERE kind = 'result'").key.tolist() == []
        with pytest.raises(Exception, match=r"result\.lr"):
            db.sql('SELECT "result.lr" FROM runs_wide')  # no answer rather than another key's values
        assert db.list_runs(sort_by="result.lr").uid.tolist() == ["a", "c", "b"]  # b has no 'lr': last
        assert db.list_runs(sort_by="result.LR").uid.tolist()[0] == "b"
        client.rebuild()
