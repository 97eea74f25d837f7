"""Edits of runs after the fact: delete, restore and amend (labels, note), written as events.

An edit is an event about a run written by another process than the run's, on a stream of its own
(as the reaper writes its verdict), keyed by the run's uid like the run's own records, so it sits in
the run's partition after what the run wrote before it. Every value is checked here, at the call,
with the rules RunContext.set_label applies; the projector checks them again (the bus is untrusted).

`by` is who the writer says it is (`current_principal`: the OS user, or the Kafka SASL user). The
log records the claim and cannot prove it: on a secured Kafka the ACLs decide who may write at all.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from producers.bus import Bus
from producers.values import InvalidValue, check_key, check_label, check_text
from schemas import Event, EventCodec

MAX_BY_CHARS = 256
MAX_NOTE_CHARS = 64 * 1024  # a note, a deletion reason
MAX_LABELS_CHARS = 256 * 1024  # all keys and values of one amendment: a bus record stays under 1 MiB


def current_principal(kafka_user: str | None = None) -> str:
    """Who edits: the Kafka SASL user when one is configured, else the OS user."""
    if kafka_user:
        return kafka_user
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return f"uid {os.getuid()}"


def check_by(by: object) -> str:
    """`by` if it is non-empty UTF-8 text of at most MAX_BY_CHARS; InvalidValue otherwise."""
    text = check_text("edit", "by", by)
    if not text or len(text) > MAX_BY_CHARS:
        raise InvalidValue(f"edit 'by' must hold 1 to {MAX_BY_CHARS} characters, got {len(text)}")
    return text


def check_uid(uid: object) -> str:
    """`uid` if it is a non-empty run uid of printable ASCII; InvalidValue otherwise."""
    if type(uid) is not str or not uid or not (uid.isascii() and uid.isprintable()):
        raise InvalidValue(f"run uid must be non-empty printable ASCII text, got {uid!r}")
    return uid


def _check_long_text(what: str, text: object) -> str:
    checked = check_text("edit", what, text)
    if len(checked) > MAX_NOTE_CHARS:
        raise InvalidValue(f"edit {what!r}: {len(checked)} characters, at most {MAX_NOTE_CHARS}")
    return checked


def check_labels(labels: Mapping[Any, Any] | None, removed: Iterable[Any]) -> tuple[dict[str, str], list[str]]:
    """The labels to set (values through str(), as set_label) and the keys to remove, checked:
    keys non-empty UTF-8, values UTF-8, a key not both set and removed, bounded in total."""
    chosen = dict(check_label(key, value) for key, value in (labels or {}).items())
    gone = [check_key("label", key, max_chars=None) for key in removed]  # any label there, however long
    both = sorted(set(chosen) & set(gone))
    if both:
        raise InvalidValue(f"label {both[0]!r} is both set and removed")
    size = sum(len(k) + len(v) for k, v in chosen.items()) + sum(map(len, gone))
    if size > MAX_LABELS_CHARS:
        raise InvalidValue(f"labels of one amendment hold {size} characters, at most {MAX_LABELS_CHARS}")
    return chosen, list(dict.fromkeys(gone))


def _event(uid: str, kind: str, payload: dict[str, Any], ts: float | None) -> Event:
    return Event(uuid.uuid4().hex, check_uid(uid), 0, kind, time.time() if ts is None else ts,
                 socket.gethostname(), os.getpid(), payload, stream=uuid.uuid4().hex)


def deletion(uid: str, by: str, reason: str = "", ts: float | None = None) -> Event:
    """The tombstone of run `uid`: it and its iterations leave the projection until restored."""
    return _event(uid, "run_deleted", {"by": check_by(by), "reason": _check_long_text("reason", reason)}, ts)


def restoration(uid: str, by: str, ts: float | None = None) -> Event:
    """Undoes the tombstone of run `uid` (until a purge removed its events)."""
    return _event(uid, "run_restored", {"by": check_by(by)}, ts)


def amendment(uid: str, by: str, labels: Mapping[str, Any] | None = None,
              removed_labels: Iterable[str] = (), note: str | None = None, ts: float | None = None) -> Event:
    """An edit of run `uid`: labels set and removed, and (unless None) its note from now on."""
    chosen, gone = check_labels(labels, removed_labels)
    if note is not None:
        note = _check_long_text("note", note)
    if not chosen and not gone and note is None:
        raise InvalidValue(f"amendment of run {uid!r} changes nothing: give labels, removed_labels or a note")
    return _event(uid, "run_amended", {"by": check_by(by), "labels": chosen, "removed_labels": gone,
                                       "note": note}, ts)


def append_events(bus: Bus, codec: EventCodec, events: Sequence[Event]) -> None:
    """Append the events in one call, each as a record keyed by its run's uid; raises (BusError)
    when the bus did not take them (none of them, or some: a retry is a duplicate the projector skips)."""
    if events:
        bus.append([(event.run_uid, codec.encode(event)) for event in events])


def delete_runs(bus: Bus, codec: EventCodec, uids: Iterable[str], by: str, reason: str = "") -> list[Event]:
    """Write a tombstone for each run (all checked before any is written); returns the events."""
    events = [deletion(uid, by, reason) for uid in dict.fromkeys(uids)]
    append_events(bus, codec, events)
    return events


def restore_runs(bus: Bus, codec: EventCodec, uids: Iterable[str], by: str) -> list[Event]:
    """Write a restoration for each run (all checked before any is written); returns the events."""
    events = [restoration(uid, by) for uid in dict.fromkeys(uids)]
    append_events(bus, codec, events)
    return events


def amend_run(bus: Bus, codec: EventCodec, uid: str, by: str, labels: Mapping[str, Any] | None = None,
              removed_labels: Iterable[str] = (), note: str | None = None) -> Event:
    """Write one amendment of run `uid` (see `amendment`); returns the event."""
    event = amendment(uid, by, labels, removed_labels, note)
    append_events(bus, codec, [event])
    return event
