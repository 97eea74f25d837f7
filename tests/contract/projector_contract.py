"""The projector's exactly-once contract, on every bus: a test module subclasses `ProjectorContract`
and provides the `bus_factory` fixture; every test goes through the one `world` fixture.

Exactly once: whatever happens between the projector's reads and its commits (a crash between fold
and commit, a killed process, a writer's retry that appended part of a batch twice, the same log
appended twice, hostile records), folding resumes to the projection a clean fold of the log gives,
and every event read is applied, a duplicate, a conflict or a dead letter with its reason.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import duckdb
import pytest

import projections.projector as projector_module
from producers.amendments import amend_run, delete_runs, restore_runs
from producers.bus import Bus, BusRecord
from producers.writer import BackgroundWriter
from projections import Projector
from projections.projector import event_position
from schemas import EventCodec
from tests.contract.bus_contract import PartialAppend
from tests.support.foreign import accounting, envelope, finished, metric, result, started
from tests.support.tables import TABLES, snapshot

CODEC = EventCodec()


class _Crash(BaseException):
    """The process died between folding a batch and committing it."""


@dataclass
class World:
    """A bus under test, another way to open it, and a folder for projection files."""

    bus: Bus
    open_bus: Callable[[], Bus]  # picklable when the bus is shared across processes
    folder: Path

    def append_runs(self, runs: int, metrics: int, per_record: int = 100) -> int:
        """Append `runs` complete runs (run_started, `metrics` metrics with a result every 10th,
        run_finished), `per_record` events a bus record; returns the events appended."""
        total = 0
        for number in range(runs):
            uid = uuid.uuid4().hex
            events = [envelope(uid, 0, "run_started", started(f"run{number}", params={"n": str(number)}))]
            for step in range(metrics):
                events.append(envelope(uid, len(events), "metric", metric("loss", 1.0 / (step + 1), step=step)))
                if step % 10 == 0:
                    events.append(envelope(uid, len(events), "result", result("last", str(step))))
            events.append(envelope(uid, len(events), "run_finished", finished()))
            self.bus.append([(uid, CODEC.encode_batch(events[start:start + per_record]))
                             for start in range(0, len(events), per_record)])
            total += len(events)
        return total

    def fold(self, name: str, batch_size: int = 50_000) -> dict[str, list[tuple]]:
        """Fold the whole log into projection `name` (resuming whatever it holds); its snapshot."""
        with duckdb.connect(str(self.folder / f"{name}.duckdb")) as con:
            Projector(self.bus, con, CODEC, batch_size).catch_up()
            return snapshot(con)

    def accounting(self, name: str) -> dict[str, int]:
        with duckdb.connect(str(self.folder / f"{name}.duckdb")) as con:
            return accounting(con)

    def query(self, name: str, sql: str) -> list[tuple[Any, ...]]:
        with duckdb.connect(str(self.folder / f"{name}.duckdb")) as con:
            return con.execute(sql).fetchall()

    def records(self) -> list[BusRecord]:
        """Every record on the bus now."""
        ends, positions, found = self.bus.end_offsets(), {}, []
        deadline = time.monotonic() + 60
        while any(positions.get(p, 0) < end for p, end in ends.items()):
            assert time.monotonic() < deadline, f"the bus did not serve up to {ends} within 60 s"
            for record in self.bus.read(positions, 10_000, timeout=1.0):
                positions[record.partition] = record.offset + 1
                found.append(record)
        return found


def _project_in_steps(open_bus: Callable[[], Bus], db_path: str, batch_size: int, control: Connection) -> None:
    """A projector process: folds `batch_size` records a transaction, says so after each commit and
    goes on only when told to (so the parent knows how far it can be when it kills it)."""
    bus = open_bus()
    with duckdb.connect(db_path) as con:
        projector = Projector(bus, con, CODEC, batch_size)
        while projector.run_once(timeout=1.0):
            control.send("committed")
            if control.recv() != "go":
                return


class ProjectorContract:
    """Exactly-once folding on the bus that `bus_factory` opens."""

    # False for a bus held in one process: no projector process can be killed on it
    shared_across_processes: ClassVar[bool] = True

    @pytest.fixture
    def bus_factory(self) -> Iterator[Callable[[], Bus]]:
        """A zero-argument callable opening the (same, fresh for this test) bus; subclasses provide it."""
        raise NotImplementedError("a ProjectorContract subclass provides the bus_factory fixture")

    @pytest.fixture
    def world(self, bus_factory: Callable[[], Bus], tmp_path: Path) -> Iterator[World]:
        bus = bus_factory()
        try:
            yield World(bus, bus_factory, tmp_path)
        finally:
            bus.close()

    def test_a_crash_between_fold_and_commit_then_resume_equals_a_clean_fold(self, world: World) -> None:
        emitted = world.append_runs(runs=4, metrics=300)
        path = world.folder / "crashed.duckdb"
        con = duckdb.connect(str(path))
        projector = Projector(world.bus, con, CODEC, batch_size=2)
        for _ in range(3):
            assert projector.run_once() == 2
        committed = projector.positions()
        real_write = projector_module.write_batch

        def write_then_die(con: duckdb.DuckDBPyConnection, batch: Any) -> None:
            real_write(con, batch)  # the rows are written, the transaction is open
            con.close()  # the process dies: the uncommitted transaction with it
            raise _Crash

        with mock.patch.object(projector_module, "write_batch", write_then_die), pytest.raises(_Crash):
            projector.run_once()
        with duckdb.connect(str(path)) as reopened:
            assert Projector(world.bus, reopened, CODEC).positions() == committed
        resumed, clean = world.fold("crashed", batch_size=3), world.fold("clean")
        assert len(resumed["metrics"]) == 4 * 300
        assert resumed == clean
        assert world.accounting("crashed") == {"applied": emitted, "duplicates": 0, "conflicts": 0, "dead": 0}

    def test_a_killed_projector_process_resumes_to_equal_a_clean_fold(self, world: World) -> None:
        if not self.shared_across_processes:
            pytest.skip("this bus lives in one process: no projector process can be killed on it")
        world.append_runs(runs=4, metrics=2_000, per_record=500)  # 20 records, 10 batches of 2
        killed = world.folder / "killed.duckdb"
        context = multiprocessing.get_context("spawn")
        control, child_end = context.Pipe()
        child = context.Process(target=_project_in_steps, args=(world.open_bus, str(killed), 2, child_end))
        child.start()
        try:
            for _ in range(5):
                assert control.poll(120), "the projector process committed nothing"
                assert control.recv() == "committed"
                control.send("go")
            # now folding its 6th batch of 10, which it cannot get past: the kill lands in it or after its commit
        finally:
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(60)
        consumed = sum(world.query("killed", "SELECT coalesce(sum(next_offset), 0) FROM positions")[0])
        assert 0 < consumed < sum(world.bus.end_offsets().values()), "the kill must land mid-stream"
        resumed, clean = world.fold("killed"), world.fold("clean")
        assert len(resumed["metrics"]) == 4 * 2_000
        assert resumed == clean

    def test_a_writer_retry_after_an_append_that_stored_part_of_its_batch_is_folded_once(
            self, world: World) -> None:
        flaky = PartialAppend(world.open_bus(), stored=2)
        # one append for the whole run: no interval or heartbeat drains the queue before the flush
        writer = BackgroundWriter(flaky, CODEC, flush_interval_s=60, heartbeat_interval_s=60, events_per_record=100)
        uid = uuid.uuid4().hex
        writer.emit(uid, 0, "run_started", started("retried"))
        for step in range(1, 500):
            writer.emit(uid, step, "metric", metric("loss", float(step), step=step))
        writer.emit(uid, 500, "run_finished", finished())
        emitted = 501
        try:
            assert writer.flush(120), "the writer's retry did not land"
        finally:
            writer.close(30)
            flaky.close()  # the writer's own handle on the bus
        assert flaky.failures == 0, "the append never failed"
        stored_twice = 2 * 100  # the first two records (100 events each) went to the bus twice
        assert sum(world.bus.end_offsets().values()) == 6 + 2

        folded = world.fold("retried", batch_size=1)
        assert world.accounting("retried") == {"applied": emitted, "duplicates": stored_twice,
                                               "conflicts": 0, "dead": 0}
        assert len(folded["metrics"]) == 499
        assert world.query("retried", "SELECT state FROM runs") == [("completed",)]
        duplicates = world.query("retried", "SELECT count(DISTINCT event_id), min(seq), max(seq) FROM duplicates")
        assert duplicates == [(stored_twice, 0, stored_twice - 1)]

    def test_a_log_appended_twice_folds_like_once_with_every_copy_a_duplicate(self, world: World) -> None:
        emitted = world.append_runs(runs=2, metrics=50)
        once = world.fold("once")
        world.bus.append([(r.key, r.value) for r in world.records()])  # e.g. a push or an import repeated
        twice = world.fold("twice")
        assert world.accounting("twice") == {"applied": emitted, "duplicates": emitted, "conflicts": 0, "dead": 0}
        assert twice == once  # the first copies hold the same places; every second copy is a duplicate

    def test_hostile_records_are_dead_lettered_with_their_reason_and_the_rest_applied(self, world: World) -> None:
        world.append_runs(runs=1, metrics=5)
        world.bus.append([("junk", b"\x00\xffnot an event")])
        uid = uuid.uuid4().hex
        bad = envelope(uid, 1, "result", result("r", "not json"))
        world.bus.append([(uid, CODEC.encode_batch([envelope(uid, 0, "run_started", started("hostile")), bad,
                                                     envelope(uid, 2, "run_finished", finished())]))])
        world.append_runs(runs=1, metrics=5)
        world.fold("hostile", batch_size=1)
        dead = world.query("hostile", 'SELECT key, error, raw, event_id, run_uid, seq FROM dead_letters ORDER BY '
                                      'event_id NULLS FIRST')
        assert [row[0] for row in dead] == ["junk", uid]
        assert "bad marker" in dead[0][1] and bytes(dead[0][2]) == b"\x00\xffnot an event" and dead[0][3] is None
        assert dead[1][3:] == (bad["event_id"], uid, 1) and "not JSON" in dead[1][1]
        assert world.query("hostile", "SELECT count(*) FROM runs WHERE state = 'completed'") == [(3,)]

    def test_a_rebuild_equals_incremental_folding_and_positions_are_where_events_sit(self, world: World) -> None:
        path = world.folder / "incremental.duckdb"
        with duckdb.connect(str(path)) as con:
            projector = Projector(world.bus, con, CODEC, batch_size=1)
            for _ in range(3):
                world.append_runs(runs=2, metrics=40, per_record=30)
                projector.catch_up()  # fold a little at a time
            incremental = snapshot(con)
            projector.rebuild()
            rebuilt = snapshot(con)
        assert len(incremental["runs"]) == 6 and len(incremental["metrics"]) == 6 * 40
        assert rebuilt == incremental
        expected = sorted((event_position(r.partition, r.offset, index), event.event_id)
                          for r in world.records() for index, event in enumerate(CODEC.decode_all(r.value)))
        assert world.query("incremental", "SELECT position, event_id FROM events ORDER BY ALL") == expected

    def test_deletes_restores_and_amendments_fold_alike_incrementally_and_in_one_rebuild(self, world: World) -> None:
        """Edits from other processes interleave with the runs' own records, across partitions; a
        deleted parent hides its iteration, a restore folds both again from the stored events."""
        edit_tables = (*TABLES, "deleted_runs", "amendments")
        # runs_wide by column name: its columns come in the order keys are first seen, which
        # depends on how the partitions interleave
        wide = 'SELECT uid, note, "param.lr", "result.loss" FROM runs_wide ORDER BY uid'
        parent, child, other = (uuid.uuid4().hex for _ in range(3))

        def own(uid: str, seq: int, kind: str, payload: dict[str, Any]) -> None:
            world.bus.append([(uid, CODEC.encode_batch([envelope(uid, seq, kind, payload)]))])

        path = world.folder / "incremental.duckdb"
        with duckdb.connect(str(path)) as con:
            projector = Projector(world.bus, con, CODEC, batch_size=1)
            own(parent, 0, "run_started", started("parent", 1e9, params={"lr": "0.1"}))
            own(other, 0, "run_started", started("other", 1e9))
            own(child, 0, "run_started", started("child", parent_uid=parent, iteration=1))
            amend_run(world.bus, CODEC, parent, by="alice", labels={"q": "good"}, note="look")
            projector.catch_up()
            delete_runs(world.bus, CODEC, [parent, other], by="alice", reason="bad")
            own(child, 1, "result", result("loss", "0.5"))  # a job still running after the delete
            own(parent, 1, "metric", metric("m", 1.0, step=1))
            projector.catch_up()
            assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)
            restore_runs(world.bus, CODEC, [parent], by="bob")
            amend_run(world.bus, CODEC, parent, by="bob", removed_labels=["q"])
            own(child, 2, "run_finished", finished())
            projector.catch_up()
            incremental = snapshot(con, tables=edit_tables), con.execute(wide).fetchall()
            projector.rebuild()
            rebuilt = snapshot(con, tables=edit_tables), con.execute(wide).fetchall()
        assert rebuilt == incremental
        assert sorted(incremental[1]) == sorted([(parent, "look", 0.1, None), (child, None, None, 0.5)])
        assert sorted(row[0] for row in world.query("incremental", "SELECT uid FROM runs")) == sorted([parent, child])
        assert world.query("incremental", "SELECT uid, deleted_by FROM deleted_runs") == [(other, "alice")]
        assert world.query("incremental", f"SELECT note, labels FROM runs WHERE uid = '{parent}'") == [("look", "{}")]
        assert world.query("incremental", f"SELECT count(*) FROM metrics WHERE uid = '{parent}'") == [(1,)]
        assert world.query("incremental", f"SELECT state FROM runs WHERE uid = '{child}'") == [("completed",)]
