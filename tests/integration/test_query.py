"""The query API's filters and sorting, as users call them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from engine import NewRun, get_run_db, new_function


def _train(context, acc=0.0, lr=0.1):
    context.log_result("accuracy", acc)


@pytest.fixture
def runs(home: Path) -> list[str]:
    uids = []
    for name, acc, lr, team in (("a", 0.5, 0.1, "x"), ("b", 0.9, 0.01, "y"), ("a", 0.7, 0.001, "y")):
        task = NewRun(handler=_train, name=name, params={"acc": acc, "lr": lr}).set_label("team", team)
        uids.append(new_function().run(task).uid)
    return uids


def test_filters_combine(runs: list[str]) -> None:
    db = get_run_db()
    assert set(db.list_runs(name="a").uid) == {runs[0], runs[2]}
    assert list(db.list_runs(name="a", labels={"team": "y"}).uid) == [runs[2]]
    assert len(db.list_runs(labels=["team"])) == 3
    assert db.list_runs(state="error").empty
    assert len(db.list_runs(since=datetime.now(timezone.utc) - timedelta(minutes=5))) == 3
    assert db.list_runs(until=datetime.now(timezone.utc) - timedelta(minutes=5)).empty


def test_sort_by_a_result_or_param_and_limit(runs: list[str]) -> None:
    db = get_run_db()
    assert list(db.list_runs(sort_by="-result.accuracy").uid) == [runs[1], runs[2], runs[0]]
    assert list(db.list_runs(sort_by="param.lr", limit=2).uid) == [runs[2], runs[1]]
    with pytest.raises(ValueError, match="cannot sort by 'colour'"):
        db.list_runs(sort_by="colour")


def test_read_run_by_unique_prefix(runs: list[str]) -> None:
    record = get_run_db().read_run(runs[1][:10])
    assert record["uid"] == runs[1]
    assert record["params"] == {"acc": 0.9, "lr": 0.01}
    with pytest.raises(KeyError, match="no run with uid"):
        get_run_db().read_run("zzzz")
