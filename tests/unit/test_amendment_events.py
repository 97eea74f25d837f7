"""Edit events (schema v4): built and checked at the call by producers.amendments, encoded by the
codec, checked again by the projector's fold.check_event; records of schema v3 still decode."""

from __future__ import annotations

import getpass

import pytest

from producers.amendments import (
    MAX_NOTE_CHARS,
    amend_run,
    amendment,
    current_principal,
    delete_runs,
    deletion,
    restoration,
)
from producers.bus.memory import MemoryBus
from producers.values import InvalidValue
from projections.fold import check_event
from schemas import SCHEMA_VERSION, Event, EventCodec
from schemas.codec import load_history


def test_every_edit_round_trips_through_the_codec_and_passes_the_projector_check() -> None:
    codec = EventCodec()
    for event in (deletion("r1", "alice", "bad data"), restoration("r1", "alice"),
                  amendment("r1", "alice", labels={"k": 3}, removed_labels=["old"], note="é")):
        assert codec.decode(codec.encode(event)) == event
        assert check_event(event)[1] is None
        assert event.seq == 0 and event.stream and event.schema_version == SCHEMA_VERSION == 4
    assert amendment("r1", "a", labels={"k": 3}).payload["labels"] == {"k": "3"}  # str(), as set_label


def test_each_edit_writes_on_a_stream_of_its_own_keyed_by_the_run() -> None:
    bus = MemoryBus()
    events = delete_runs(bus, EventCodec(), ["r1", "r2", "r1"], by="alice")
    records = bus.read({0: 0})
    assert [r.key for r in records] == ["r1", "r2"] and len({e.stream for e in events}) == 2
    assert [EventCodec().decode(r.value) for r in records] == events


@pytest.mark.parametrize("call, message", [
    (lambda: amendment("r1", "a", labels={"": "x"}), "label key must be a non-empty string"),
    (lambda: amendment("r1", "a", labels={"k": "\udc80"}), "label 'k': value is not valid UTF-8"),
    (lambda: amendment("r1", "a", labels={"k": "v"}, removed_labels=["k"]), "label 'k' is both set and removed"),
    (lambda: amendment("r1", "a", removed_labels=[1]), "label key must be a non-empty string, got int"),
    (lambda: amendment("r1", "a"), "changes nothing"),
    (lambda: amendment("r1", "a", note="n" * (MAX_NOTE_CHARS + 1)), "edit 'note'"),
    (lambda: deletion("r1", ""), "edit 'by' must hold 1 to 256 characters"),
    (lambda: deletion("", "a"), "run uid must be non-empty"),
    (lambda: restoration("r\n1", "a"), "run uid must be non-empty printable ASCII"),
])
def test_a_bad_edit_is_refused_at_the_call_naming_what_is_wrong(call, message) -> None:
    with pytest.raises(InvalidValue, match=message):
        call()


def test_nothing_is_written_when_one_edit_of_several_is_refused() -> None:
    bus = MemoryBus()
    with pytest.raises(InvalidValue):
        delete_runs(bus, EventCodec(), ["r1", ""], by="a")
    with pytest.raises(InvalidValue):
        amend_run(bus, EventCodec(), "r1", by="a", labels={"": "x"})
    assert bus.end_offsets() == {0: 0}


def test_the_principal_is_the_kafka_user_when_one_is_given_else_the_os_user() -> None:
    assert current_principal("svc-trainer") == "svc-trainer"
    assert current_principal(None) == getpass.getuser()


@pytest.mark.parametrize("kind, payload, reason", [
    ("run_deleted", {"by": "a", "reason": "\udc80"}, "not valid UTF-8"),
    ("run_deleted", {"by": "a", "reason": "r" * 70_000}, "run_deleted reason holds 70000 characters"),
    ("run_restored", {"by": ""}, "run_restored by is empty"),
    ("run_amended", {"by": "a", "labels": {"": "v"}, "removed_labels": [], "note": None},
     "run_amended label key is empty"),
    ("run_amended", {"by": "a", "labels": {}, "removed_labels": ["x"], "note": 3}, "note is a int"),
])
def test_the_projector_refuses_what_the_call_would_refuse(kind, payload, reason) -> None:
    _, problem = check_event(Event("e" * 32, "r1", 0, kind, 1.0, "h", 1, payload, stream="s"))
    assert problem is not None and reason in problem


def test_a_record_written_by_schema_v3_still_decodes() -> None:
    v3 = load_history()[-1]
    assert "LogLines" in str(v3) and "RunAmended" not in str(v3)
    old = EventCodec(v3, history=[])
    event = Event("e" * 32, "r1", 0, "label", 1.0, "h", 1, {"key": "k", "value": "v"}, schema_version=3)
    assert EventCodec().decode(old.encode(event)) == event
