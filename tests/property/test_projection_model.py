"""Property: whatever is written to the bus, in whatever interleaving, and however the projector
is batched, killed, restarted or rebuilt, the projection equals a plain-Python fold of the log, and
every record is accounted for: applied + duplicate + conflict + dead letter = emitted.

Writers append batches of their run's events (several runs, several streams per run) in random
interleavings, with exact duplicates of earlier records, events at places already taken, second
run_starteds, 'lost' verdicts from other streams, events DuckDB could not store, events a user
projection refuses (found by the projector's bisection), and records that do not decode.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import duckdb
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import projections.projector as projector_module
from producers.bus.embedded import EmbeddedBus
from projections import Projector
from projections.user import UserProjection
from schemas import Event, EventCodec
from tests.support.foreign import PLACEHOLDER, accounting, envelope, finished, metric, result, started

CODEC = EventCodec()
NEVER_SILENT = 1e6  # heartbeat interval of every run here: the clock never judges one lost
REFUSED_KEY = "boom"  # results with this key are refused by the user projection below

GOOD = ["result", "param", "metric", "label", "heartbeat", "finish", "artifact"]
POISON = ["surrogate result", "not json result", "empty result", "nan metric time", "ns metric time",
          "inf event time", "bogus state", "bad meta", "refused by user projection"]
GARBAGE = [b"", b"garbage", b"\xc3\x01" + b"\x00" * 8, "invalid utf-8"]


class Picky(UserProjection):
    """A user projection that refuses some events: the projector must quarantine them, not stop."""

    name = "picky"

    def create(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute("CREATE TABLE IF NOT EXISTS picky (uid VARCHAR, key VARCHAR)")

    def drop(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute("DROP TABLE IF EXISTS picky")

    def apply(self, con: duckdb.DuckDBPyConnection, events: Sequence[Event]) -> None:
        rows = []
        for event in events:
            if event.type == "result":
                if event.payload["key"] == REFUSED_KEY:
                    raise ValueError(f"picky refuses result {REFUSED_KEY!r}")
                rows.append((event.run_uid, event.payload["key"]))
        if rows:
            con.executemany("INSERT INTO picky VALUES (?, ?)", rows)


class _Crash(BaseException):
    """The process died in the middle of a transaction."""


class Writer:
    """One stream of one run, with its events not yet appended."""

    def __init__(self, uid: str) -> None:
        self.uid, self.stream, self.next_seq = uid, uuid.uuid4().hex, 0
        self.pending: list[dict[str, Any]] = []

    def event(self, kind: str, payload: dict[str, Any], ts: float | None = None) -> dict[str, Any]:
        made = envelope(self.uid, self.next_seq, kind, payload, self.stream, ts)
        self.next_seq += 1
        self.pending.append(made)
        return made


def _good(kind: str, key: str, number: int) -> tuple[str, dict[str, Any]]:
    return {
        "result": ("result", result(key, str(number))),
        "param": ("param", {"key": key, "value": f'"{number}"'}),
        "metric": ("metric", metric(key, float(number), step=number)),
        "label": ("label", {"key": key, "value": f"v{number}"}),
        "heartbeat": ("heartbeat", {"interval_s": NEVER_SILENT}),
        "finish": ("run_finished", finished(["completed", "error", "aborted"][number % 3])),
        "artifact": ("artifact", {"key": key, "kind": "artifact", "uri": "file:///x", "sha256": "0" * 64,
                                  "size": number, "format": None, "labels": {}, "meta": "{}"}),
    }[kind]


def _poison(kind: str) -> tuple[str, dict[str, Any], float | None]:
    """(type, payload, event time) of an event the projection cannot hold."""
    meta = {"key": "k", "kind": "artifact", "uri": "file:///x", "sha256": "0" * 64, "size": 1, "format": None,
            "labels": {}, "meta": "{"}
    return {
        "surrogate result": ("result", result("a", '"\\udc80"'), None),
        "not json result": ("result", result("a", "{nope"), None),
        "empty result": ("result", result("b", ""), None),
        "nan metric time": ("metric", metric("m", 1.0, math.nan), None),
        "ns metric time": ("metric", metric("m", 1.0, float(time.time_ns())), None),
        "inf event time": ("heartbeat", {"interval_s": 1.0}, math.inf),
        "bogus state": ("run_finished", finished("bogus"), None),
        "bad meta": ("artifact", meta, None),
        "refused by user projection": ("result", result(REFUSED_KEY, "1"), None),
    }[kind]


def model_fold(records: list[bytes], poisoned: set[str]) -> dict[str, Any]:
    """The projection a plain-Python fold of the log gives (records in log order)."""
    occupied: dict[tuple[str, str, int], str] = {}
    conflicted: set[str] = set()
    starts: set[str] = set()
    out: dict[str, Any] = {"events": [], "dead": [], "conflicts": [], "duplicates": [], "results": {},
                           "params": {}, "labels": {}, "metrics": [], "runs": {}, "picky": [], "owners": {}}
    for value in records:
        try:
            events = CODEC.decode_all(value)
        except ValueError:
            out["dead"].append("")
            continue
        for e in events:
            key = (e.run_uid, e.stream, e.seq)
            taken = key in occupied or (e.type == "run_started" and e.run_uid in starts)
            if occupied.get(key) == e.event_id or (taken and e.event_id in conflicted):
                out["duplicates"].append(e.event_id)
            elif taken:
                conflicted.add(e.event_id)
                out["conflicts"].append(e.event_id)
            else:
                occupied[key] = e.event_id
                if e.type == "run_started":
                    starts.add(e.run_uid)
                if e.event_id in poisoned:
                    out["dead"].append(e.event_id)
                else:
                    _model_apply(out, e)
    for table in ("events", "dead", "conflicts", "duplicates", "metrics", "picky"):
        out[table] = sorted(out[table])
    del out["owners"]  # how the model judges run_finished; not a table
    return out


def _model_apply(out: dict[str, Any], e: Event) -> None:
    p = e.payload
    out["events"].append((e.event_id, e.run_uid, e.stream, e.seq, e.type))
    runs = out["runs"]
    if e.type == "run_started":
        runs[e.run_uid] = "running"
        out["owners"][e.run_uid] = e.stream
        out["params"].update({(e.run_uid, k): v for k, v in p["params"].items()})
        out["labels"].update({(e.run_uid, k): v for k, v in p["labels"].items()})
    elif e.type == "result":
        out["results"][(e.run_uid, p["key"])] = p["value"]
        out["picky"].append((e.run_uid, p["key"]))
    elif e.type == "param":
        out["params"][(e.run_uid, p["key"])] = p["value"]
    elif e.type == "label":
        out["labels"][(e.run_uid, p["key"])] = p["value"]
    elif e.type == "metric":
        out["metrics"].append((e.run_uid, p["key"], p["step"], p["value"]))
    if e.run_uid not in runs or e.type == "run_started":
        return
    if e.type == "run_finished":
        verdict = p["state"] == "lost" or out["owners"][e.run_uid] != e.stream
        if not verdict or runs[e.run_uid] == "running":
            runs[e.run_uid] = p["state"]
    elif runs[e.run_uid] == "lost":
        runs[e.run_uid] = "running"


def projected(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """The same shape as `model_fold`, read from the projection."""
    def rows(sql: str) -> list[tuple[Any, ...]]:
        return con.execute(sql).fetchall()

    runs = rows("SELECT uid, state, finished_at IS NULL FROM runs")
    assert all(open_ == (state == "running") for _, state, open_ in runs), runs
    return {
        "events": sorted(rows("SELECT event_id, run_uid, stream, seq, type FROM events")),
        "dead": sorted(r[0] or "" for r in rows("SELECT event_id FROM dead_letters")),
        "conflicts": sorted(r[0] for r in rows("SELECT event_id FROM conflicts")),
        "duplicates": sorted(r[0] for r in rows("SELECT event_id FROM duplicates")),
        "results": {(u, k): v for u, k, v in rows("SELECT uid, key, value FROM results")},
        "params": {(u, k): v for u, k, v in rows("SELECT uid, key, value FROM params")},
        "labels": {(u, k): v for u, k, v in rows("SELECT uid, key, value FROM labels")},
        "metrics": sorted(rows("SELECT uid, key, step, value FROM metrics")),
        "runs": {uid: state for uid, state, _ in runs},
        "picky": sorted(rows("SELECT uid, key FROM picky")),
    }


EXAMPLES: Counter[str] = Counter()


class ProjectionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        EXAMPLES["examples"] += 1
        self.dir = Path(tempfile.mkdtemp(prefix="runbus-model-"))
        self.bus = EmbeddedBus(self.dir / "log.sqlite")
        self.db_path = self.dir / "projection.duckdb"
        self.con = duckdb.connect(str(self.db_path))
        self.writers: list[Writer] = []
        self.appended: list[tuple[str, bytes]] = []
        self.poisoned: set[str] = set()
        self.emitted = 0

    def _projector(self, batch_size: int = 50_000) -> Projector:
        return Projector(self.bus, self.con, CODEC, batch_size, [Picky()])

    def _append(self, key: str, value: bytes, events: int) -> None:
        self.bus.append([(key, value)])
        self.appended.append((key, value))
        self.emitted += events

    # writers ----------------------------------------------------------------------------------

    @rule(name=st.sampled_from(["a", "b"]), labelled=st.booleans())
    def start_run(self, name: str, labelled: bool) -> None:
        writer = Writer(uuid.uuid4().hex)
        writer.event("run_started", started(name, NEVER_SILENT, params={"lr": "0.1"},
                                            labels={"team": "x"} if labelled else {}))
        self.writers.append(writer)

    @precondition(lambda self: self.writers)
    @rule(data=st.data(), events=st.lists(st.tuples(st.sampled_from(GOOD), st.sampled_from(["a", "b"]),
                                                    st.integers(0, 9)), min_size=1, max_size=6))
    def emit(self, data: st.DataObject, events: list[tuple[str, str, int]]) -> None:
        writer = data.draw(st.sampled_from(self.writers))
        for kind, key, number in events:
            writer.event(*_good(kind, key, number))

    @precondition(lambda self: self.writers)
    @rule(data=st.data(), kind=st.sampled_from(POISON))
    def emit_poison(self, data: st.DataObject, kind: str) -> None:
        writer = data.draw(st.sampled_from(self.writers))
        event_type, payload, ts = _poison(kind)
        self.poisoned.add(writer.event(event_type, payload, ts)["event_id"])

    @precondition(lambda self: any(w.pending for w in self.writers))
    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        writer = data.draw(st.sampled_from([w for w in self.writers if w.pending]))
        self._append(writer.uid, CODEC.encode_batch(writer.pending), len(writer.pending))
        writer.pending = []

    @precondition(lambda self: self.appended)
    @rule(data=st.data())
    def duplicate_a_record(self, data: st.DataObject) -> None:
        key, value = data.draw(st.sampled_from(self.appended))
        try:
            events = len(CODEC.decode_all(value))
        except ValueError:
            events = 1
        self._append(key, value, events)

    @precondition(lambda self: any(w.next_seq for w in self.writers))
    @rule(data=st.data())
    def conflict_at_a_taken_place(self, data: st.DataObject) -> None:
        writer = data.draw(st.sampled_from([w for w in self.writers if w.next_seq]))
        seq = data.draw(st.integers(0, writer.next_seq - 1))
        usurper = envelope(writer.uid, seq, "result", result("a", "666"), writer.stream)
        self._append(writer.uid, CODEC.encode_batch([usurper]), 1)

    @precondition(lambda self: self.writers)
    @rule(data=st.data())
    def second_run_started(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(self.writers)).uid
        self._append(uid, CODEC.encode_batch([envelope(uid, 0, "run_started", started("twin", NEVER_SILENT),
                                                       uuid.uuid4().hex)]), 1)

    @precondition(lambda self: self.writers)
    @rule(data=st.data())
    def lost_verdict(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(self.writers)).uid
        verdict = envelope(uid, 0, "run_finished", finished("lost", error="lost: no heartbeat"), uuid.uuid4().hex)
        self._append(uid, CODEC.encode_batch([verdict]), 1)

    @rule(garbage=st.sampled_from(GARBAGE))
    def undecodable_record(self, garbage: bytes | str) -> None:
        if garbage == "invalid utf-8":
            label = envelope("x", 0, "label", {"key": "k", "value": PLACEHOLDER})
            garbage = CODEC.encode_batch([label]).replace(PLACEHOLDER.encode(), b"\xed\xb2\x80")
        assert isinstance(garbage, bytes)
        self._append("junk", garbage, 1)

    # the projector ----------------------------------------------------------------------------

    @rule(batch_size=st.integers(1, 4))
    def project(self, batch_size: int) -> None:
        self._projector(batch_size).catch_up()
        self._check()

    @rule(batch_size=st.integers(1, 3), committed=st.integers(0, 3))
    def kill_mid_transaction(self, batch_size: int, committed: int) -> None:
        projector = self._projector(batch_size)
        for _ in range(committed):
            projector.run_once()
        real_write = projector_module.write_batch

        def write_then_die(con: duckdb.DuckDBPyConnection, batch: Any) -> None:
            real_write(con, batch)
            con.close()  # the uncommitted transaction dies with the connection
            raise _Crash

        with mock.patch.object(projector_module, "write_batch", write_then_die):
            try:
                projector.run_once()
            except _Crash:
                pass
            except duckdb.ConnectionException:
                pass  # the crash came in a probe's rollback path
        self.con.close()
        self.con = duckdb.connect(str(self.db_path))

    @rule()
    def restart(self) -> None:
        self.con.close()
        self.con = duckdb.connect(str(self.db_path))

    @rule()
    def rebuild(self) -> None:
        self._projector(2).rebuild()
        self._check()

    @invariant()
    def positions_never_pass_the_log(self) -> None:
        ends = self.bus.end_offsets()
        for partition, offset in self._projector().positions().items():
            assert offset <= ends.get(partition, 0)

    def _check(self) -> None:
        records = [r.value for r in self.bus.read({}, 1_000_000)]
        expected = model_fold(records, self.poisoned)
        assert projected(self.con) == expected
        counts = accounting(self.con)
        assert sum(counts.values()) == self.emitted, (counts, self.emitted)
        EXAMPLES["checks"] += 1
        self.last_counts = counts

    def teardown(self) -> None:
        try:
            self._projector().catch_up()
            self._check()
            EXAMPLES.update({f"records {k}": v for k, v in self.last_counts.items()})
            EXAMPLES["emitted"] += self.emitted
        finally:
            self.con.close()
            self.bus.close()
            shutil.rmtree(self.dir, ignore_errors=True)


ProjectionMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=30, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])
TestProjectionModel = ProjectionMachine.TestCase


def teardown_module() -> None:
    print(f"\nprojection model: {dict(EXAMPLES)}")
