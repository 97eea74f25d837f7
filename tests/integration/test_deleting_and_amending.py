"""Deleting, restoring and amending runs: edit events (producers.amendments) folded by the projector.

A deleted run and its iterations leave every projection table but stay in `events`; a restore
folds them again from `events`; amendments change labels and the note and keep their history;
`as_of` before a tombstone shows the run. Each scenario is also folded in one go (rebuild) and
must give the same tables.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import duckdb
import pytest

from producers.amendments import amend_run, delete_runs, restore_runs
from producers.artifact_store import ArtifactStore
from producers.bus import Bus
from producers.bus.embedded import EmbeddedBus
from producers.bus.memory import MemoryBus
from projections import Projector
from projections.replay import stored_events
from projections.tables import purgeable_runs
from schemas import EventCodec
from tests.support.foreign import append, envelope, finished, metric, result, started

CODEC = EventCodec()
T0 = time.time()  # runs here are never silent long enough to be judged lost

# What a deleted run must leave: every table folded from its events (uid column).
ROW_TABLES = ("runs", "runs_wide", "params", "results", "metrics", "labels", "artifacts", "logs",
              "amendments", "result_history")


@pytest.fixture()
def bus() -> Iterator[MemoryBus]:
    bus = MemoryBus(partitions=3)
    yield bus
    bus.close()


@pytest.fixture()
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(":memory:")
    yield con
    con.close()


class Run:
    """A run's own process: events on its own stream, seq from 0."""

    def __init__(self, bus: Bus, parent: str | None = None, iteration: int = 0) -> None:
        self.bus, self.uid, self.seq = bus, uuid.uuid4().hex, 0
        self.send("run_started", started(name=self.uid[:6], parent_uid=parent, iteration=iteration,
                                         labels={"team": "a"}, params={"lr": "0.1"}))

    def send(self, kind: str, payload: dict[str, Any]) -> None:
        append(self.bus, self.uid, [envelope(self.uid, self.seq, kind, payload, ts=T0 + self.seq)])
        self.seq += 1

    def work(self) -> None:
        self.send("result", result("loss", "0.5"))
        self.send("metric", metric("m", 1.0, timestamp=T0, step=self.seq))
        self.send("log", {"chunks": [{"ts": T0, "stream": "stdout", "text": f"line {self.seq}"}]})
        self.send("artifact", {"key": "a.txt", "kind": "", "uri": "file:///a", "sha256": "0" * 64, "size": 1,
                               "format": "txt", "labels": {}, "meta": "{}"})


def rows(con: duckdb.DuckDBPyConnection, table: str, uid: str) -> int:
    return con.execute(f"SELECT count(*) FROM {table} WHERE uid = ?", [uid]).fetchone()[0]  # type: ignore[index]


def tables(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[Any, ...]]]:
    """Every public table and view, sorted, for comparing an incremental fold with a rebuild."""
    names = ("runs", "params", "results", "metrics", "labels", "artifacts", "logs", "deleted_runs",
             "amendments", "events")
    out = {name: sorted(con.execute(f"SELECT * FROM {name}").fetchall(), key=repr) for name in names}
    out["runs"] = [tuple(sorted(row, key=repr)) for row in out["runs"]]  # labels' key order may differ
    return out


def project(bus: Bus, con: duckdb.DuckDBPyConnection) -> Projector:
    projector = Projector(bus, con, CODEC)
    projector.catch_up()
    return projector


def assert_rebuild_agrees(bus: Bus, con: duckdb.DuckDBPyConnection) -> None:
    incremental = tables(con)
    with duckdb.connect(":memory:") as fresh:
        Projector(bus, fresh, CODEC, batch_size=1).catch_up()
        one_by_one = tables(fresh)
    with duckdb.connect(":memory:") as fresh:
        Projector(bus, fresh, CODEC).catch_up()
        in_one_go = tables(fresh)
    assert incremental == one_by_one == in_one_go


def test_a_deleted_run_and_its_iterations_leave_every_table_but_stay_in_events(bus, con) -> None:
    parent, kept = Run(bus), Run(bus)
    children = [Run(bus, parent.uid, i + 1) for i in range(2)]
    for run in (parent, kept, *children):
        run.work()
    project(bus, con)
    assert all(rows(con, table, parent.uid) for table in ("runs", "params", "metrics", "labels", "artifacts"))

    delete_runs(bus, CODEC, [parent.uid], by="alice", reason="bad data")
    project(bus, con)

    for uid in (parent.uid, *(c.uid for c in children)):
        assert {table: rows(con, table, uid) for table in ROW_TABLES} == dict.fromkeys(ROW_TABLES, 0)
        assert con.execute("SELECT count(*) FROM events WHERE run_uid = ?", [uid]).fetchone()[0] > 0
    assert rows(con, "runs", kept.uid) == 1 and rows(con, "metrics", kept.uid) == 1
    assert con.execute("SELECT uid, deleted_by, reason FROM deleted_runs").fetchall() == [
        (parent.uid, "alice", "bad data")]
    assert_rebuild_agrees(bus, con)


