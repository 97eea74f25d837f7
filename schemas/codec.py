"""Binary codec for events: Avro single-object encoding (marker, 8-byte schema fingerprint, body).

The fingerprint names the writer's schema, so records written by an older schema version are
resolved against the current (reader) schema and still decode after fields are added.

A bus record holds one event (runbus.Event), a row batch (an array of runbus.Event), or a columnar
batch (runbus.EventBatch: the fields the events share once, the rest as columns, metric payloads
as columns of their own). All three decode to the same events; `encode_batch` writes the columnar
one whenever the events share run, stream, host, pid and schema version (as the background
writer's batches do), because it is smaller and several times cheaper to decode.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.events import RECORD_OF_TYPE, TYPE_OF_RECORD, Event

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8
_SINGLE, _ROWS, _COLUMNS = "single", "rows", "columns"  # the kinds of bus record


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
        if entry.name.endswith(".avsc") and entry.name not in ("runbus.Event.avsc", _COLUMNAR_FILE):
            record = json.loads(entry.read_text())
            named[f"{record['namespace']}.{record['name']}"] = record
    envelope = json.loads((folder / "runbus.Event.avsc").read_text())
    for envelope_field in envelope["fields"]:
        if envelope_field["name"] == "payload":
            envelope_field["type"] = [named[name] for name in envelope_field["type"]]
    return envelope


def _saved(prefix: str) -> list[dict[str, Any]]:
    folder = resources.files("schemas") / "avro" / "history"
    if not folder.is_dir():
        return []
    return [json.loads(e.read_text()) for e in sorted(folder.iterdir(), key=lambda e: e.name)
            if e.name.startswith(prefix) and e.name.endswith(".avsc")]


def load_history() -> list[dict[str, Any]]:
    """Earlier versions of the event schema (history/v<N>.avsc), kept so their records keep decoding."""
    return _saved("v")


def load_batch_history() -> list[dict[str, Any]]:
    """Every columnar batch schema (runbus.EventBatch, fully expanded) a released version wrote
    (history/batch-v<N>.avsc, the current one included), kept so their records keep decoding after
    EventBatch.avsc or the payloads it embeds change."""
    return _saved("batch-")


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


_COLUMNAR_FILE = "runbus.EventBatch.avsc"
_SHARED = ("run_uid", "stream", "host", "pid", "schema_version")
_METRIC_FIELDS = ("key", "value", "step", "timestamp")
_METRIC_RECORD = RECORD_OF_TYPE["metric"]


def _columnar_of(envelope: dict[str, Any]) -> dict[str, Any]:
    """The schema of a columnar batch record (runbus.EventBatch) whose `payloads` are items of the
    envelope's payload union."""
    columnar = json.loads((resources.files("schemas") / "avro" / _COLUMNAR_FILE).read_text())
    union = next(f["type"] for f in envelope["fields"] if f["name"] == "payload")
    for column in columnar["fields"]:
        if column["name"] == "payloads":
            column["type"] = {"type": "array", "items": copy.deepcopy(union)}
    return columnar


def _columns_of(records: list[dict[str, Any]], envelope_fields: int) -> dict[str, Any] | None:
    """The records as a columnar batch, or None when they cannot be one exactly: no records, fields
    they do not share, a payload that is not its type's record, a record or metric payload with
    other fields than the schema's (the row encoding then refuses or writes them as it always did)."""
    if not records:
        return None
    first = records[0]
    try:
        shared = tuple(first[name] for name in _SHARED)
        run_uid, stream, host, pid, version = shared
        ids, seqs, types, times = [], [], [], []
        keys, values, steps, stamps = [], [], [], []
        payloads = []
        for record in records:
            if (len(record) != envelope_fields or record["run_uid"] != run_uid or record["stream"] != stream
                    or record["host"] != host or record["pid"] != pid or record["schema_version"] != version):
                return None
            kind = record["type"]
            name, payload = record["payload"]
            if kind == "metric" and name == _METRIC_RECORD:
                if len(payload) != len(_METRIC_FIELDS):
                    return None
                keys.append(payload["key"])
                values.append(payload["value"])
                steps.append(_step_item(payload["step"]))
                stamps.append(payload["timestamp"])
            elif RECORD_OF_TYPE.get(kind) == name:
                payloads.append((name, payload))
            else:
                return None
            ids.append(record["event_id"])
            seqs.append(record["seq"])
            types.append(kind)
            times.append(record["ts"])
    except (KeyError, TypeError, ValueError):
        return None
    return {"run_uid": run_uid, "stream": stream, "host": host, "pid": pid, "schema_version": version,
            "event_id": ids, "seq": seqs, "type": types, "ts": times, "metric_key": keys,
            "metric_value": values, "metric_step": steps, "metric_timestamp": stamps, "payloads": payloads}


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # Avro's long


def _step_item(step: Any) -> Any:
    """A metric_step item: an int64 in tuple notation, so fastavro writes the union's long branch
    without trying each branch (a third of the columnar record's encoding); anything else as it
    is (None, or a value the union refuses as it always did). The bytes are the same."""
    if type(step) is int and INT64_MIN <= step <= INT64_MAX:
        return ("long", step)
    return step


