"""Hostile columnar records (runbus.EventBatch) on the bus: a record whose columns disagree is one
dead letter naming what is wrong, and the records after it are folded."""

from __future__ import annotations

import io
from typing import Any

import duckdb
import fastavro
import pytest

from producers.bus.memory import MemoryBus
from projections import Projector
from schemas import EventCodec
from schemas.codec import MAGIC
from tests.support.foreign import envelope, metric, started

CODEC = EventCodec()


def _columnar(**columns: Any) -> bytes:
    datum = {"run_uid": "r", "stream": "own", "host": "h", "pid": 1, "schema_version": 4,
             "event_id": ["a" * 32, "b" * 32], "seq": [1, 2], "type": ["metric", "metric"], "ts": [1.7e9, 1.7e9],
             "metric_key": ["k", "k"], "metric_value": [1.0, 2.0], "metric_step": [None, 1],
             "metric_timestamp": [1.7e9, 1.7e9], "payloads": [], **columns}
    out = io.BytesIO()
    fastavro.schemaless_writer(out, CODEC._columnar_writer.parsed, datum)
    return MAGIC + CODEC._columnar_writer.fingerprint + out.getvalue()


@pytest.mark.parametrize(("columns", "reason"), [
    ({"event_id": ["a" * 32]}, "event_id, seq, type and ts hold 1, 2, 2 and 2 items"),
    ({"metric_value": [1.0]}, "2 metric events but metric_key, metric_value, metric_step and metric_timestamp"),
    ({"type": ["metric", "label"], "metric_key": ["k"], "metric_value": [1.0], "metric_step": [None],
      "metric_timestamp": [1.7e9]}, "1 events other than metrics but payloads holds 0 items"),
])
def test_a_columnar_record_whose_columns_disagree_is_one_dead_letter_with_its_reason(
        columns: dict[str, Any], reason: str) -> None:
    bus, con = MemoryBus(), duckdb.connect(":memory:")
    bus.append([("r", CODEC.encode_batch([envelope("r", 0, "run_started", started("r"), "own", 1.7e9)]))])
    bus.append([("r", _columnar(**columns))])
    good = [envelope("r", seq, "metric", metric("k", float(seq), 1.7e9), "own", 1.7e9) for seq in (3, 4)]
    bus.append([("r", CODEC.encode_batch(good))])
    Projector(bus, con).catch_up()
    dead = con.execute("SELECT \"offset\", error, event_id FROM dead_letters").fetchall()
    assert len(dead) == 1 and dead[0][0] == 1 and dead[0][2] is None and reason in dead[0][1], dead
    assert con.execute("SELECT seq FROM events ORDER BY position").fetchall() == [(0,), (3,), (4,)]
    assert con.execute("SELECT count(*) FROM metrics").fetchall() == [(2,)]


def test_a_consistent_columnar_record_folds_like_its_events() -> None:
    bus, con = MemoryBus(), duckdb.connect(":memory:")
    bus.append([("r", CODEC.encode_batch([envelope("r", 0, "run_started", started("r"), "own", 1.7e9)]))])
    bus.append([("r", _columnar())])
    Projector(bus, con).catch_up()
    assert con.execute("SELECT seq, payload FROM events WHERE type = 'metric' ORDER BY position").fetchall() == [
        (1, '{"key":"k","value":1.0,"step":null,"timestamp":1700000000.0}'),
        (2, '{"key":"k","value":2.0,"step":1,"timestamp":1700000000.0}')]
