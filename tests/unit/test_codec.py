from __future__ import annotations

import copy
import json
import re

import pytest

from schemas import DecodeError, Event, EventCodec, load_event_schema

SAMPLES = {
    "run_started": {"name": "demo", "project": "p", "handler": "m:f", "runtime": "local",
                    "params": {"p1": "5"}, "inputs": {"data": "file:///x.csv"},
                    "input_digests": {"data": "ab"}, "secret_keys": ["PASSWORD"],
                    "labels": {"type": "demo"}, "parent_uid": None, "iteration": 0, "host": "h",
                    "code_ref": None, "extra": {}, "heartbeat_interval_s": 5.0},
    "param": {"key": "p2", "value": '"xx"'},
    "result": {"key": "loss", "value": "15"},
    "metric": {"key": "loss", "value": 0.5, "step": 3, "timestamp": 1.5},
    "label": {"key": "category", "value": "tests"},
    "artifact": {"key": "model.txt", "kind": "model", "uri": "file:///a", "sha256": "00",
                 "size": 10, "format": "txt", "labels": {"framework": "xgboost"}, "meta": "{}"},
    "run_finished": {"state": "error", "error": "ValueError: boom", "traceback": "Traceback...",
                     "return_value": None, "duration_s": 1.25},
    "heartbeat": {"interval_s": 10.0},
    "iteration_requested": {"iteration": 2, "params": {"p1": "2"}},
    "log": {"chunks": [{"ts": 1.5, "stream": "stdout", "text": "epoch 1\nepoch 2"},
                       {"ts": 1.75, "stream": "stderr", "text": "warning: \u00e9"}]},
    "run_deleted": {"by": "ana", "reason": "bad data: \u00e9"},
    "run_restored": {"by": "ana"},
    "run_amended": {"by": "User:ana", "labels": {"team": "vision"}, "removed_labels": ["stage"],
                    "note": "retrained"},
}


def _event(kind: str, payload: dict) -> Event:
    return Event("e" * 32, "run-1", 7, kind, 1700000000.5, "host", 42, payload)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_every_event_type_round_trips(kind: str) -> None:
    codec = EventCodec()
    event = _event(kind, SAMPLES[kind])
    assert codec.decode(codec.encode(event)) == event


def test_a_v1_record_still_decodes_after_a_field_is_added_in_v2() -> None:
    v1 = load_event_schema()
    v2 = copy.deepcopy(v1)
    payload = next(f for f in v2["fields"] if f["name"] == "payload")
    result = next(t for t in payload["type"] if t["name"] == "ResultLogged")
    result["fields"].append({"name": "unit", "type": ["null", "string"], "default": None})
    written_by_v1 = EventCodec(v1, history=[]).encode(_event("result", SAMPLES["result"]))

    reader = EventCodec(v2, history=[v1])
    decoded = reader.decode(written_by_v1)

    assert decoded.payload == {**SAMPLES["result"], "unit": None}
    assert reader.fingerprint != EventCodec(v1, history=[]).fingerprint


def test_a_record_of_an_unknown_schema_is_refused() -> None:
    v1 = load_event_schema()
    other = json.loads(json.dumps(v1).replace('"interval_s"', '"interval_ms"'))
    data = EventCodec(other, history=[]).encode(_event("heartbeat", {"interval_ms": 1.0}))
    with pytest.raises(DecodeError, match="unknown schema fingerprint"):
        EventCodec(v1, history=[]).decode(data)


@pytest.mark.parametrize("garbage", [b"", b"not avro at all", b"\xc3\x01" + b"\x00" * 3])
def test_garbage_is_a_decode_error(garbage: bytes) -> None:
    with pytest.raises(DecodeError):
        EventCodec().decode(garbage)


def test_a_payload_that_does_not_fit_its_schema_names_the_event_type() -> None:
    with pytest.raises(ValueError, match="metric"):
        EventCodec().encode(_event("metric", {"key": "loss", "value": "high"}))


def test_unknown_event_types_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        _event("resutl", {})


def test_a_batch_record_holds_one_runs_events_in_order() -> None:
    codec = EventCodec()
    events = [_event(kind, SAMPLES[kind]) for kind in ("run_started", "metric", "result", "run_finished")]
    data = codec.encode_batch([codec.to_record(e) for e in events])
    assert codec.decode_all(data) == events
    with pytest.raises(DecodeError, match="expected one event"):
        codec.decode(data)