@dataclass(frozen=True, slots=True)
class MetricColumns:
    """The events of a columnar record that holds only metric events, as columns (one item per
    event, in order): what `events()` gives without a Python object per event. A consumer that
    folds it column-wise must give the same result as folding `events()`."""

    run_uid: str
    stream: str
    host: str
    pid: int
    schema_version: int
    event_id: list[str]
    seq: list[int]
    ts: list[float]
    key: list[str]
    value: list[float]
    step: list[int | None]
    timestamp: list[float]
    type: str = "metric"

    def __len__(self) -> int:
        return len(self.event_id)

    def events(self) -> list[Event]:
        """The events, exactly as EventCodec.decode_all gives them."""
        run_uid, stream, host, pid, version = self.run_uid, self.stream, self.host, self.pid, self.schema_version
        return [Event(event_id, run_uid, seq, "metric", ts, host, pid, payload, version, stream)
                for event_id, seq, ts, payload
                in zip(self.event_id, self.seq, self.ts,
                       _metric_payloads(self.key, self.value, self.step, self.timestamp), strict=True)]


def _metric_payloads(keys: list[str], values: list[float], steps: list[int | None],
                     stamps: list[float]) -> Iterator[dict[str, Any]]:
    """The payload of each metric event of a columnar batch, in order (the metric record's fields)."""
    return ({"key": key, "value": value, "step": step, "timestamp": timestamp}
            for key, value, step, timestamp in zip(keys, values, steps, stamps, strict=True))


def _check_columns(batch: dict[str, Any]) -> int:
    """How many metric events a decoded columnar batch holds; DecodeError naming the columns that
    disagree (untrusted bytes)."""
    ids, seqs, types, times = batch["event_id"], batch["seq"], batch["type"], batch["ts"]
    count = len(types)
    if not len(ids) == len(seqs) == len(times) == count:
        raise DecodeError(f"columnar batch: event_id, seq, type and ts hold {len(ids)}, {len(seqs)}, {count} "
                          f"and {len(times)} items, not one per event")
    keys, values, steps, stamps = (batch["metric_key"], batch["metric_value"], batch["metric_step"],
                                   batch["metric_timestamp"])
    metrics = types.count("metric")
    if not len(keys) == len(values) == len(steps) == len(stamps) == metrics:
        raise DecodeError(f"columnar batch: {metrics} metric events but metric_key, metric_value, metric_step "
                          f"and metric_timestamp hold {len(keys)}, {len(values)}, {len(steps)} and {len(stamps)} items")
    payloads = batch["payloads"]
    if len(payloads) != count - metrics:
        raise DecodeError(f"columnar batch: {count - metrics} events other than metrics but payloads holds "
                          f"{len(payloads)} items")
    return metrics


def _metric_columns(batch: dict[str, Any]) -> MetricColumns:
    return MetricColumns(*(batch[name] for name in _SHARED), batch["event_id"], batch["seq"], batch["ts"],
                         batch["metric_key"], batch["metric_value"], batch["metric_step"], batch["metric_timestamp"])


def _events_of_columns(batch: dict[str, Any]) -> list[Event]:
    """The events of a decoded columnar batch whose columns agree (`_check_columns`), in order;
    DecodeError naming a payload that is not its event type's record."""
    ids, seqs, types, times = batch["event_id"], batch["seq"], batch["type"], batch["ts"]
    run_uid, stream, host, pid, version = (batch[name] for name in _SHARED)
    metric_payloads = _metric_payloads(batch["metric_key"], batch["metric_value"], batch["metric_step"],
                                       batch["metric_timestamp"])
    other_payloads = iter(batch["payloads"])
    events = []
    for event_id, seq, kind, ts in zip(ids, seqs, types, times, strict=True):
        if kind == "metric":
            payload = next(metric_payloads)
        else:
            name, payload = next(other_payloads)
            if TYPE_OF_RECORD.get(name) != kind:
                raise DecodeError(f"event type {kind!r} does not match payload {name}")
        events.append(Event(event_id, run_uid, seq, kind, ts, host, pid, payload, version, stream))
    return events


