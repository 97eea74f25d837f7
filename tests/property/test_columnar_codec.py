"""Properties of the columnar batch record (runbus.EventBatch): whatever the events, it decodes to
exactly the events the row batch gives, and untrusted columnar bytes decode or are refused with a
DecodeError, never anything else."""

from __future__ import annotations

import io
from typing import Any

import fastavro
from hypothesis import event, given, settings
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
OTHER_TYPES = [kind for kind in EVENT_TYPES if kind != "metric"]
PER_EVENT = ("event_id", "seq", "type", "ts")
PER_METRIC = ("metric_key", "metric_value", "metric_step", "metric_timestamp")
ITEMS = {"event_id": TEXT, "seq": st.integers(-5, 5), "ts": st.floats(allow_nan=False), "metric_key": TEXT,
         "metric_value": st.floats(allow_nan=False), "metric_step": st.none() | st.integers(0, 9),
         "metric_timestamp": st.floats(allow_nan=False)}


@st.composite
def consistent_columns(draw: st.DrawFn) -> dict[str, Any]:
    """The columns of n events, `metrics` of them metric events, that agree with each other."""
    n = draw(st.integers(0, 5))
    metrics = draw(st.integers(0, n))
    types = draw(st.permutations(["metric"] * metrics + draw(st.lists(st.sampled_from(OTHER_TYPES),
                                                                       min_size=n - metrics, max_size=n - metrics))))
    columns: dict[str, Any] = {name: draw(st.lists(ITEMS[name], min_size=n, max_size=n))
                               for name in PER_EVENT if name != "type"}
    columns.update({name: draw(st.lists(ITEMS[name], min_size=metrics, max_size=metrics)) for name in PER_METRIC})
    columns["type"] = types
    columns["payloads"] = [(RECORD_OF_TYPE[kind], draw(PAYLOADS[kind])) for kind in types if kind != "metric"]
    return columns


def _events(columns: dict[str, Any]) -> list[Event]:
    """The events consistent columns stand for."""
    metrics = iter(zip(*(columns[name] for name in PER_METRIC), strict=True))
    others = iter(columns["payloads"])
    made = []
    for event_id, seq, kind, ts in zip(*(columns[name] for name in PER_EVENT), strict=True):
        if kind == "metric":
            payload = dict(zip(("key", "value", "step", "timestamp"), next(metrics), strict=True))
        else:
            payload = next(others)[1]
        made.append(Event(event_id, "r", seq, kind, ts, "h", 1, payload, 4, "s"))
    return made


def _perturb(data: st.DataObject, columns: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The columns with one thing made inconsistent, and the column changed."""
    changed = {name: list(items) for name, items in columns.items()}
    if columns["type"] and data.draw(st.booleans()):  # one event's type changed
        index = data.draw(st.integers(0, len(columns["type"]) - 1))
        changed["type"][index] = data.draw(st.sampled_from([*EVENT_TYPES, "bogus"]).filter(
            lambda kind: kind != columns["type"][index]))
        return "type", changed
    name = data.draw(st.sampled_from([*PER_EVENT, *PER_METRIC, "payloads"]))
    if changed[name] and data.draw(st.booleans()):
        del changed[name][data.draw(st.integers(0, len(changed[name]) - 1))]
    elif name == "type":
        changed[name].append(data.draw(st.sampled_from([*EVENT_TYPES, "bogus"])))
    elif name == "payloads":
        kind = data.draw(st.sampled_from(OTHER_TYPES))
        changed[name].append((RECORD_OF_TYPE[kind], data.draw(PAYLOADS[kind])))
    else:
        changed[name].append(data.draw(ITEMS[name]))
    return name, changed


def _decoded(decode: Any, data: bytes) -> list[Event] | DecodeError:
    try:
        decoded = decode(data)
    except DecodeError as exc:
        return exc
    return decoded if isinstance(decoded, list) else decoded.events()


@settings(max_examples=300, deadline=None)
@given(columns=consistent_columns(), data=st.data())
def test_columnar_bytes_decode_to_their_events_or_are_one_decode_error_naming_the_field(
        columns: dict[str, Any], data: st.DataObject) -> None:
    """decode_columns (the projector's) and decode_all agree on every columnar record: consistent
    columns are their events, one column out of step is a DecodeError naming the columns that
    disagree, and truncated or corrupted bytes give both the same events or both a DecodeError."""
    perturbed, written = (None, columns) if data.draw(st.booleans()) else _perturb(data, columns)
    out = io.BytesIO()
    fastavro.schemaless_writer(out, COLUMNAR, {"run_uid": "r", "stream": "s", "host": "h", "pid": 1,
                                               "schema_version": 4, **written})
    record = MAGIC + CODEC._columnar_writer.fingerprint + out.getvalue()
    metrics_only = bool(columns["type"]) and set(columns["type"]) == {"metric"}
    event(f"{'consistent' if perturbed is None else 'one column out of step'}"
          f"{', metrics only' if metrics_only else ''}")

    by_columns, by_events = _decoded(CODEC.decode_columns, record), _decoded(CODEC.decode_all, record)
    if perturbed is None:
        assert by_columns == by_events == _events(columns)
        assert isinstance(CODEC.decode_columns(record), list) != metrics_only  # metric-only: given as columns
    else:
        assert isinstance(by_columns, DecodeError) and isinstance(by_events, DecodeError)
        assert str(by_columns) == str(by_events)
        named = {"type": ("type", "metric_key", "payloads")}.get(perturbed, (perturbed,))
        assert any(name in str(by_events) for name in named), (perturbed, str(by_events))

    damage = data.draw(st.sampled_from(["truncated", "corrupted"]))
    at = data.draw(st.integers(0, len(record) - 1))
    if damage == "truncated":
        damaged = record[:at]
    else:
        damaged = record[:at] + bytes([record[at] ^ data.draw(st.integers(1, 255))]) + record[at + 1:]
    by_columns, by_events = _decoded(CODEC.decode_columns, damaged), _decoded(CODEC.decode_all, damaged)
    event(f"{damage}: {'refused' if isinstance(by_events, DecodeError) else 'decoded'}")
    if isinstance(by_events, DecodeError):
        assert isinstance(by_columns, DecodeError)  # fastavro's message names a stream object: differs
    else:  # compared as text: a damaged double may decode to NaN, which equals nothing, itself included
        assert repr(by_columns) == repr(by_events)
