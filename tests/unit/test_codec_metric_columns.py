"""Metric columns (the background writer's log_metric points) encode to the bytes their records do."""

from __future__ import annotations

import pytest

from schemas import SCHEMA_VERSION, EventCodec
from schemas.codec import MetricColumns
from schemas.events import Event


def _columns(events: list[Event]) -> MetricColumns:
    return MetricColumns("run", "s", "h", 7, SCHEMA_VERSION, [e.event_id for e in events], [e.seq for e in events],
                         [e.ts for e in events], [e.payload["key"] for e in events],
                         [e.payload["value"] for e in events], [e.payload["step"] for e in events],
                         [e.payload["timestamp"] for e in events])


def test_metric_columns_encode_to_the_bytes_their_records_do_and_decode_back() -> None:
    codec = EventCodec()
    steps = [None, 0, -1, 2**63 - 1, -(2**63), 5]
    events = [Event(f"{i:032x}", "run", i, "metric", 1.5 + i, "h", 7,
                    {"key": f"m{i}", "value": i / 3, "step": step, "timestamp": 2.0}, SCHEMA_VERSION, "s")
              for i, step in enumerate(steps)]
    data = codec.encode_metric_columns(_columns(events))
    assert data == codec.encode_batch([codec.to_record(e) for e in events])
    assert codec.decode_columns(data) == _columns(events)


@pytest.mark.parametrize("step", [2**63, 1.5, "3"])
def test_a_step_the_schema_cannot_hold_is_refused_with_a_value_error(step: object) -> None:
    codec = EventCodec()
    event = Event("0" * 32, "run", 0, "metric", 1.0, "h", 7, {"key": "m", "value": 1.0, "step": step, "timestamp": 2.0},
                  SCHEMA_VERSION, "s")
    with pytest.raises(ValueError):
        codec.encode_metric_columns(_columns([event]))
    with pytest.raises(ValueError):
        codec.encode_batch([codec.to_record(event)])


def test_columns_that_disagree_in_length_are_refused() -> None:
    codec = EventCodec()
    event = Event("0" * 32, "run", 0, "metric", 1.0, "h", 7, {"key": "m", "value": 1.0, "step": 1, "timestamp": 2.0},
                  SCHEMA_VERSION, "s")
    columns = _columns([event])
    columns.seq.append(1)
    with pytest.raises(ValueError, match="one item per event"):
        codec.encode_metric_columns(columns)
