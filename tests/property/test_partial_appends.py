"""Property: appends that store part of their batch and are retried whole (the writer's protocol on a
bus that fails mid-append), interleaved with projector runs of any size, fold to what the same
batches appended once give; each event is applied once and every stored copy is a duplicate.
"""

from __future__ import annotations

import uuid
from typing import Any

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.bus import BusError
from producers.bus.memory import MemoryBus
from projections import Projector
from schemas import EventCodec
from tests.contract.bus_contract import PartialAppend
from tests.support.foreign import accounting, envelope, finished, metric, started
from tests.support.tables import WHERE_IT_SITS, snapshot

CODEC = EventCodec()

# one append: (run number, events in it, records it is cut into, records stored by each failed try)
appends = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 12), st.integers(1, 4),
                             st.lists(st.integers(0, 4), max_size=2)), min_size=1, max_size=8)


def _batches(plan: list[tuple[int, int, int, list[int]]]) -> list[tuple[list[tuple[str, bytes]], list[int]]]:
    """Each append's records (a run's next events, cut in records) and its failed tries."""
    uids = [uuid.uuid4().hex for _ in range(3)]
    seqs = [0, 0, 0]
    out = []
    for run, events, cuts, failures in plan:
        uid = uids[run]
        made: list[dict[str, Any]] = []
        for _ in range(events):
            if seqs[run] == 0:
                made.append(envelope(uid, 0, "run_started", started(f"run{run}")))
            else:
                made.append(envelope(uid, seqs[run], "metric", metric("m", float(seqs[run]), step=seqs[run])))
            seqs[run] += 1
        size = -(-len(made) // cuts)
        out.append(([(uid, CODEC.encode_batch(made[i:i + size])) for i in range(0, len(made), size)], failures))
    for run, uid in enumerate(uids):  # every started run ends
        if seqs[run]:
            out.append(([(uid, CODEC.encode_batch([envelope(uid, seqs[run], "run_finished", finished())]))], []))
    return out


def _fold(bus: MemoryBus, con: duckdb.DuckDBPyConnection, batch_size: int) -> None:
    Projector(bus, con, CODEC, batch_size).catch_up()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=appends, batch_size=st.integers(1, 5), fold_after=st.sets(st.integers(0, 10)),
       partitions=st.integers(1, 3))
def test_partial_appends_retried_whole_fold_like_appends_made_once(
        plan: list[tuple[int, int, int, list[int]]], batch_size: int, fold_after: set[int], partitions: int) -> None:
    batches = _batches(plan)
    flaky_log, clean_log = MemoryBus(partitions), MemoryBus(partitions)
    with duckdb.connect(":memory:") as con, duckdb.connect(":memory:") as clean:
        copies = 0
        for number, (records, failures) in enumerate(batches):
            clean_log.append(records)
            for stored in failures:  # the writer's tries that failed after storing part of the batch
                try:
                    PartialAppend(flaky_log, stored).append(records)
                except BusError:
                    copies += sum(len(CODEC.decode_all(value)) for _, value in records[:stored])
            flaky_log.append(records)  # the try that succeeds
            if number in fold_after:
                _fold(flaky_log, con, batch_size)
        _fold(flaky_log, con, batch_size)
        _fold(clean_log, clean, 50_000)
        emitted = accounting(clean)["applied"]
        assert accounting(con) == {"applied": emitted, "duplicates": copies, "conflicts": 0, "dead": 0}
        assert snapshot(con, WHERE_IT_SITS) == snapshot(clean, WHERE_IT_SITS)
