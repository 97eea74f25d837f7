"""Property: runs_wide's value columns agree with `results` whatever the batches, and keys that
differ only in case never share one.

DuckDB matches column names whatever their case, so "result.loss" names a column of `Loss` as well.
Runs log results under case variants of one key, numbers or text, and are folded in batches of any
size; then, and after a rebuild in other batches: each key with a column holds exactly that key's
numbers, no column stands for two keys, the keys of a name with two numeric variants have none, and
the rebuild gives the same columns.
"""

from __future__ import annotations

import json
import uuid

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.bus.memory import MemoryBus
from projections import Projector
from schemas import EventCodec
from tests.support.foreign import envelope, finished, result, started

CODEC = EventCodec()
KEYS = ("loss", "Loss", "LOSS", "acc")
VALUES = st.one_of(st.integers(-5, 5).map(json.dumps), st.sampled_from(['"text"', "true", "null"]))
RUN = st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3)


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    return dict(con.execute('SELECT key, "column" FROM runs_wide_columns WHERE kind = ?', ['result']).fetchall())


def _wide(con: duckdb.DuckDBPyConnection, columns: dict[str, str]) -> dict[tuple[str, str], float | None]:
    return {(uid, key): value for key, column in columns.items()
            for uid, value in con.execute(f'SELECT uid, "{column}" FROM runs_wide').fetchall()}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=st.lists(RUN, min_size=1, max_size=8), live_batch=st.integers(1, 12),
       looks=st.lists(st.booleans(), min_size=8, max_size=8))
def test_value_columns_hold_their_own_key_whatever_the_batches(runs: list[list[tuple[str, str]]], live_batch: int,
                                                                looks: list[bool]) -> None:
    bus, con = MemoryBus(), duckdb.connect(":memory:")
    projector = Projector(bus, con, events_per_batch=live_batch)
    for number, logged in enumerate(runs):
        uid = uuid.uuid4().hex
        events = [envelope(uid, 0, "run_started", started(name=f"run{number}"))]
        events += [envelope(uid, seq, "result", result(key, value)) for seq, (key, value) in enumerate(logged, 1)]
        bus.append([(uid, CODEC.encode_batch([*events, envelope(uid, len(events), "run_finished", finished())]))])
        if looks[number]:
            projector.catch_up()
    projector.catch_up()

    columns = _columns(con)
    numbers = dict(((uid, key), value) for uid, key, value in
                   con.execute("SELECT uid, key, value_num FROM results WHERE value_num IS NOT NULL").fetchall())
    uids = [row[0] for row in con.execute("SELECT uid FROM runs").fetchall()]
    assert _wide(con, columns) == {(uid, key): numbers.get((uid, key)) for key in columns for uid in uids}
    assert len({column.lower() for column in columns.values()}) == len(columns)
    numeric_variants = {key for _, key in numbers if key.lower() == "loss"}
    if len(numeric_variants) > 1:
        assert not {"loss", "Loss", "LOSS"} & columns.keys()
    elif numeric_variants:
        assert numeric_variants <= columns.keys()

    projector.rebuild()
    assert _columns(con) == columns
    assert _wide(con, columns) == {(uid, key): numbers.get((uid, key)) for key in columns for uid in uids}
