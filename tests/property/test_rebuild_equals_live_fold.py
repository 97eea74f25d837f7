"""Property: a rebuild (`Projector.rebuild`: the whole log folded again, in batches far larger than the
live fold's) gives exactly the tables the live fold gave folding the same log as it arrived, in
small batches: the same rows, dead letters, duplicates and conflicts with the same reasons.

The log is the columnar projection property's hostile one (places taken, records appended twice,
reused event ids, seqs that go backwards or skip, bad times, identities that are not ASCII, lost
verdicts, deletes and restores, runs never started), written as the background writer writes it
(columnar records) or as row batches, with records that do not decode among them.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.bus.memory import MemoryBus
from projections import Projector
from schemas import EventCodec
from tests.property.test_columnar_projection import ACTIONS, RUNS, _Log, _tables

CODEC = EventCodec()
GARBAGE = b"\xc3\x01not an event"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), actions=st.lists(st.sampled_from((*ACTIONS, "garbage")), min_size=1, max_size=25),
       live_batch=st.integers(1, 40), as_rows=st.booleans(), started_first=st.booleans())
def test_a_rebuild_gives_the_tables_the_live_fold_gave(data: st.DataObject, actions: list[str], live_batch: int,
                                                       as_rows: bool, started_first: bool) -> None:
    import duckdb

    log = _Log(data)
    if started_first:
        actions = ["start", "start", *actions]
    bus, con = MemoryBus(), duckdb.connect(":memory:")
    live = Projector(bus, con, events_per_batch=live_batch)
    for number, action in enumerate(actions):
        if action == "garbage":
            bus.append([(RUNS[0], GARBAGE)])
            continue
        written = log.action(action, RUNS[number] if started_first and number < len(RUNS) else None)
        if written is not None:
            uid, made = written
            bus.append([(uid, CODEC.encode_rows(made) if as_rows else CODEC.encode_batch(made))])
        if data.draw(st.booleans()):
            live.catch_up()
    live.catch_up()
    folded = _tables(con)
    assert live.rebuild() == sum(bus.end_offsets().values())
    rebuilt = _tables(con)
    assert rebuilt.keys() == folded.keys()
    for table in folded:
        assert rebuilt[table] == folded[table], table