class EventCodec:
    """Encodes events with `schema` and decodes records written by it, by any of `history` (earlier
    event schemas) or by any of `batch_history` (columnar schemas released versions wrote; by default
    the saved ones in avro/history).

    A bus record holds one event, or (as the background writer sends them) a batch of one run's
    consecutive events, as rows or columns; each kind is tagged with its own schema's fingerprint.
    """

    def __init__(self, schema: dict[str, Any] | None = None,
                 history: Iterable[dict[str, Any]] | None = None,
                 batch_history: Iterable[dict[str, Any]] | None = None) -> None:
        current = schema if schema is not None else load_event_schema()
        self._writer = _prepare(current)
        self._batch_writer = _prepare(_batch_of(current))
        self._columnar_writer = _prepare(_columnar_of(current))
        self._envelope_fields = len(current["fields"])
        # fingerprint -> (writer schema, kind of record, reader schema: None when it is the writer's)
        self._known: dict[bytes, tuple[Any, str, Any]] = {
            self._writer.fingerprint: (self._writer.parsed, _SINGLE, None),
            self._batch_writer.fingerprint: (self._batch_writer.parsed, _ROWS, None),
            self._columnar_writer.fingerprint: (self._columnar_writer.parsed, _COLUMNS, None)}
        old_schemas = list(history if history is not None else load_history())
        old_batches = batch_history if batch_history is not None else load_batch_history()
        # the columnar schemas a released version wrote are read from their saved copies, never
        # rebuilt from today's EventBatch.avsc (which may have changed since); an old event schema
        # combined with today's columnar layout is known too, for codecs built on an old schema
        for prepared, kind, reader in (
                *((_prepare(old), _SINGLE, self._writer.parsed) for old in old_schemas),
                *((_prepare(_batch_of(old)), _ROWS, self._batch_writer.parsed) for old in old_schemas),
                *((_prepare(old), _COLUMNS, self._columnar_writer.parsed) for old in old_batches),
                *((_prepare(_columnar_of(old)), _COLUMNS, self._columnar_writer.parsed) for old in old_schemas)):
            self._known.setdefault(prepared.fingerprint, (prepared.parsed, kind, reader))
        self._header = MAGIC + self._writer.fingerprint
        self._batch_header = MAGIC + self._batch_writer.fingerprint
        self._columnar_header = MAGIC + self._columnar_writer.fingerprint

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
        """Encode several records (envelope form, one run's, in seq order) as one bus record: a
        columnar batch when they share run, stream, host, pid and schema version, else a row batch."""
        columns = _columns_of(records, self._envelope_fields)
        if columns is not None:
            return _single_object(self._columnar_header, self._columnar_writer.parsed, columns,
                                  f"a batch of {len(records)} events")
        return self.encode_rows(records)

    def encode_metric_columns(self, columns: MetricColumns) -> bytes:
        """Encode metric events given as columns (what `decode_columns` gives back) as one columnar
        record, without a record dict per event (the background writer's `log_metric` points).
        ValueError when the columns disagree in length, hold no event, or a value does not fit."""
        count = len(columns.event_id)
        lengths = [len(column) for column in (columns.seq, columns.ts, columns.key, columns.value, columns.step,
                                              columns.timestamp)]
        if count == 0 or any(length != count for length in lengths):
            raise ValueError(f"metric columns: event_id holds {count} items, the others {lengths}: "
                             f"one item per event is needed, and at least one event")
        if columns.type != "metric":
            raise ValueError(f"metric columns: type is {columns.type!r}, not 'metric'")
        datum = {"run_uid": columns.run_uid, "stream": columns.stream, "host": columns.host, "pid": columns.pid,
                 "schema_version": columns.schema_version, "event_id": columns.event_id, "seq": columns.seq,
                 "type": ["metric"] * count, "ts": columns.ts, "metric_key": columns.key,
                 "metric_value": columns.value, "metric_step": [_step_item(step) for step in columns.step],
                 "metric_timestamp": columns.timestamp, "payloads": []}
        return _single_object(self._columnar_header, self._columnar_writer.parsed, datum,
                              f"a batch of {count} metric events")

    def encode_rows(self, records: list[dict[str, Any]]) -> bytes:
        """Encode several records (envelope form) as one row batch record (an array of envelopes)."""
        return _single_object(self._batch_header, self._batch_writer.parsed, records,
                              f"a batch of {len(records)} events")

    def decode(self, data: bytes) -> Event:
        """The event of a single-event record."""
        events = self.decode_all(data)
        if len(events) != 1:
            raise DecodeError(f"expected one event, the record holds {len(events)}")
        return events[0]

    def decode_all(self, data: bytes) -> list[Event]:
        """The events of a record, single or batch (rows or columns), in order."""
        decoded = self.decode_columns(data)
        return decoded.events() if isinstance(decoded, MetricColumns) else decoded

    def decode_columns(self, data: bytes) -> list[Event] | MetricColumns:
        """As `decode_all`, but a columnar record of metric events only (as the background writer
        writes a run's `log_metric` points) is given as its columns."""
        decoded, kind = self._decode(data)
        if kind == _COLUMNS:
            if _check_columns(decoded) == len(decoded["type"]) and decoded["type"]:
                return _metric_columns(decoded)
            return _events_of_columns(decoded)
        return [self.from_record(record) for record in decoded] if kind == _ROWS else [self.from_record(decoded)]

    def _decode(self, data: bytes) -> tuple[Any, str]:
        """The Avro datum of a record and its kind (_SINGLE, _ROWS, _COLUMNS)."""
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object record (bad marker)")
        known = self._known.get(data[2:HEADER_LEN])
        if known is None:
            raise DecodeError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
        writer, kind, reader = known
        try:
            decoded = fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer, reader,
                                                 return_record_name=True)
        except Exception as exc:  # fastavro raises many kinds on corrupt bytes
            raise DecodeError(f"corrupt event record: {exc!r}") from exc
        return decoded, kind