def test_events_after_the_tombstone_are_kept_and_folded_only_on_restore(bus, con) -> None:
    parent = Run(bus)
    parent.work()
    project(bus, con)
    delete_runs(bus, CODEC, [parent.uid], by="alice")
    parent.send("result", result("late", "1"))  # the job still runs
    late_child = Run(bus, parent.uid, 1)  # an iteration started after the delete
    late_child.work()
    project(bus, con)
    assert rows(con, "results", parent.uid) == 0 and rows(con, "runs", late_child.uid) == 0

    restore_runs(bus, CODEC, [parent.uid], by="bob")
    parent.send("run_finished", finished())
    project(bus, con)

    assert con.execute("SELECT key FROM results WHERE uid = ? ORDER BY key", [parent.uid]).fetchall() == [
        ("late",), ("loss",)]
    assert con.execute("SELECT state FROM runs WHERE uid = ?", [parent.uid]).fetchone() == ("completed",)
    assert rows(con, "runs", late_child.uid) == 1 and rows(con, "logs", late_child.uid) == 1
    assert con.execute("SELECT count(*) FROM deleted_runs").fetchone() == (0,)
    assert_rebuild_agrees(bus, con)


def test_delete_and_restore_in_one_batch_fold_as_one_by_one(bus, con) -> None:
    run = Run(bus)
    run.work()
    delete_runs(bus, CODEC, [run.uid], by="alice")
    run.send("metric", metric("m", 2.0, timestamp=T0, step=99))
    restore_runs(bus, CODEC, [run.uid], by="alice")
    delete_runs(bus, CODEC, [run.uid], by="carol", reason="again")
    project(bus, con)  # one batch holds them all
    assert rows(con, "runs", run.uid) == 0
    assert con.execute("SELECT deleted_by FROM deleted_runs").fetchall() == [("carol",)]
    restore_runs(bus, CODEC, [run.uid], by="alice")
    project(bus, con)
    assert rows(con, "metrics", run.uid) == 2 and rows(con, "logs", run.uid) == 1
    assert_rebuild_agrees(bus, con)


def test_an_iteration_deleted_itself_stays_deleted_when_its_parent_is_restored(bus, con) -> None:
    parent = Run(bus)
    child = Run(bus, parent.uid, 1)
    delete_runs(bus, CODEC, [child.uid], by="a")
    delete_runs(bus, CODEC, [parent.uid], by="a")
    restore_runs(bus, CODEC, [parent.uid], by="a")
    project(bus, con)
    assert rows(con, "runs", parent.uid) == 1 and rows(con, "runs", child.uid) == 0
    restore_runs(bus, CODEC, [child.uid], by="a")
    project(bus, con)
    assert rows(con, "runs", child.uid) == 1
    assert_rebuild_agrees(bus, con)


def test_amendments_set_and_remove_labels_set_the_note_and_keep_their_history(bus, con) -> None:
    run = Run(bus)
    run.send("heartbeat", {"interval_s": 1e6})
    project(bus, con)
    last_spoke = con.execute("SELECT last_event_at FROM runs WHERE uid = ?", [run.uid]).fetchone()

    amend_run(bus, CODEC, run.uid, by="alice", labels={"quality": "good", "team": "b"}, note="first look")
    amend_run(bus, CODEC, run.uid, by="bob", removed_labels=["team"])
    amend_run(bus, CODEC, run.uid, by="bob", note="checked")
    project(bus, con)

    assert con.execute("SELECT key, value FROM labels WHERE uid = ? ORDER BY key", [run.uid]).fetchall() == [
        ("quality", "good")]
    labels, note, state, spoke = con.execute(
        "SELECT labels, note, state, last_event_at FROM runs WHERE uid = ?", [run.uid]).fetchone()
    assert labels == '{"quality":"good"}' and note == "checked" and state == "running"
    assert (spoke,) == last_spoke  # an edit is not the run speaking
    history = con.execute("SELECT amended_by, labels, removed_labels, note FROM amendments "
                          "WHERE uid = ? ORDER BY position", [run.uid]).fetchall()
    assert history == [("alice", '{"quality":"good","team":"b"}', "[]", "first look"),
                       ("bob", "{}", '["team"]', None), ("bob", "{}", "[]", "checked")]
    assert_rebuild_agrees(bus, con)


def test_as_of_before_the_tombstone_shows_the_run(bus, con) -> None:
    run = Run(bus)
    run.work()
    projector = project(bus, con)
    before = con.execute("SELECT max(position) FROM events").fetchone()[0]
    delete_runs(bus, CODEC, [run.uid], by="alice")
    projector.catch_up()
    with duckdb.connect(":memory:") as past:  # what RunDB(as_of=...) does: replay events up to it
        replay = Projector(bus, past, CODEC)
        for chunk in stored_events(con, "position <= ?", [before]):
            replay.apply_events(chunk)
        assert rows(past, "runs", run.uid) == 1 and rows(past, "metrics", run.uid) == 1
    assert rows(con, "runs", run.uid) == 0


