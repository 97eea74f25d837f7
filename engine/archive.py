"""Export events to an Avro object container file (plus artifact bodies) and import them again."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import fastavro

from engine.transfer import TransferReport, all_values, append_new, decoded_events
from producers.artifact_store import ArtifactStore
from producers.bus import Bus
from producers.data_item import DataItem
from schemas import Event, EventCodec


def selected_events(bus: Bus, codec: EventCodec, run_uids: Sequence[str] = ()) -> Iterator[Event]:
    """Every decodable event, or those of the runs whose uid starts with one of `run_uids` (and
    their iterations)."""
    wanted: set[str] = set()
    for event in decoded_events(all_values(bus), codec):
        if run_uids:
            if event.type == "run_started" and (
                    any(event.run_uid.startswith(u) for u in run_uids) or event.payload["parent_uid"] in wanted):
                wanted.add(event.run_uid)
            if event.run_uid not in wanted:
                continue
        yield event


def export_events(events: Iterable[Event], codec: EventCodec, out: BinaryIO) -> list[Event]:
    """Write the events to an Avro container file; returns them (for bundling artifacts)."""
    kept: list[Event] = []

    def records() -> Iterator[dict]:
        for event in events:
            kept.append(event)
            yield codec.to_record(event)

    fastavro.writer(out, codec.schema, records(), codec="deflate")
    return kept


def bundle_artifacts(events: Iterable[Event], out: Path) -> int:
    """A tar.gz of the artifact bodies the events point at, each named by its sha256."""
    added: set[str] = set()
    with tarfile.open(out, "w:gz") as tar:
        for event in events:
            if event.type != "artifact":
                continue
            item = DataItem(event.payload["key"], event.payload["uri"], sha256=event.payload["sha256"])
            path = Path(item.local())
            if item.sha256 not in added and path.exists():
                tar.add(path, arcname=item.sha256)
                added.add(item.sha256)
    return len(added)


def import_events(source: BinaryIO, target: Bus, codec: EventCodec) -> TransferReport:
    """Append the container file's events that the bus does not hold yet (by event id)."""
    reader = fastavro.reader(source, reader_schema=codec.schema, return_record_name=True)
    copied, skipped = append_new((codec.from_record(record) for record in reader), target, codec)
    return TransferReport(copied, skipped, 0)


def unpack_artifacts(bundle: Path, store: ArtifactStore) -> int:
    """Put the bundled bodies into the store (content-addressed: existing ones are kept)."""
    count = 0
    with tarfile.open(bundle, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            extracted = tar.extractfile(member)
            if extracted is None:
                continue
            stored = store.put_bytes(io.BytesIO(extracted.read()).getvalue())
            if stored.sha256 != member.name:
                raise ValueError(f"artifact bundle entry {member.name!r} does not match its content")
            count += 1
    return count
