"""Property: the projector's column-wise path for records of metric events (projections.projector,
Subscription(columns=True)) gives exactly the tables its event-by-event path gives.

The same log is written twice, once as row batches (always folded event by event) and once with
each record's events as a columnar batch; both are folded with their own batch sizes, folding as
records arrive. Hostile cases: places already taken, records appended twice, event ids reused,
seqs that go backwards or skip, bad times, identities that are not ASCII, lost verdicts, deleted
and restored runs, runs never started, and DuckDB refusing a batch's columns.
"""

from __future__ import annotations

import math
import uuid
from typing import Any
from unittest import mock

import duckdb
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import projections.projector as projector_module
import projections.writer as writer_module
from producers.bus.memory import MemoryBus
from projections import Projector
from schemas import EventCodec
from schemas.codec import HEADER_LEN
from tests.support.foreign import envelope, finished, metric, started

CODEC = EventCodec()
NEVER_SILENT = 1e6  # no run is judged lost by the clock while the test runs
RUNS = ("run-a", "run-b")
IGNORED = {"received_at", "raw"}  # when the projector read it; the record's bytes (rows or columns)
ACTIONS = ("start", "metrics", "metrics", "metrics", "metrics", "mixed", "heartbeat", "lost", "lost", "finish",
           "replay", "taken", "delete", "restore")


