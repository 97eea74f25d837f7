"""A stop ends a rebuild between two batches, each committed with its positions, and the next
projector folds on from there to the tables a whole rebuild gives (the contract
`projections.service.ProjectionService.rebuild` relies on to hand a home over mid-rebuild)."""

from __future__ import annotations

import uuid
from pathlib import Path

import duckdb
import pytest

from producers.bus.memory import MemoryBus
from projections import Projector
from projections.projector import Progress
from tests.support.foreign import append, envelope, finished, metric, started
from tests.support.tables import snapshot


class _Stop(Exception):
    pass


def _log(bus: MemoryBus, runs: int, records: int, per_record: int) -> None:
    for _ in range(runs):
        uid = uuid.uuid4().hex
        append(bus, uid, [envelope(uid, 0, "run_started", started(), "own", 1.7e9)])
        seq = 1
        for _ in range(records):
            append(bus, uid, [envelope(uid, seq + i, "metric", metric("loss", float(seq + i), 1.7e9, seq + i),
                                       "own", 1.7e9 + seq + i) for i in range(per_record)])
            seq += per_record
        append(bus, uid, [envelope(uid, seq, "run_finished", finished(), "own", 1.7e9 + seq)])


def test_a_stop_ends_a_rebuild_between_batches_with_their_positions_committed(tmp_path: Path) -> None:
    bus = MemoryBus()
    _log(bus, runs=3, records=8, per_record=50)
    with duckdb.connect(str(tmp_path / "whole.duckdb")) as con:
        Projector(bus, con).rebuild()
        whole = snapshot(con)
    seen: list[Progress] = []

    def stop_after_two_batches(progress: Progress) -> None:
        seen.append(progress)
        if len(seen) == 3:
            raise _Stop

    path = tmp_path / "stopped.duckdb"
    with duckdb.connect(str(path)) as con:
        projector = Projector(bus, con, batch_size=3)  # batches of 3 records, the rebuild's too
        with pytest.raises(_Stop):
            projector.rebuild(stop_after_two_batches)
        folded = seen[-1].applied
        assert folded == 6
    with duckdb.connect(str(path)) as con:  # what the stopped rebuild committed, as the next service finds it
        assert sum(n for _, n in con.execute("SELECT partition, next_offset FROM positions").fetchall()) == folded
        assert con.execute("SELECT count(*) FROM events").fetchall()[0][0] > 0
        Projector(bus, con).catch_up()
        assert snapshot(con) == whole
