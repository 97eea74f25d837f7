"""Property: the `events.payload` of metric events folded as columns (projections.writer) is
exactly the text orjson gives the decoded payload, which is what an event folded on its own stores
(so a faster way of making it must give the same text): any key (quotes, commas, control and
non-ASCII characters), any double (NaN, infinities, -0.0, subnormals, huge and tiny exponents), any
step or none."""

from __future__ import annotations

import uuid
from typing import Any
from unittest import mock

import duckdb
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

import projections.writer as writer_module
from producers.bus.memory import MemoryBus
from projections import Projector
from projections.fold import MAX_TS, MIN_TS
from schemas import EventCodec
from tests.support.foreign import append, envelope, metric, started

CODEC = EventCodec()
KEYS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(["a,b", '"', "\\", "\x00"])
TIMES = st.floats(MIN_TS, MAX_TS)
POINTS = st.lists(st.tuples(KEYS, st.floats(), st.none() | st.integers(-2**63, 2**63 - 1), TIMES),
                  min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(points=POINTS)
def test_a_metric_record_folded_as_columns_stores_the_payload_text_orjson_gives_each_event(
        points: list[tuple[str, float, int | None, float]]) -> None:
    bus, con = MemoryBus(), duckdb.connect(":memory:")
    uid = uuid.uuid4().hex
    append(bus, uid, [envelope(uid, 0, "run_started", started(), "own", 1.7e9)])
    records = [envelope(uid, seq, "metric", metric(key, value, timestamp, step), "own", 1.7e9 + seq)
               for seq, (key, value, step, timestamp) in enumerate(points, start=1)]
    metrics = append(bus, uid, records)
    built = writer_module._event_table
    with mock.patch.object(writer_module, "_event_table", side_effect=built) as column_wise:
        Projector(bus, con).catch_up()
    assert column_wise.called, "the record was not folded column-wise"
    stored = con.execute("SELECT seq, payload FROM events WHERE type = 'metric' ORDER BY seq").fetchall()
    expected: list[tuple[int, Any]] = [(event.seq, orjson.dumps(event.payload).decode())
                                       for event in CODEC.decode_all(metrics.value)]
    assert stored == expected