def _tables(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[Any, ...]]]:
    names = [row[0] for row in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
    out = {}
    for name in names:
        columns = [row[0] for row in con.execute(f"DESCRIBE {name}").fetchall() if row[0] not in IGNORED]
        listed = ", ".join(f'"{c}"' for c in columns)
        out[name] = con.execute(f"SELECT {listed} FROM {name} ORDER BY ALL").fetchall()
    return out


class _Log:
    """The log being written: each stream's next seq, the ids used, the records appended."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.next_seq: dict[tuple[str, str], int] = {}
        self.ids: list[str] = []
        self.conflicting: list[str] = []
        self.records: list[tuple[str, list[dict[str, Any]]]] = []
        self.deleted: set[str] = set()
        self.clean_metric_records = 0  # well-formed metric-only records of a run not deleted
        self.last_hostile = "none"

    def event_id(self, hostile: str = "none") -> str:
        if hostile == "reused id" and self.ids:  # often the id of an event that conflicted
            return self.data.draw(st.sampled_from(self.conflicting or self.ids) | st.sampled_from(self.ids))
        made = uuid.uuid4().hex if hostile != "not ascii" else "\u00e9" + uuid.uuid4().hex[1:]
        self.ids.append(made)
        return made

    def seqs(self, uid: str, stream: str, count: int, hostile: str = "none") -> list[int]:
        start = self.next_seq.get((uid, stream), 0)
        if hostile == "skip":
            start += 2
        seqs = list(range(start, start + count))
        if hostile == "back" and count > 1:
            seqs[0], seqs[-1] = seqs[-1], seqs[0]
        if hostile == "taken":
            seqs = [max(0, s - count) for s in seqs]
        self.next_seq[(uid, stream)] = max(self.next_seq.get((uid, stream), 0), max(seqs) + 1)
        return seqs

    def metrics(self, uid: str, stream: str, count: int) -> list[dict[str, Any]]:
        """A record of metric events, most often well-formed, else with one thing wrong."""
        hostile = self.data.draw(st.sampled_from(["none"] * 6 + ["reused id", "not ascii", "skip", "back", "taken",
                                                                  "bad ts", "bad timestamp"]))
        self.last_hostile = hostile
        odd = self.data.draw(st.integers(0, count - 1))  # the event that is wrong
        bad_time = self.data.draw(st.sampled_from([math.nan, 1e20, -math.inf]))
        made = []
        for number, seq in enumerate(self.seqs(uid, stream, count, hostile)):
            wrong = hostile if number == odd else "none"
            made.append(envelope(uid, seq, "metric",
                                 metric(f"m{seq % 3}", float(seq), bad_time if wrong == "bad timestamp" else 1.7e9,
                                        seq if seq % 4 else None),
                                 stream, bad_time if wrong == "bad ts" else 1.7e9 + seq, self.event_id(wrong)))
        return made

    def one(self, uid: str, stream: str, kind: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return [envelope(uid, self.seqs(uid, stream, 1)[0], kind, payload, stream, 1.7e9 + len(self.ids),
                         self.event_id())]

    def action(self, action: str, uid: str | None = None) -> tuple[str, list[dict[str, Any]]] | None:
        uid = uid or self.data.draw(st.sampled_from(RUNS))
        own = f"own-{uid}"
        stream = self.data.draw(st.sampled_from([own, own, own, "other"]))
        if action == "start":
            made = self.one(uid, own, "run_started", started(uid, NEVER_SILENT))
        elif action == "metrics":
            made = self.metrics(uid, stream, self.data.draw(st.integers(1, 6)))
            self.clean_metric_records += self.last_hostile == "none" and uid not in self.deleted
        elif action == "mixed":
            made = self.metrics(uid, stream, 2) + self.one(uid, stream, "label", {"key": "k", "value": "v"})
        elif action == "heartbeat":
            made = self.one(uid, "beats", "heartbeat", {"interval_s": NEVER_SILENT})
        elif action == "lost":
            made = self.one(uid, "reaper", "run_finished", finished("lost", error="lost: silent"))
        elif action == "finish":
            made = self.one(uid, own, "run_finished", finished())
        elif action == "replay":
            return self.data.draw(st.sampled_from(self.records)) if self.records else None
        elif action == "taken":  # a stranger's events at places this stream already used (conflicts)
            made = [{**e, "event_id": uuid.uuid4().hex, "seq": max(0, e["seq"] - 3)}
                    for e in self.metrics(uid, stream, 3)]
            self.conflicting.extend(e["event_id"] for e in made)
        elif action == "delete":
            made = self.one(uid, "edits", "run_deleted", {"by": "ana", "reason": "bad"})
            self.deleted.add(uid)
        else:
            made = self.one(uid, "edits", "run_restored", {"by": "ana"})
        self.records.append((uid, made))
        return uid, made


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), actions=st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=25),
       columnar_batch=st.integers(1, 40), rows_batch=st.integers(1, 40), refuse=st.booleans(),
       started_first=st.booleans())
def test_metric_records_folded_as_columns_give_the_tables_of_folding_them_event_by_event(
        data: st.DataObject, actions: list[str], columnar_batch: int, rows_batch: int, refuse: bool,
        started_first: bool) -> None:
    log = _Log(data)
    if started_first:  # most logs: the runs start before they log
        actions = ["start", "start", *actions]
    buses = {"columns": MemoryBus(), "rows": MemoryBus()}
    cons = {name: duckdb.connect(":memory:") for name in buses}
    projectors = {"columns": Projector(buses["columns"], cons["columns"], events_per_batch=columnar_batch),
                  "rows": Projector(buses["rows"], cons["rows"], events_per_batch=rows_batch)}
    columnar_records = 0
    made_table = writer_module._event_table
    refusals = []

    def refusing(*args: Any) -> Any:  # DuckDB refuses the batch's columns, once
        if not refusals:
            refusals.append(args)
            raise duckdb.ConversionException("refused (test)")
        return made_table(*args)

    # metric events written column-wise by the columnar projector in transactions it committed
    column_wise = {"written": 0, "committed": 0}
    write_batch, apply = projector_module.write_batch, Projector._apply

    def writing(con: duckdb.DuckDBPyConnection, batch: Any) -> None:
        write_batch(con, batch)
        if con is cons["columns"]:
            column_wise["written"] += sum(len(columns) for _, columns in batch.metric_columns)

    def applying(projector: Projector, plan: Any, skipped: Any, only: Any, commit: bool, *args: Any,
                 **kwargs: Any) -> None:
        column_wise["written"] = 0
        apply(projector, plan, skipped, only, commit, *args, **kwargs)
        if commit:
            column_wise["committed"] += column_wise["written"]

    with mock.patch.object(writer_module, "_event_table", refusing if refuse else made_table), \
            mock.patch.object(projector_module, "write_batch", writing), \
            mock.patch.object(Projector, "_apply", applying):
        for number, action in enumerate(actions):
            written = log.action(action, RUNS[number] if started_first and number < len(RUNS) else None)
            if written is not None:
                uid, made = written
                columns, rows = CODEC.encode_batch(made), CODEC.encode_rows(made)
                columnar_records += columns[:HEADER_LEN] != rows[:HEADER_LEN]
                buses["columns"].append([(uid, columns)])
                buses["rows"].append([(uid, rows)])
            if data.draw(st.booleans()):
                for projector in projectors.values():
                    projector.catch_up()
        for projector in projectors.values():
            projector.catch_up()
    assert columnar_records or not any(a == "metrics" for a in actions)
    # the fast path is taken, not only survived: a started run's well-formed metric record is
    # committed column-wise (unless DuckDB refused once: that sends its whole batch event by event,
    # which may hold every such record, e.g. two records in one batch of 3 events)
    applies = started_first and log.clean_metric_records > 0 and not refuse
    event(f"fast path applies: {applies}")
    if applies:
        assert column_wise["committed"] > 0, "no metric record was committed column-wise"
    folded = {name: _tables(con) for name, con in cons.items()}
    assert folded["columns"].keys() == folded["rows"].keys()
    for table in folded["rows"]:
        assert folded["columns"][table] == folded["rows"][table], table
