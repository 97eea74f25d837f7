"""The UI's held store and the in-process readers of the same file fold it exactly once between them."""

from __future__ import annotations

from pathlib import Path

from engine import get_run_db
from engine.api import session
from engine.ui.store import HeldRunDB
from projections.database import open_projection
from tests.support.foreign import append, envelope, finished, started


def _run(uid: str) -> None:
    append(session().services.bus, uid, [envelope(uid, 0, "run_started", started(name=uid)),
                                         envelope(uid, 1, "run_finished", finished())])


def test_a_held_store_and_an_in_process_reader_of_one_connection_fold_each_record_once(home: Path) -> None:
    svc = session().services
    with open_projection(svc.settings.db_path) as con:
        held = HeldRunDB(svc, con)
        _run("a")
        assert held.sql("SELECT count(*) AS n FROM runs").n.tolist() == [1]  # the held store folded a
        svc.bus.append([("junk", b"not an event")])
        _run("b")
        reader = get_run_db()
        with reader.connection() as other:
            assert other is con  # the same handle: the in-process reader folds the junk and b on it
        assert reader.sql("SELECT count(*) AS n FROM dead_letters").n.tolist() == [1]
        _run("c")
        assert held.sql("SELECT count(*) AS n FROM runs").n.tolist() == [3]
        assert held.sql("SELECT count(*) AS n FROM dead_letters").n.tolist() == [1], "a record folded twice"
        assert held.at(None).sql("SELECT count(*) AS n FROM dead_letters").n.tolist() == [1]
