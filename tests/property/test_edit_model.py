"""Property: runs (some iterations of others), amendments, deletes and restores written in random
interleavings over two partitions fold, incrementally in random batch sizes and in one go, into the
same tables, and those equal a plain-Python model: a run is shown unless its last tombstone or
its parent's stands; a shown run's labels, note and results are those of all its events in order."""

from __future__ import annotations

import json
import time
from typing import Any

import duckdb
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from producers.amendments import amendment, append_events, deletion, restoration
from producers.bus.memory import MemoryBus
from projections import Projector
from schemas import EventCodec
from tests.support.foreign import append, envelope, result, started

CODEC = EventCodec()
NOW = time.time()  # events are stamped now-ish and heartbeats far apart: no run is judged lost
KEYS = st.sampled_from(["a", "b", "c"])


class ModelRun:
    def __init__(self, uid: str, parent: str | None, labels: dict[str, str]) -> None:
        self.uid, self.parent, self.seq = uid, parent, 0
        self.labels, self.note, self.results = dict(labels), None, {}
        self.deleted_by: str | None = None


class EditMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bus = MemoryBus(partitions=2)
        self.con = duckdb.connect(":memory:")
        self.runs: dict[str, ModelRun] = {}

    def _own(self, run: ModelRun, kind: str, payload: dict[str, Any]) -> None:
        append(self.bus, run.uid, [envelope(run.uid, run.seq, kind, payload, ts=NOW + run.seq)])
        run.seq += 1

    @rule(labels=st.dictionaries(KEYS, st.sampled_from(["x", "y"]), max_size=2), data=st.data())
    def start_run(self, labels: dict[str, str], data: st.DataObject) -> None:
        parents = [r.uid for r in self.runs.values() if r.parent is None]
        parent = data.draw(st.sampled_from([None, *parents]))
        run = ModelRun(f"{len(self.runs):032x}", parent, labels)  # the same uids when Hypothesis replays
        self.runs[run.uid] = run
        self._own(run, "run_started", started(name="r", parent_uid=parent, labels=labels, interval_s=1e9))

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), key=KEYS, value=st.integers(0, 9))
    def log_result(self, data: st.DataObject, key: str, value: int) -> None:
        run = self.runs[data.draw(st.sampled_from(list(self.runs)))]
        self._own(run, "result", result(key, str(value)))
        run.results[key] = str(value)

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), set_=st.dictionaries(KEYS, st.sampled_from(["u", "v"]), max_size=2),
          removed=st.lists(KEYS, max_size=2), note=st.none() | st.sampled_from(["n1", "n2"]))
    def amend(self, data: st.DataObject, set_: dict[str, str], removed: list[str], note: str | None) -> None:
        removed = [key for key in removed if key not in set_]
        if not set_ and not removed and note is None:
            return
        run = self.runs[data.draw(st.sampled_from(list(self.runs)))]
        append_events(self.bus, CODEC, [amendment(run.uid, "ed", set_, removed, note, ts=NOW)])
        run.labels.update(set_)
        for key in removed:
            run.labels.pop(key, None)
        run.note = note if note is not None else run.note

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), by=st.sampled_from(["alice", "bob"]))
    def delete(self, data: st.DataObject, by: str) -> None:
        run = self.runs[data.draw(st.sampled_from(list(self.runs)))]
        append_events(self.bus, CODEC, [deletion(run.uid, by, "why", ts=NOW)])
        run.deleted_by = run.deleted_by or by  # the first standing tombstone is the one shown

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        run = self.runs[data.draw(st.sampled_from(list(self.runs)))]
        append_events(self.bus, CODEC, [restoration(run.uid, "carol", ts=NOW)])
        run.deleted_by = None

    @rule(batch_size=st.integers(1, 7))
    def project(self, batch_size: int) -> None:
        Projector(self.bus, self.con, CODEC, batch_size=batch_size).catch_up()
        self._check(self.con)

    def _shown(self, run: ModelRun) -> bool:
        parent = self.runs.get(run.parent) if run.parent else None
        return run.deleted_by is None and (parent is None or parent.deleted_by is None)

    def _check(self, con: duckdb.DuckDBPyConnection) -> None:
        expected = {uid: (run.labels, run.note) for uid, run in self.runs.items() if self._shown(run)}
        shown: dict[str, tuple[dict[str, str], str | None]] = {
            uid: ({}, note) for uid, note in con.execute("SELECT uid, note FROM runs").fetchall()}
        for uid, key, value in con.execute("SELECT uid, key, value FROM labels").fetchall():
            shown.setdefault(uid, ({}, "labels of a run not shown"))[0][key] = value
        assert shown == expected
        for uid, labels in con.execute("SELECT uid, labels FROM runs").fetchall():
            assert json.loads(labels) == expected[uid][0]
        results = {(uid, key): value for uid, run in self.runs.items() if self._shown(run)
                   for key, value in run.results.items()}
        assert dict(((u, k), v) for u, k, v in con.execute("SELECT uid, key, value FROM results").fetchall()) == results
        deleted = {uid: run.deleted_by for uid, run in self.runs.items() if run.deleted_by}
        assert dict(con.execute("SELECT uid, deleted_by FROM deleted_runs").fetchall()) == deleted
        assert con.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)

    @invariant()
    def positions_never_pass_the_log(self) -> None:
        ends = self.bus.end_offsets()
        assert all(offset <= ends.get(p, 0) for p, offset in Projector(self.bus, self.con, CODEC).positions().items())

    def teardown(self) -> None:
        try:
            Projector(self.bus, self.con, CODEC, batch_size=3).catch_up()
            self._check(self.con)
            with duckdb.connect(":memory:") as fresh:
                Projector(self.bus, fresh, CODEC).catch_up()
                self._check(fresh)
                assert _tables(fresh) == _tables(self.con)
        finally:
            self.con.close()
            self.bus.close()


def _tables(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[Any, ...]]]:
    names = ("params", "results", "labels", "deleted_runs", "amendments", "events", "hidden_runs")
    out = {name: sorted(con.execute(f"SELECT * FROM {name}").fetchall(), key=repr) for name in names}
    out["runs"] = sorted(con.execute("SELECT uid, parent_uid, state, note, started_at, last_event_at, "
                                     "labels::JSON::MAP(VARCHAR, VARCHAR) FROM runs").fetchall(), key=repr)
    return out


EditMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestEdits = EditMachine.TestCase
