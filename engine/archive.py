"""Export events to an Avro object container file (plus artifact bodies) and import them again."""

from __future__ import annotations

import dataclasses
import json
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import fastavro

from engine.settings import load_settings
from engine.transfer import TransferReport, append_new
from producers.artifact_store import ArtifactStore, ArtifactUnavailable, is_sha256
from producers.artifacts import bodies_named
from producers.bus import Bus
from producers.subscription import Subscription
from schemas import Event, EventCodec

IMPORTED_FROM = "imported_from"  # key of run_started's extra marking a run that came from an export file


class ArtifactNotBundled(UserWarning):
    """An exported event names a body the artifact store does not hold as recorded."""


def selected_events(bus: Bus, codec: EventCodec, run_uids: Sequence[str] = ()) -> Iterator[Event]:
    """Every decodable event, or those of the runs `run_uids` (full uids: a prefix is resolved by
    the caller, see EngineRunDB.full_uid) and their iterations."""
    chosen = set(run_uids)
    wanted: set[str] = set()
    for event in Subscription.whole_log(bus, codec).events():
        if run_uids:
            if event.type == "run_started" and (event.run_uid in chosen or event.payload["parent_uid"] in wanted):
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


def bundle_artifacts(events: Iterable[Event], out: Path, store: ArtifactStore | None = None) -> int:
    """A tar.gz of the artifact bodies the events name (with their companions, see `bodies_named`),
    each taken from `store` (default: the one of RUNBUS_HOME) by its sha256 and named by it; a body
    the store does not hold as recorded is left out with an ArtifactNotBundled warning naming the
    run and key (an event's uri is never opened)."""
    store = store or ArtifactStore(load_settings().artifact_root)
    added: set[str] = set()
    with tarfile.open(out, "w:gz") as tar:
        for event in events:
            if event.type != "artifact":
                continue
            for sha256 in bodies_named(event.payload):
                if sha256 in added:
                    continue
                try:
                    body = store.verified_path(event.payload["key"], sha256)
                except ArtifactUnavailable as exc:
                    warnings.warn(f"run {event.run_uid}: {exc}; not bundled", ArtifactNotBundled, stacklevel=2)
                    continue
                tar.add(body, arcname=sha256, recursive=False)
                added.add(sha256)
    return len(added)


def import_events(source: BinaryIO, target: Bus, codec: EventCodec) -> TransferReport:
    """Append the container file's events that the bus does not hold yet (by event id). Each
    imported run_started records `extra.imported_from` (the file's name), so the run is known as
    foreign for good: `rerun` and sweep resume refuse it without --trust."""
    reader = fastavro.reader(source, reader_schema=codec.schema, return_record_name=True)
    origin = json.dumps(Path(str(getattr(source, "name", "") or "an export file")).name)
    events = (mark_imported(codec.from_record(record), origin) for record in reader)
    copied, skipped = append_new(events, target, codec)
    return TransferReport(copied, skipped, 0)


def mark_imported(event: Event, origin: str) -> Event:
    """The event, with `extra.imported_from` set to `origin` (JSON) if it starts a run and has none."""
    if event.type != "run_started" or IMPORTED_FROM in event.payload["extra"]:
        return event
    payload = {**event.payload, "extra": {**event.payload["extra"], IMPORTED_FROM: origin}}
    return dataclasses.replace(event, payload=payload)


def unpack_artifacts(bundle: Path, store: ArtifactStore) -> int:
    """Put the bundled bodies into the store, each checked to hash to the sha256 it is named by
    (an entry that does not is refused before anything of it is stored)."""
    count = 0
    with tarfile.open(bundle, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if not is_sha256(member.name):
                raise ValueError(f"artifact bundle entry {member.name!r} is not named by a sha256")
            extracted = tar.extractfile(member)
            if extracted is None:
                continue
            try:
                store.put_stream(extracted, expected_sha256=member.name)
            except ArtifactUnavailable:
                raise ValueError(f"artifact bundle entry {member.name!r} does not match its content") from None
            count += 1
    return count
