"""Binary codec for events: Avro single-object encoding (marker, 8-byte schema fingerprint, body).

The fingerprint names the writer's schema, so records written by an older schema version are
resolved against the current (reader) schema and still decode after fields are added.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.events import RECORD_OF_TYPE, TYPE_OF_RECORD, Event

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8


class DecodeError(ValueError):
    """Bytes that are not a Runbus event this codec can read."""


@dataclass(frozen=True)
class _Schema:
    parsed: Any
    fingerprint: bytes


def _prepare(schema: dict[str, Any]) -> _Schema:
    parsed = fastavro.parse_schema(schema, named_schemas={})
    digest = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
    return _Schema(parsed, bytes.fromhex(digest))


def load_event_schema() -> dict[str, Any]:
    """The current event schema, fully expanded (payload records inlined)."""
    folder = resources.files("schemas") / "avro"
    named: dict[str, Any] = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".avsc") and entry.name != "runbus.Event.avsc":
            record = json.loads(entry.read_text())
            named[f"{record['namespace']}.{record['name']}"] = record
    envelope = json.loads((folder / "runbus.Event.avsc").read_text())
    for envelope_field in envelope["fields"]:
        if envelope_field["name"] == "payload":
            envelope_field["type"] = [named[name] for name in envelope_field["type"]]
    return envelope


def load_history() -> list[dict[str, Any]]:
    """Earlier versions of the event schema, kept so their records keep decoding."""
    folder = resources.files("schemas") / "avro" / "history"
    if not folder.is_dir():
        return []
    return [json.loads(e.read_text()) for e in sorted(folder.iterdir(), key=lambda e: e.name)
            if e.name.endswith(".avsc")]


def _single_object(header: bytes, schema: Any, datum: Any, what: str) -> bytes:
    out = io.BytesIO()
    out.write(header)
    try:
        fastavro.schemaless_writer(out, schema, datum, strict=True)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{what} does not match its schema: {exc}") from exc
    return out.getvalue()


def _batch_of(envelope: dict[str, Any]) -> dict[str, Any]:
    """The schema of a batch record: an array of one run's events, in seq order."""
    return {"type": "array", "items": envelope}


class EventCodec:
    """Encodes events with `schema` and decodes records written by it or any of `history`.

    A bus record holds one event, or (as the background writer sends them) a batch of one run's
    consecutive events; each kind is tagged with its own schema's fingerprint.
    """

    def __init__(self, schema: dict[str, Any] | None = None,
                 history: Iterable[dict[str, Any]] | None = None) -> None:
        current = schema if schema is not None else load_event_schema()
        self._writer = _prepare(current)
        self._batch_writer = _prepare(_batch_of(current))
        # fingerprint -> (writer schema, is a batch)
        self._known: dict[bytes, tuple[Any, bool]] = {
            self._writer.fingerprint: (self._writer.parsed, False),
            self._batch_writer.fingerprint: (self._batch_writer.parsed, True)}
        for old in (history if history is not None else load_history()):
            for prepared, is_batch in ((_prepare(old), False), (_prepare(_batch_of(old)), True)):
                self._known.setdefault(prepared.fingerprint, (prepared.parsed, is_batch))
        self._header = MAGIC + self._writer.fingerprint
        self._batch_header = MAGIC + self._batch_writer.fingerprint

    @property
    def fingerprint(self) -> bytes:
        return self._writer.fingerprint

    @property
    def schema(self) -> Any:
        """The parsed current schema (for Avro container files of events)."""
        return self._writer.parsed

    @staticmethod
    def record_name(event_type: str) -> str:
        """The Avro record name of an event type's payload."""
        try:
            return RECORD_OF_TYPE[event_type]
        except KeyError:
            raise ValueError(f"unknown event type {event_type!r}") from None

    @staticmethod
    def to_record(event: Event) -> dict[str, Any]:
        """The event as an Avro record of the envelope schema (union payload in tuple notation)."""
        return {
            "event_id": event.event_id, "run_uid": event.run_uid, "seq": event.seq,
            "stream": event.stream, "type": event.type, "ts": event.ts, "host": event.host, "pid": event.pid,
            "schema_version": event.schema_version,
            "payload": (RECORD_OF_TYPE[event.type], event.payload),
        }

    @staticmethod
    def from_record(record: dict[str, Any]) -> Event:
        """The event of a record read with return_record_name=True."""
        record_name, payload = record["payload"]
        if TYPE_OF_RECORD.get(record_name) != record["type"]:
            raise DecodeError(f"event type {record['type']!r} does not match payload {record_name}")
        return Event(record["event_id"], record["run_uid"], record["seq"], record["type"],
                     record["ts"], record["host"], record["pid"], payload, record["schema_version"],
                     record.get("stream", ""))

    def encode(self, event: Event) -> bytes:
        return self.encode_record(self.to_record(event))

    def encode_record(self, record: dict[str, Any]) -> bytes:
        """Encode a record already in envelope form (see `to_record`)."""
        return _single_object(self._header, self._writer.parsed, record, f"{record['type']} event")

    def encode_batch(self, records: list[dict[str, Any]]) -> bytes:
        """Encode several records (envelope form, one run's, in seq order) as one bus record."""
        return _single_object(self._batch_header, self._batch_writer.parsed, records,
                              f"a batch of {len(records)} events")

    def decode(self, data: bytes) -> Event:
        """The event of a single-event record."""
        events = self.decode_all(data)
        if len(events) != 1:
            raise DecodeError(f"expected one event, the record holds {len(events)}")
        return events[0]

    def decode_all(self, data: bytes) -> list[Event]:
        """The events of a record, single or batch, in order."""
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object record (bad marker)")
        known = self._known.get(data[2:HEADER_LEN])
        if known is None:
            raise DecodeError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
        writer, is_batch = known
        reader = self._batch_writer.parsed if is_batch else self._writer.parsed
        try:
            decoded = fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer, reader,
                                                 return_record_name=True)
        except Exception as exc:  # fastavro raises many kinds on corrupt bytes
            raise DecodeError(f"corrupt event record: {exc!r}") from exc
        return [self.from_record(record) for record in decoded] if is_batch else [self.from_record(decoded)]