@pytest.mark.parametrize("payload, reason", [
    ({"by": "", "reason": ""}, "by is empty"),
    ({"by": "x" * 300, "reason": ""}, "at most 256"),
    ({"by": "a", "reason": "r" * 70_000}, "reason holds 70000 characters"),
])
def test_bad_tombstones_are_dead_letters_with_their_reason(bus, con, payload, reason) -> None:
    run = Run(bus)
    append(bus, run.uid, [envelope(run.uid, 0, "run_deleted", payload, stream="editor")])
    project(bus, con)
    assert reason in con.execute("SELECT error FROM dead_letters").fetchone()[0]
    assert rows(con, "runs", run.uid) == 1


@pytest.mark.parametrize("change, reason", [
    ({"labels": {"": "x"}}, "label key is empty"),
    ({"removed_labels": [""]}, "label key is empty"),
    ({"labels": {"k": "v"}, "removed_labels": ["k"]}, "both set and removed"),
    ({"note": "n" * 70_000}, "note holds 70000 characters"),
    ({}, "changes nothing"),
])
def test_bad_amendments_are_dead_letters_with_their_reason(bus, con, change, reason) -> None:
    run = Run(bus)
    payload = {"by": "a", "labels": {}, "removed_labels": [], "note": None, **change}
    append(bus, run.uid, [envelope(run.uid, 0, "run_amended", payload, stream="editor")])
    project(bus, con)
    assert reason in con.execute("SELECT error FROM dead_letters").fetchone()[0]
    assert con.execute("SELECT labels->>'team', note FROM runs").fetchone() == ("a", None)


def test_an_edit_of_an_unknown_run_is_a_dead_letter(bus, con) -> None:
    amend_run(bus, CODEC, "nosuchrun", by="a", note="hello")
    delete_runs(bus, CODEC, ["nosuchrun"], by="a")
    project(bus, con)
    errors = [row[0] for row in con.execute("SELECT error FROM dead_letters ORDER BY \"offset\"").fetchall()]
    assert errors == ["run nosuchrun is not known: no run_started before this run_amended",
                      "run nosuchrun is not known: no run_started before this run_deleted"]


def test_a_purge_blanks_the_deleted_runs_records_and_the_projection_starts_over(tmp_path) -> None:
    bus = EmbeddedBus(tmp_path / "log.sqlite")
    con = duckdb.connect(":memory:")
    try:
        gone, kept = Run(bus), Run(bus)
        child = Run(bus, gone.uid, 1)
        gone.work()
        kept.work()
        delete_runs(bus, CODEC, [gone.uid], by="a")
        project(bus, con)
        end = bus.end_offsets()
        assert con.execute("SELECT count(*) FROM events WHERE run_uid = ?", [gone.uid]).fetchone()[0] > 0
        assert purgeable_runs(con) == sorted([gone.uid, child.uid])

        blanked = bus.blank_records(purgeable_runs(con), CODEC.encode_batch([]))

        assert blanked == 7 and bus.end_offsets() == end  # offsets stay: no consumer skips a later append
        for uid in (gone.uid, child.uid):
            assert not [r for r in bus.read({0: 0}) if r.key == uid or uid.encode() in r.value]
            assert uid.encode() not in (tmp_path / "log.sqlite").read_bytes()
        kept.send("result", result("after", "1"))
        project(bus, con)  # the epoch changed: folded again from the start
        assert con.execute("SELECT count(*) FROM events WHERE run_uid = ?", [gone.uid]).fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
        assert rows(con, "results", kept.uid) == 2
        assert_rebuild_agrees(bus, con)
    finally:
        con.close()
        bus.close()


def test_bodies_no_artifact_references_are_removed_once_old_enough(tmp_path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    old, kept, fresh = (store.put_bytes(body) for body in (b"old", b"kept", b"fresh"))
    for body in (old, kept):
        os.utime(store.root / body.sha256[:2] / body.sha256, (time.time() - 7200,) * 2)
    (store.root / "xx").mkdir()
    (store.root / old.sha256[:2] / ".tmp-partial").write_bytes(b"")

    removed = store.remove_unreferenced({kept.sha256}, older_than_s=3600)

    assert removed == [old.sha256]
    assert store.read_verified("k", kept.sha256) == b"kept" and store.read_verified("f", fresh.sha256) == b"fresh"
    assert (store.root / old.sha256[:2] / ".tmp-partial").exists()
    again = store.put_bytes(b"kept")  # stored again: touched, so a purge racing the new run spares it
    assert store.remove_unreferenced(set(), older_than_s=3600) == [] and again.sha256 == kept.sha256
