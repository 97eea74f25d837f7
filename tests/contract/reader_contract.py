"""The reader contract: every way of reading the projection (folding in-process, the projection
service) answers the same API the same way. Test modules subclass `ReaderContract` and provide the
`reader` fixture: a factory `reader(as_of=None) -> RunDB` over the test's home."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pytest

from engine import NewRun, new_function
from engine.api import session
from projections.query import ReadOnlyError, RunDB
from tests.support.foreign import append, envelope, started

Reader = Callable[..., RunDB]


def _train(context, acc=0.0, lr=0.1):
    context.log_result("accuracy", acc)
    context.log_metric("loss", 1.0 - acc, step=0)
    context.log_metric("loss", 0.5 - acc / 2, step=1)
    print(f"trained with lr={lr}")


def _count_up(context, steps=0):
    for k in range(1, steps + 1):
        context.log_result(f"r{k}", "logged")  # text: no runs_wide column per key
        context.log_metric("m", k)
        time.sleep(0.002)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def record(name: str, acc: float, lr: float, team: str) -> str:
    task = NewRun(handler=_train, name=name, params={"acc": acc, "lr": lr}).set_label("team", team)
    return new_function().run(task).uid


class ReaderContract:
    """Behaviour every reader shows. Subclasses provide the `reader` fixture."""

    @pytest.fixture
    def runs(self, home: Path) -> list[str]:
        uids = [record(name, acc, lr, team)
                for name, acc, lr, team in (("a", 0.5, 0.1, "x"), ("b", 0.9, 0.01, "y"), ("a", 0.7, 0.001, "y"))]
        session().services.writer.flush()
        return uids

    def test_sql_answers_with_the_dtypes_of_a_local_query(self, runs: list[str], reader: Reader) -> None:
        frame = reader().sql("SELECT uid, started_at, 1.5::DOUBLE AS x, 2::BIGINT AS n FROM runs ORDER BY uid")
        assert sorted(frame.uid) == sorted(runs)
        assert str(frame.started_at.dtype).startswith("datetime64") and frame.started_at.dt.tz is not None
        assert frame.x.dtype == "float64" and frame.n.dtype == "int64"

    def test_answers_are_frames_the_caller_can_write_into(self, runs: list[str], reader: Reader) -> None:
        frame = reader().sql("SELECT uid, 1.5::DOUBLE AS x, 2::BIGINT AS n FROM runs ORDER BY uid")
        frame.loc[frame.uid == runs[0], "x"] = 0.0
        frame.iloc[0, 2] = 7
        frame.fillna({"x": 1.0}, inplace=True)
        assert frame.x.tolist().count(0.0) == 1 and frame.n.iloc[0] == 7
        listed = reader().list_runs()
        listed.loc[:, "duration_s"] = 0.0
        assert (listed.duration_s == 0.0).all()

    def test_sql_takes_parameters(self, runs: list[str], reader: Reader) -> None:
        frame = reader().sql("SELECT uid FROM runs WHERE name = ? AND started_at > ?::TIMESTAMPTZ",
                             ["a", "2000-01-01"])
        assert set(frame.uid) == {runs[0], runs[2]}

    def test_list_runs_filters_and_sorts(self, runs: list[str], reader: Reader) -> None:
        db = reader()
        assert list(db.list_runs(name="a", labels={"team": "y"}).uid) == [runs[2]]
        assert list(db.list_runs(sort_by="-result.accuracy").uid) == [runs[1], runs[2], runs[0]]
        assert list(db.list_runs(sort_by="param.lr", limit=2).uid) == [runs[2], runs[1]]

    def test_read_run_gives_everything_known_by_a_unique_prefix(self, runs: list[str], reader: Reader) -> None:
        found = reader().read_run(runs[1][:10])
        assert found["uid"] == runs[1] and found["state"] == "completed"
        assert found["params"] == {"acc": 0.9, "lr": 0.01}
        assert found["results"] == {"accuracy": 0.9}
        assert found["metrics"] == {"loss": pytest.approx(0.05)}
        assert found["labels"]["team"] == "y"

    def test_get_log_returns_the_state_and_the_text_from_an_offset(self, runs: list[str], reader: Reader) -> None:
        state, text = reader().get_log(runs[0])
        assert state == "completed" and "trained with lr=0.1\n" in text
        assert reader().get_log(runs[0], offset=len(text)) == ("completed", "")

    def test_one_reader_block_is_one_snapshot(self, runs: list[str], reader: Reader) -> None:
        """A run recorded (and seen by another read) during a reader block is not seen inside it."""
        db = reader()
        with db.reader() as fetch:
            before = fetch("SELECT count(*) AS n FROM runs").n[0]
            new = record("late", 0.1, 0.2, "z")
            session().services.writer.flush()
            assert new in set(reader().sql("SELECT uid FROM runs").uid)  # folded, visible outside
            assert fetch("SELECT count(*) AS n FROM runs").n[0] == before == 3
        assert len(reader().sql("SELECT uid FROM runs")) == 4

    def test_read_run_is_one_snapshot_while_the_run_is_being_written(self, home: Path, reader: Reader) -> None:
        """The run logs result r<k>, then metric m = k, over and over; every read_run must see a
        state the log passed through: as many results as m, or one more (results are read before
        metrics, so reads from different moments would show m ahead of the results)."""
        done: list[str] = []
        job = threading.Thread(target=lambda: done.append(
            new_function().run(NewRun(handler=_count_up, name="counting", params={"steps": 400})).uid))
        job.start()
        db = reader()
        reads = 0
        try:
            while not done:
                found = db.sql("SELECT uid FROM runs WHERE name = 'counting'")
                if found.empty:
                    continue
                run = db.read_run(found.uid[0])
                shown, logged = int(run["metrics"].get("m", 0)), len(run["results"])
                assert logged in (shown, shown + 1), (logged, shown)
                reads += 1
        finally:
            job.join(120)
        assert reads > 0 and db.read_run(done[0])["metrics"]["m"] == 400

    def test_as_of_answers_from_the_past_and_the_same_twice(self, runs: list[str], reader: Reader) -> None:
        first_end = reader().sql("SELECT max(position) AS p FROM events WHERE run_uid = ?", [runs[0]]).p[0]
        for _ in range(2):
            past = reader(as_of=int(first_end))
            assert list(past.sql("SELECT uid FROM runs").uid) == [runs[0]]
            assert past.read_run(runs[0])["results"] == {"accuracy": 0.5}
        assert len(reader(as_of="2000-01-01").sql("SELECT uid FROM runs")) == 0
        with pytest.raises(ValueError, match=r"neither an events\.position nor a time"):
            reader(as_of="yesterday-ish").sql("SELECT 1")

    def test_as_of_a_time_includes_an_event_that_arrived_after_it_was_first_asked(
            self, runs: list[str], reader: Reader) -> None:
        """A past that was answered once (and may be kept) still shows an event stamped before the
        cutoff that reached the bus later (a producer that was cut off from it, a lagging partition)."""
        cutoff = time.time()
        assert len(reader(as_of=_iso(cutoff)).sql("SELECT uid FROM runs")) == 3
        append(session().services.bus, "late-comer", [envelope("late-comer", 0, "run_started", started(name="late"),
                                                       ts=cutoff - 60)])
        assert "late-comer" in set(reader(as_of=_iso(cutoff)).sql("SELECT uid FROM runs").uid)

    @pytest.mark.parametrize("statement", ["DELETE FROM runs", "DROP TABLE runs", "CREATE TABLE t (x INT)",
                                           "SELECT 1; DELETE FROM runs", "ATTACH 'other.db'",
                                           "COPY runs TO 'out.csv'", "SET threads = 1"])
    def test_writes_are_refused_as_read_only(self, runs: list[str], reader: Reader, statement: str) -> None:
        with pytest.raises(ReadOnlyError, match="read-only"):
            reader().sql(statement)
        assert len(reader().sql("SELECT uid FROM runs")) == 3

    def test_a_write_hidden_in_a_select_is_refused(self, runs: list[str], reader: Reader) -> None:
        with pytest.raises(ReadOnlyError, match="read-only"):
            reader().sql("SELECT * FROM read_csv('/etc/passwd')")

    def test_errors_keep_their_class_and_a_one_line_message(self, runs: list[str], reader: Reader) -> None:
        db = reader()
        with pytest.raises(duckdb.BinderException) as binder:
            db.sql("SELECT no_such_column FROM runs")
        assert "no_such_column" in str(binder.value) and "\n" not in str(binder.value)
        with pytest.raises(ValueError, match="SQL does not parse"):
            db.sql("SELEC 1")
        with pytest.raises(KeyError, match="no run with uid 'zzzz'"):
            db.read_run("zzzz")
        with pytest.raises(duckdb.ConversionException):
            db.sql("SELECT 'x'::INTEGER")

    def test_a_failed_statement_leaves_the_block_usable(self, runs: list[str], reader: Reader) -> None:
        with reader().reader() as fetch:
            with pytest.raises(duckdb.BinderException):
                fetch("SELECT nope FROM runs")
            assert fetch("SELECT count(*) AS n FROM runs").n[0] == 3