def test_a_v1_batch_still_decodes_after_a_field_is_added_in_v2() -> None:
    v1 = load_event_schema()
    v2 = copy.deepcopy(v1)
    payload = next(f for f in v2["fields"] if f["name"] == "payload")
    next(t for t in payload["type"] if t["name"] == "ResultLogged")["fields"].append(
        {"name": "unit", "type": ["null", "string"], "default": None})
    old = EventCodec(v1, history=[])
    data = old.encode_batch([old.to_record(_event("result", SAMPLES["result"]))] * 2)
    decoded = EventCodec(v2, history=[v1]).decode_all(data)
    assert [e.payload for e in decoded] == [{**SAMPLES["result"], "unit": None}] * 2


def test_records_of_schema_version_1_decode_on_the_legacy_stream() -> None:
    """A log written before streams existed keeps decoding: its events are on stream ''."""
    from schemas.codec import load_history

    v1 = EventCodec(schema=load_history()[0], history=[])
    sample = {k: v for k, v in SAMPLES["run_started"].items() if k != "heartbeat_interval_s"}
    old = v1.to_record(_event("run_started", sample))
    del old["stream"]
    data = v1.encode_batch([old, {**old, "seq": 8}])
    decoded = EventCodec().decode_all(data)
    assert [(e.seq, e.stream) for e in decoded] == [(7, ""), (8, "")]
    assert decoded[0].payload["heartbeat_interval_s"] is None


def test_records_of_schema_version_2_still_decode() -> None:
    """The schema saved when `log` was added (v3) keeps v2 records and batches readable."""
    from schemas.codec import load_history

    v2_schema = load_history()[1]
    assert "runbus.LogLines" not in json.dumps(v2_schema)
    v2 = EventCodec(schema=v2_schema, history=[])
    assert v2.fingerprint != EventCodec().fingerprint
    events = [_event(kind, SAMPLES[kind]) for kind in ("run_started", "metric", "run_finished")]
    decoded = EventCodec().decode_all(v2.encode_batch([v2.to_record(e) for e in events]))
    assert decoded == events
    assert EventCodec().decode(v2.encode(events[1])) == events[1]


def test_the_current_schema_is_not_in_history() -> None:
    """Changing the schema without saving the old one in history would orphan every record."""
    from schemas.codec import load_history

    current = EventCodec().fingerprint
    assert all(EventCodec(schema=old, history=[]).fingerprint != current for old in load_history())


def _shared(kind: str, seq: int) -> dict:
    return EventCodec.to_record(Event(f"{seq:032x}", "run-1", seq, kind, 1700000000.5, "host", 42, SAMPLES[kind],
                                      stream="own"))


def test_a_batch_of_one_streams_events_is_written_as_columns_and_decodes_to_the_same_events() -> None:
    from schemas.codec import HEADER_LEN

    codec = EventCodec()
    records = [_shared(kind, seq) for seq, kind in enumerate([*sorted(SAMPLES), "metric", "metric"])]
    columnar, rows = codec.encode_batch(records), codec.encode_rows(records)
    assert columnar[:HEADER_LEN] != rows[:HEADER_LEN] and len(columnar) < len(rows)
    assert codec.decode_all(columnar) == codec.decode_all(rows)


def test_a_batch_mixing_streams_is_written_as_rows() -> None:
    codec = EventCodec()
    records = [_shared("metric", 0), {**_shared("metric", 1), "stream": "other"}]
    assert codec.encode_batch(records) == codec.encode_rows(records)


def test_a_metric_payload_with_a_field_the_schema_lacks_is_refused_as_in_a_row_batch() -> None:
    codec = EventCodec()
    bad = _shared("metric", 0)
    bad["payload"] = ("runbus.MetricLogged", {**SAMPLES["metric"], "unit": "s"})
    with pytest.raises(ValueError, match="does not match its schema"):
        codec.encode_batch([_shared("metric", 1), bad])


def _columnar(**columns: object) -> bytes:
    import io

    import fastavro

    from schemas.codec import MAGIC

    codec = EventCodec()
    datum = {"run_uid": "r", "stream": "s", "host": "h", "pid": 1, "schema_version": 4, "event_id": ["a", "b"],
             "seq": [0, 1], "type": ["metric", "label"], "ts": [1.0, 2.0], "metric_key": ["k"],
             "metric_value": [1.0], "metric_step": [None], "metric_timestamp": [1.0],
             "payloads": [("runbus.LabelSet", {"key": "k", "value": "v"})], **columns}
    out = io.BytesIO()
    fastavro.schemaless_writer(out, codec._columnar_writer.parsed, datum)
    return MAGIC + codec._columnar_writer.fingerprint + out.getvalue()


