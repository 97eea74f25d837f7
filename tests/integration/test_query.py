"""The query API's filters and sorting, as users call them."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest

from engine import NewRun, get_run_db, new_function
from engine.ui.runs_page import RunsQuery, fetch_runs
from producers.bus.memory import MemoryBus
from projections.projector import Projector
from projections.query import read_only_query
from projections.run_query import (
    SORTABLE_RUN_COLUMNS,
    RunFilter,
    RunOrder,
    ValueColumnCache,
    ValueFilter,
    count_runs,
    find_runs,
)
from tests.support.foreign import CODEC, envelope, finished, started


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


# The run-query module (projections.run_query), over a projection folded from foreign events ---------

_T0 = 1_750_000_000.0


class _Projection:
    """An in-memory bus folded into an in-memory projection, read as the API reads it."""

    def __init__(self) -> None:
        self.bus = MemoryBus()
        self.con = duckdb.connect(":memory:")
        self.projector = Projector(self.bus, self.con)

    def put(self, uid: str, events: list[dict[str, Any]]) -> None:
        self.bus.append([(uid, CODEC.encode_batch(events))])
        self.projector.catch_up()

    def fetch(self, sql: str, params: Any = None) -> pd.DataFrame:
        return read_only_query(self.con, sql, params)

    def find(self, run_filter: RunFilter | None = None, sort: str | None = None, **kwargs: Any) -> list[str]:
        return find_runs(self.fetch, run_filter or RunFilter(), RunOrder.parse(sort), **kwargs).uid.tolist()


def _start(uid: str, seq: int = 0, ts: float = _T0, **fields: Any) -> dict[str, Any]:
    return envelope(uid, seq, "run_started", started(**fields), ts=ts)


def _value(uid: str, seq: int, kind: str, key: str, value: str) -> dict[str, Any]:
    return envelope(uid, seq, kind, {"key": key, "value": value})


@pytest.fixture
def four() -> tuple[_Projection, list[str]]:
    """Four runs whose every sortable column differs; uids u0..u3."""
    projection = _Projection()
    names = ["d", "b", "a", "c"]
    states = ["completed", "error", "aborted", None]  # u3 keeps running
    for i in range(4):
        uid = f"u{i}"
        events = [_start(uid, ts=_T0 + [3, 1, 0, 2][i], name=names[i], project=f"p{[2, 0, 3, 1][i]}",
                         handler=f"h{[1, 3, 0, 2][i]}", runtime=f"rt{[0, 2, 1, 3][i]}", host=f"host{[3, 2, 1, 0][i]}",
                         parent_uid=f"parent{[1, 0, 2, 3][i]}", iteration=[2, 0, 3, 1][i], interval_s=1e6)]
        events.append(_value(uid, 1, "result", "loss", str([0.5, 0.1, 0.9, 0.3][i])))
        events.append(_value(uid, 2, "param", "opt", ['"sgd"', '"adam"', '"rms"', '"lbfgs"'][i]))
        events.append(envelope(uid, 3, "label", {"key": "team", "value": ["x", "y", "x", "z"][i]},
                               ts=_T0 + 10 + [1, 3, 0, 2][i]))
        if states[i]:
            events.append(envelope(uid, 4, "run_finished", finished(states[i], duration_s=[4.0, 1.0, 2.0][i]),
                                   ts=_T0 + 20 + [0, 2, 1][i]))
        projection.put(uid, events)
    return projection, [f"u{i}" for i in range(4)]


def test_every_sortable_run_column_sorts_both_ways(four: tuple[_Projection, list[str]]) -> None:
    projection, _ = four
    table = projection.fetch("SELECT * FROM runs")
    for column in SORTABLE_RUN_COLUMNS:
        known = table[table[column].notna()]
        expected = known.sort_values(column).uid.tolist()
        missing = table[table[column].isna()].uid.tolist()  # NULLs last both ways
        assert projection.find(sort=column) == expected + missing, column
        assert projection.find(sort=f"-{column}") == expected[::-1] + missing, column


def test_sort_by_numeric_and_text_values(four: tuple[_Projection, list[str]]) -> None:
    projection, _ = four
    assert projection.find(sort="result.loss") == ["u1", "u3", "u0", "u2"]
    assert projection.find(sort="-result.loss", limit=2) == ["u2", "u0"]
    assert projection.find(sort="param.opt") == ["u1", "u3", "u2", "u0"]  # text: adam lbfgs rms sgd
    assert projection.find(sort="result.nothing") == ["u0", "u3", "u1", "u2"]  # no values: newest first
    assert projection.find(sort="result.loss", limit=2, offset=1) == ["u3", "u0"]
    with pytest.raises(ValueError, match="cannot sort by 'colour'"):
        RunOrder.parse("colour")
    with pytest.raises(ValueError, match="cannot sort by 'name; DROP TABLE runs'"):
        RunOrder.parse("name; DROP TABLE runs")
    with pytest.raises(ValueError, match="limit must be an int >= 0"):
        projection.find(limit=-1)


def test_every_filter(four: tuple[_Projection, list[str]]) -> None:
    projection, _ = four
    find = projection.find
    assert find(RunFilter(name="a")) == ["u2"]
    assert find(RunFilter(name_contains="A")) == ["u2"]
    assert find(RunFilter(project="p3")) == ["u2"]
    assert find(RunFilter(state="error")) == ["u1"]
    assert find(RunFilter(state="running")) == ["u3"]
    assert find(RunFilter(parent="parent1")) == ["u0"]
    assert find(RunFilter(top_level=True)) == ["u1"]
    assert find(RunFilter(labels=(("team", "x"),))) == ["u0", "u2"]
    assert find(RunFilter(labels=(("team", None),))) == ["u0", "u3", "u1", "u2"]
    assert find(RunFilter(labels=(("team", "x"), ("other", None)))) == []
    assert find(RunFilter(since="2025-06-15 15:06:41+00")) == ["u0", "u3", "u1"]  # _T0 + 1
    assert find(RunFilter(until=datetime.fromtimestamp(_T0 + 1, timezone.utc))) == ["u2"]
    parse = ValueFilter.parse
    assert find(RunFilter(values=(parse("result.loss < 0.5"),))) == ["u3", "u1"]
    assert find(RunFilter(values=(parse("result.loss >= 0.5"), parse("result.loss != 0.9")))) == ["u0"]
    assert find(RunFilter(values=(parse("result.loss = 0.1"),))) == ["u1"]
    assert find(RunFilter(values=(parse("result.loss <= 0.3"), parse("result.loss > 0.1")))) == ["u3"]
    assert find(RunFilter(values=(parse("param.opt = 'adam'"),))) == ["u1"]
    assert find(RunFilter(values=(parse("param.opt != sgd"),))) == ["u3", "u1", "u2"]
    assert find(RunFilter(values=(parse("param.opt ~ M"),))) == ["u1", "u2"]
    assert count_runs(projection.fetch, RunFilter(values=(parse("result.loss > 0.2"),), state="completed")) == 1
    with pytest.raises(ValueError, match="needs a number"):
        parse("result.loss < low")
    with pytest.raises(ValueError, match="must look like"):
        parse("loss < 1")


def test_hostile_keys_are_bound_or_quoted_never_pasted() -> None:
    projection = _Projection()
    hostile = ['a"b', "x'); DROP TABLE runs; --", 'q" DESC, (SELECT 1) --', "Loss", "loss", "k" * 200,
               "new\nline", "ünï", "a.b"]
    for i in range(3):
        uid = f"h{i}"
        events = [_start(uid, ts=_T0 + i)]
        events += [_value(uid, 1 + n, "result", key, str(i * 10 + n)) for n, key in enumerate(hostile)]
        projection.put(uid, events)
    columns = set(projection.fetch('SELECT "column" FROM runs_wide_columns')["column"])
    assert "result.Loss" not in columns and "result.loss" not in columns  # names are case-insensitive: neither
    assert "result." + "k" * 200 not in columns and "result.new\nline" not in columns
    for key in hostile:
        assert projection.find(sort=f"-result.{key}") == ["h2", "h1", "h0"], key
        n = hostile.index(key)
        assert projection.find(RunFilter(values=(ValueFilter("result", key, ">=", str(10 + n)),))) == ["h2", "h1"], key
        assert projection.find(RunFilter(values=(ValueFilter("result", key, "=", str(n)),))) == ["h0"], key
        assert projection.find(RunFilter(labels=((key, None),))) == []
    assert projection.fetch("SELECT count(*) AS n FROM runs").n[0] == 3  # nothing was dropped


def test_runs_wide_agrees_with_runs_params_and_results() -> None:
    projection = _Projection()
    projection.put("early", [_value("early", 0, "param", "lr", "0.5")])  # before its run_started
    projection.put("early", [_start("early", seq=1, params={"bs": "32"}), _value("early", 2, "result", "acc", "0.7")])
    projection.put("other", [_start("other", interval_s=1.0), _value("other", 1, "result", "acc", '"n/a"')])
    projection.put("early", [_value("early", 3, "result", "acc", '"gone"'),
                             envelope("early", 4, "run_finished", finished())])
    projection.put("other", [_value("other", 2, "result", "acc", "2")])
    changes = projection.projector.changes
    projection.projector.judge_silent_runs()  # 'other' still speaks: nothing changes (kept readers' sessions live on)
    assert projection.projector.changes == changes
    projection.projector.judge_silent_runs(now=time.time() + 3600)  # 'other' is silent: lost
    assert projection.projector.changes == changes + 1
    wide = projection.con.execute('SELECT uid, state, "param.lr", "param.bs", "result.acc" FROM runs_wide '
                                  "ORDER BY uid").fetchall()
    assert wide == [("early", "completed", 0.5, 32.0, None), ("other", "lost", None, None, 2.0)]
    public = projection.con.execute("SELECT uid, state FROM runs ORDER BY uid").fetchall()
    assert public == [row[:2] for row in wide]
    assert projection.find(RunFilter(state="lost")) == ["other"]


def test_list_runs_and_the_runs_page_use_the_same_query(four: tuple[_Projection, list[str]]) -> None:
    projection, _ = four
    page = fetch_runs(projection.fetch, RunsQuery.from_params({"sort": "-result.loss", "where": "result.loss > 0.2",
                                                                "label": "team", "size": "25"}))
    assert [row["uid"] for row in page.rows] == ["u2", "u0", "u3"] and page.total == 3
    assert projection.find(RunFilter(values=(ValueFilter.parse("result.loss > 0.2"),), labels=(("team", None),)),
                           sort="-result.loss") == ["u2", "u0", "u3"]


def test_the_runs_page_sorts_on_every_column_list_runs_sorts_on(four: tuple[_Projection, list[str]]) -> None:
    projection, _ = four
    for column in (*SORTABLE_RUN_COLUMNS, "result.loss", "param.opt"):
        for sort in (column, f"-{column}"):
            page = fetch_runs(projection.fetch, RunsQuery.from_params({"sort": sort}))
            assert [row["uid"] for row in page.rows] == projection.find(sort=sort), sort


def test_remembered_value_columns_answer_as_looked_up_ones_and_survive_a_rebuild(
        four: tuple[_Projection, list[str]]) -> None:
    projection, _ = four
    cache = ValueColumnCache()
    looked_up: list[str] = []

    def fetch(sql: str, params: Any = None) -> pd.DataFrame:
        if "runs_wide_columns" in sql:
            looked_up.append(sql)
        return projection.fetch(sql, params)

    def find() -> list[str]:
        return find_runs(fetch, RunFilter(values=(ValueFilter.parse("result.loss < 0.8"),)),
                         RunOrder.parse("-result.loss"), cache=cache).uid.tolist()

    assert find() == ["u0", "u3", "u1"]
    assert find() == ["u0", "u3", "u1"]
    assert len(looked_up) == 1  # the second query used the remembered column
    # a rebuild that gives result.loss no column (the cap reached first) leaves a remembered column gone
    projection.con.execute('ALTER TABLE runs_wide DROP COLUMN "result.loss"')
    projection.con.execute("DELETE FROM runs_wide_columns WHERE key = 'loss'")
    assert find() == ["u0", "u3", "u1"]  # retried with the key/value tables
    assert len(looked_up) == 2
    assert count_runs(fetch, RunFilter(values=(ValueFilter.parse("result.loss < 0.8"),)), cache=cache) == 3
