"""Property: runs_wide's value columns agree with `results` whatever the batches, and keys DuckDB
cannot tell apart (they differ only in ASCII case) never have one.

DuckDB matches column names whatever their ASCII case, so "result.loss" names a column of `Loss` as
well (`é` and `É` are two names to it). Runs log results under case variants of keys, numbers or
text, sometimes a key twice (a number, then text), and are folded in batches of any size; then,
and after a rebuild in other batches: each key with a column holds exactly its own numbers, no
column stands for two keys, and no key of a name two keys share has one. Without a key logged twice
the rebuild gives exactly the same columns (a number overwritten by text in one batch is never seen
as a number, so whether such a key gets a column depends on the batches: known, see README).
"""

from __future__ import annotations

import json
import string
import uuid
from collections import Counter

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.bus.memory import MemoryBus
from projections import Projector
from schemas import EventCodec
from tests.support.foreign import envelope, finished, result, started

CODEC = EventCodec()
KEYS = ("loss", "Loss", "LOSS", "acc", "é", "É", "i", "İ")
VALUES = st.one_of(st.integers(-5, 5).map(json.dumps), st.sampled_from(['"text"', "true", "null"]))
RUN = st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4)
_FOLD = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    return dict(con.execute('SELECT key, "column" FROM runs_wide_columns WHERE kind = ?', ["result"]).fetchall())


def _check(con: duckdb.DuckDBPyConnection, logged: set[str]) -> dict[str, str]:
    columns = _columns(con)
    numbers = {(uid, key): value for uid, key, value in
               con.execute("SELECT uid, key, value_num FROM results WHERE value_num IS NOT NULL").fetchall()}
    uids = [row[0] for row in con.execute("SELECT uid FROM runs").fetchall()]
    for key, column in columns.items():
        wide = dict(con.execute(f'SELECT uid, "{column}" FROM runs_wide').fetchall())
        assert wide == {uid: numbers.get((uid, key)) for uid in uids}, key
    sharing = Counter(key.translate(_FOLD) for key in logged)
    assert not {key for key in columns if sharing[key.translate(_FOLD)] > 1}
    assert len({column.translate(_FOLD) for column in columns.values()}) == len(columns)
    return columns


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
    keys = {key for logged in runs for key, _ in logged}

    columns = _check(con, keys)
    projector.rebuild()
    rebuilt = _check(con, keys)
    if all(len({key for key, _ in logged}) == len(logged) for logged in runs):  # no key logged twice in a run
        assert rebuilt == columns