def test_a_consistent_hand_made_columnar_record_decodes() -> None:
    decoded = EventCodec().decode_all(_columnar())
    assert [(e.type, e.payload) for e in decoded] == [
        ("metric", {"key": "k", "value": 1.0, "step": None, "timestamp": 1.0}), ("label", {"key": "k", "value": "v"})]


@pytest.mark.parametrize(("columns", "named"), [
    ({"event_id": ["a"]}, "event_id, seq, type and ts hold 1, 2, 2 and 2 items"),
    ({"seq": [0, 1, 2]}, "event_id, seq, type and ts hold 2, 3, 2 and 2"),
    ({"ts": []}, "hold 2, 2, 2 and 0 items"),
    ({"metric_value": []},
     "1 metric events but metric_key, metric_value, metric_step and metric_timestamp hold 1, 0, 1 and 1"),
    ({"type": ["metric", "metric"]}, "2 metric events but metric_key"),
    ({"type": ["label", "label"]}, "0 metric events but metric_key"),
    ({"payloads": []}, "1 events other than metrics but payloads holds 0 items"),
    ({"type": ["metric", "param"]}, "event type 'param' does not match payload runbus.LabelSet"),
    ({"type": ["metric", "bogus"]}, "event type 'bogus' does not match payload runbus.LabelSet"),
])
def test_a_columnar_record_whose_columns_disagree_is_a_decode_error_naming_them(columns: dict, named: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(named)):
        EventCodec().decode_all(_columnar(**columns))


# Every columnar schema (runbus.EventBatch) a released version wrote, by fingerprint, and the file in
# schemas/avro/history that keeps it: records written by it are on users' buses and must keep decoding.
RELEASED_COLUMNAR = {"2a65d3f1aeedb4c6": "batch-v4.avsc"}


def test_the_current_columnar_schema_is_saved_in_batch_history() -> None:
    """EventBatch.avsc, or an event payload it embeds, changed without saving the new columnar schema.
    Keep every existing history/batch-*.avsc as it is, save the new expanded schema
    (`json.dumps(schemas.codec._columnar_of(load_event_schema()), indent=1)`) as
    history/batch-v<SCHEMA_VERSION>.avsc (batch-v<SCHEMA_VERSION>-2.avsc if that exists) and add its
    fingerprint to RELEASED_COLUMNAR."""
    from schemas.codec import load_batch_history

    current = EventCodec()._columnar_writer.fingerprint
    assert current.hex() in RELEASED_COLUMNAR
    assert any(_columnar_fingerprint(old) == current for old in load_batch_history())


def _columnar_fingerprint(schema: dict) -> bytes:
    from schemas.codec import _prepare

    return _prepare(schema).fingerprint


def test_every_released_columnar_schema_is_kept_and_decodes() -> None:
    """A saved batch-*.avsc must never be edited or removed: its fingerprint is on stored records."""
    from schemas.codec import load_batch_history

    saved = {_columnar_fingerprint(old).hex() for old in load_batch_history()}
    assert set(RELEASED_COLUMNAR) <= saved, "a released columnar schema was edited or removed from history"
    codec = EventCodec()
    assert all(codec._known[bytes.fromhex(hexdigest)][1] == "columns" for hexdigest in RELEASED_COLUMNAR)


def test_a_columnar_record_of_today_decodes_after_event_batch_gains_a_column_with_a_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import schemas.codec

    today = EventCodec()
    events = [Event(f"{seq:032x}", "run-1", seq, kind, 1.5, "host", 42, SAMPLES[kind], stream="own")
              for seq, kind in enumerate(["metric", "label", "metric"])]
    data = today.encode_batch([today.to_record(e) for e in events])
    assert data[2:10] == today._columnar_writer.fingerprint

    current = schemas.codec._columnar_of

    def with_a_unit_column(envelope: dict) -> dict:
        columnar = current(envelope)
        columnar["fields"].append({"name": "metric_unit", "type": {"type": "array", "items": "string"},
                                   "default": []})
        return columnar

    monkeypatch.setattr(schemas.codec, "_columnar_of", with_a_unit_column)
    future = EventCodec()
    assert future._columnar_writer.fingerprint != today._columnar_writer.fingerprint
    assert future.decode_all(data) == events
    assert future.decode_columns(data) == events
    metrics_only = today.encode_batch([today.to_record(e) for e in events if e.type == "metric"])
    assert future.decode_columns(metrics_only).events() == [e for e in events if e.type == "metric"]
