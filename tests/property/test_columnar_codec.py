"""Properties of the columnar batch record (runbus.EventBatch): whatever the events, it decodes to
exactly the events the row batch gives, and untrusted columnar bytes decode or are refused with a
DecodeError, never anything else."""

from __future__ import annotations

import io
from typing import Any

import fastavro
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import DecodeError, Event, EventCodec
from schemas.codec import HEADER_LEN, MAGIC
from schemas.events import EVENT_TYPES, RECORD_OF_TYPE

CODEC = EventCodec()
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)  # lone surrogates do not encode


def _of(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of a parsed Avro schema."""
    if isinstance(schema, list):  # a union
        return st.one_of([_of(branch, named) for branch in schema])
    if isinstance(schema, str):
        if schema in named:
            return _of(named[schema], named)
        return {"null": st.none(), "boolean": st.booleans(), "string": TEXT,
                "int": st.integers(-2**31, 2**31 - 1), "long": st.integers(-2**63, 2**63 - 1),
                "double": st.floats(allow_nan=False), "float": st.floats(allow_nan=False, width=32)}[schema]
    kind = schema["type"]
    if kind == "record":
        named[schema["name"]] = schema
        return st.fixed_dictionaries({f["name"]: _of(f["type"], named) for f in schema["fields"]})
    if kind == "array":
        return st.lists(_of(schema["items"], named), max_size=3)
    if kind == "map":
        return st.dictionaries(TEXT, _of(schema["values"], named), max_size=3)
    return _of(kind, named)


_UNION = next(f["type"] for f in CODEC.schema["fields"] if f["name"] == "payload")
PAYLOADS = {TYPE: _of(next(r for r in _UNION if r["name"] == RECORD_OF_TYPE[TYPE]), {}) for TYPE in EVENT_TYPES}


@st.composite
def events(draw: st.DrawFn, shared: bool) -> list[Event]:
    """Events of any types; with `shared`, all of one run, stream, host, pid and version."""
    first = (draw(TEXT), draw(TEXT), draw(TEXT), draw(st.integers(-2**31, 2**31 - 1)),
             draw(st.integers(-2**31, 2**31 - 1)))
    made = []
    for _ in range(draw(st.integers(0 if not shared else 1, 12))):
        kind = draw(st.sampled_from(EVENT_TYPES) | st.just("metric"))
        run_uid, stream, host, pid, version = first if shared else (
            draw(TEXT), draw(TEXT), draw(TEXT), draw(st.integers(0, 3)), draw(st.integers(0, 3)))
        made.append(Event(draw(TEXT), run_uid, draw(st.integers(-2**63, 2**63 - 1)), kind,
                          draw(st.floats(allow_nan=False)), host, pid, draw(PAYLOADS[kind]), version, stream))
    return made


@settings(max_examples=300, deadline=None)
@given(made=events(shared=True) | events(shared=False))
def test_a_columnar_batch_decodes_to_exactly_the_events_of_the_row_batch(made: list[Event]) -> None:
    records = [CODEC.to_record(event) for event in made]
    rows, batch = CODEC.encode_rows(records), CODEC.encode_batch(records)
    shared = len({(e.run_uid, e.stream, e.host, e.pid, e.schema_version) for e in made}) == 1
    assert (batch[:HEADER_LEN] != rows[:HEADER_LEN]) == shared  # columnar exactly when the fields are shared
    assert CODEC.decode_all(batch) == CODEC.decode_all(rows) == made
    assert [e.payload for e in CODEC.decode_all(batch)] == [e.payload for e in made]
    assert [list(e.payload) for e in CODEC.decode_all(batch)] == [list(e.payload) for e in CODEC.decode_all(rows)]


COLUMNAR = CODEC._columnar_writer.parsed  # the writer's own schema: any datum it holds is possible bytes
ITEMS = {"event_id": TEXT, "seq": st.integers(-5, 5), "type": st.sampled_from([*EVENT_TYPES, "metric", "bogus"]),
         "ts": st.floats(allow_nan=False), "metric_key": TEXT, "metric_value": st.floats(allow_nan=False),
         "metric_step": st.none() | st.integers(0, 9), "metric_timestamp": st.floats(allow_nan=False),
         "payloads": st.sampled_from(EVENT_TYPES).flatmap(
             lambda kind: PAYLOADS[kind].map(lambda payload: (RECORD_OF_TYPE[kind], payload)))}


@settings(max_examples=300, deadline=None)
@given(columns=st.fixed_dictionaries({name: st.lists(items, max_size=4) for name, items in ITEMS.items()}))
def test_columnar_bytes_of_any_shape_decode_consistently_or_are_one_decode_error(columns: dict[str, Any]) -> None:
    datum = {"run_uid": "r", "stream": "s", "host": "h", "pid": 1, "schema_version": 4, **columns}
    out = io.BytesIO()
    fastavro.schemaless_writer(out, COLUMNAR, datum)
    data = MAGIC + CODEC._columnar_writer.fingerprint + out.getvalue()
    try:
        decoded = CODEC.decode_all(data)
    except DecodeError as exc:
        assert str(exc).startswith(("columnar batch:", "event type")), exc
        return
    # it decoded: then every column was consistent, and the events are those the columns say
    assert [e.event_id for e in decoded] == columns["event_id"]
    assert [e.type for e in decoded] == columns["type"]
    assert [e.payload["key"] for e in decoded if e.type == "metric"] == columns["metric_key"]
    assert [(RECORD_OF_TYPE[e.type], e.payload) for e in decoded if e.type != "metric"] == columns["payloads"]
