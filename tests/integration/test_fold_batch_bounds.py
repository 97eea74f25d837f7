"""A projector's batch holds at most `events_per_batch` events (plus the record that crosses it),
whatever it learnt of the records before: after a stretch of one-event records (heartbeats), a
backlog of full records is not read as one huge batch, live or in a rebuild."""

from __future__ import annotations

import itertools

import duckdb

from producers.bus.memory import MemoryBus
from projections.projector import Projector
from tests.support.foreign import CODEC, envelope, metric, started

_PER_RECORD = 50


def _full_record(run: str, first: int) -> bytes:
    return CODEC.encode_batch([envelope(run, first + i, "metric", metric("m", 0.5, step=first + i))
                               for i in range(_PER_RECORD)])


def _projector_that_learnt_one_event_records(bus: MemoryBus) -> Projector:
    projector = Projector(bus, duckdb.connect(":memory:"), events_per_batch=200)
    bus.append([("r", CODEC.encode_batch([envelope("r", 0, "run_started", started())]))])
    for seq in range(1, 40):  # one event a record, folded one by one: it learns 1 event a record
        bus.append([("r", CODEC.encode_batch([envelope("r", seq, "metric", metric("m", 0.1, step=seq))]))])
        projector.run_once()
    return projector


def test_a_backlog_after_one_event_records_is_folded_in_bounded_batches() -> None:
    bus = MemoryBus()
    projector = _projector_that_learnt_one_event_records(bus)
    bus.append([("r", _full_record("r", 40 + i * _PER_RECORD)) for i in range(30)])
    consumed = projector.run_once()
    assert consumed * _PER_RECORD <= 200 + _PER_RECORD, f"one batch took {consumed} records of {_PER_RECORD} events"
    assert projector.catch_up() == 30 - consumed
    assert projector.con.execute("SELECT count(*) FROM metrics").fetchone() == (39 + 30 * _PER_RECORD,)


def test_a_rebuild_is_folded_in_its_own_bounded_batches_whatever_the_live_fold_learnt() -> None:
    bus = MemoryBus()
    projector = _projector_that_learnt_one_event_records(bus)
    bus.append([("r", _full_record("r", 40 + i * _PER_RECORD)) for i in range(30)])
    folded: list[int] = []  # metric rows before each batch and at the end

    def count(_: object) -> None:
        folded.append(projector.con.execute("SELECT count(*) FROM metrics").fetchone()[0])

    total = projector.rebuild(count, events_per_batch=400)
    assert total == 1 + 39 + 30
    count(None)
    sizes = [after - before for before, after in itertools.pairwise(folded)]
    assert max(sizes) <= 400 + _PER_RECORD, f"rebuild batches of {sizes} events"
    assert projector.con.execute("SELECT count(*) FROM metrics").fetchone() == (39 + 30 * _PER_RECORD,)
