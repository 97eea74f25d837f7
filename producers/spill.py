"""Spill files: bus records a bus refused (or that could not be written before the process ended),
kept on local disk until a writer delivers them.

A writer keeps its refused records in one file of its own in the spill folder (RUNBUS_HOME/spill,
owner-only: 0700 folder, 0600 files), locked while the writer lives. Each file names the bus it was
meant for. The next writer that starts on that bus, or `deliver_spill`, appends the records of every
unlocked file and deletes it. The records are the encoded events with their event ids, so a delivery
repeated after a crash only duplicates events the projector skips.

Format: a header line `RUNBUS-SPILL 1 <target as JSON>`, then frames: key length (4 bytes, signed,
-1 for no key), value length (4 bytes), key (UTF-8), value. What cannot be delivered (a frame whose key
is not UTF-8; a frame cut short by a crash or with a damaged length, and all after it) is never
deleted: a delivery keeps it in `<name>.damaged` (owner-only) and names it in an error log line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from producers.bus.base import Bus

log = logging.getLogger("runbus.spill")

_MAGIC = b"RUNBUS-SPILL 1 "
_FRAME = struct.Struct(">iI")
_SUFFIX = ".spill"
_DELIVERY_CHUNK = 100

Record = tuple[str | None, bytes]


def bus_target(bus: Bus) -> str:
    """What a spill file is meant for: the bus URL and, for Kafka, the topic."""
    topic = getattr(bus, "topic", None)
    return f"{bus.url}#{topic}" if topic else bus.url


def make_private_folder(folder: Path) -> None:
    """Create `folder` (and parents) if missing; a folder this creates is 0700."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)


def _frames(records: Sequence[Record]) -> bytes:
    out = bytearray()
    for key, value in records:
        key_bytes = b"" if key is None else key.encode()
        out += _FRAME.pack(-1 if key is None else len(key_bytes), len(value)) + key_bytes + value
    return bytes(out)


@dataclass
class _Damage:
    """The bytes of a spill file that cannot be delivered: frames whose key is not UTF-8, and the
    rest of the file from a frame whose lengths run past its end (cut short by a crash, or damaged)."""

    data: bytearray
    frames: int = 0  # frames with a key that is not UTF-8
    tail_at: int | None = None  # where the unreadable rest begins

    def __bool__(self) -> bool:
        return bool(self.data)


def _read_frames(stream: IO[bytes]) -> tuple[list[Record], _Damage]:
    records: list[Record] = []
    damage = _Damage(bytearray())
    while True:
        start = stream.tell()
        head = stream.read(_FRAME.size)
        if not head:
            return records, damage
        key_len = value_len = 0
        if len(head) == _FRAME.size:
            key_len, value_len = _FRAME.unpack(head)
        key_bytes = stream.read(max(key_len, 0)) if len(head) == _FRAME.size else b""
        value = stream.read(value_len) if len(head) == _FRAME.size else b""
        if len(head) < _FRAME.size or len(key_bytes) < max(key_len, 0) or len(value) < value_len:
            # cut short by a crash while it was written, or a damaged length: nothing after it can
            # be read as frames, so all of it is kept, undelivered
            stream.seek(start)
            damage.tail_at = start
            damage.data += stream.read()
            return records, damage
        try:
            key = None if key_len < 0 else key_bytes.decode()
        except UnicodeDecodeError:
            damage.frames += 1
            damage.data += head + key_bytes + value
            continue
        records.append((key, value))


def _read_header(stream: IO[bytes]) -> str | None:
    line = stream.readline()
    if not line.startswith(_MAGIC) or not line.endswith(b"\n"):
        return None
    try:
        target = json.loads(line[len(_MAGIC):])
    except ValueError:
        return None
    return target if isinstance(target, str) else None


class SpillFile:
    """One writer's spill file, created on first use and locked for the writer's life.

    Without a folder the records are kept in memory only (and lost when the process ends)."""

    def __init__(self, folder: Path | None, target: str) -> None:
        self.folder = folder
        self.target = target
        self.path: Path | None = None
        self._file: IO[bytes] | None = None
        self._header_len = 0
        self._memory: list[Record] = []
        self.records = 0  # records kept and not delivered since

    def keep(self, records: Sequence[Record]) -> str:
        """Append `records` durably; returns where they are kept."""
        if self.folder is None:
            self._memory.extend(records)
            self.records += len(records)
            return "memory (no spill folder: lost when the process ends)"
        stream = self._open()
        stream.write(_frames(records))
        stream.flush()
        os.fsync(stream.fileno())
        self.records += len(records)
        return str(self.path)

    def _open(self) -> IO[bytes]:
        if self._file is not None:
            return self._file
        assert self.folder is not None
        make_private_folder(self.folder)
        name = f"{os.getpid()}-{uuid.uuid4().hex}"
        temporary = self.folder / f"{name}.tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # before it gets the name deliverers look for
        stream = os.fdopen(fd, "r+b")
        stream.write(_MAGIC + json.dumps(self.target).encode() + b"\n")
        stream.flush()
        self._header_len = stream.tell()
        self.path = self.folder / f"{name}{_SUFFIX}"
        os.replace(temporary, self.path)
        self._file = stream
        return stream

    def redeliver(self, bus: Bus) -> int:
        """Append every kept record to `bus` in order, then forget them; the bus's error otherwise."""
        damage: _Damage | None = None
        if self.folder is None:
            records = list(self._memory)
        elif self._file is None:
            return 0
        else:
            self._file.seek(self._header_len)
            records, damage = _read_frames(self._file)
            self._file.seek(0, os.SEEK_END)
        for start in range(0, len(records), _DELIVERY_CHUNK):
            bus.append(records[start:start + _DELIVERY_CHUNK])
        if self._file is not None:
            if damage:  # never truncate what was not delivered
                assert self.path is not None
                self._file.seek(0)
                header = self._file.read(self._header_len)
                self._file.seek(0, os.SEEK_END)
                if _keep_damaged(self.path, header, damage) is None:
                    raise OSError(f"the undeliverable part of {self.path} cannot be kept aside")
            self._file.truncate(self._header_len)
            self._file.seek(self._header_len)
        self._memory.clear()
        self.records = 0
        return len(records)

    def keep_unencodable(self, record: dict[str, Any], error: str) -> str:
        """Keep an event that does not fit its schema (a bug) as a JSON line, for a person to read."""
        line = json.dumps({"error": error, "event": record}, default=repr) + "\n"
        if self.folder is None:
            log.error("an event that does not fit its schema: %s", line.strip())
            return "the log of runbus.spill (no spill folder)"
        make_private_folder(self.folder)
        path = self.folder / f"unencodable-{os.getpid()}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as stream:
            stream.write(line)
        return str(path)

    def close(self) -> None:
        """Unlock the file (a file with no records left is deleted)."""
        if self._file is None:
            return
        if self.records == 0 and self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self._file.close()  # releases the lock
        self._file = None


@dataclass
class SpillDelivery:
    """What `deliver_spill` did."""

    files: int = 0
    records: int = 0
    skipped: int = 0  # files in use by a live writer, or meant for another bus


def deliver_spill(folder: Path, bus: Bus) -> SpillDelivery:
    """Append the records of every spill file in `folder` meant for `bus` and delete each file.

    Files locked by a live writer, or meant for another bus, are left alone. Raises the bus's
    error (BusRefused when it still refuses); the file being delivered is then kept whole."""
    done = SpillDelivery()
    if not folder.is_dir():
        return done
    target = bus_target(bus)
    for path in sorted(folder.glob(f"*{_SUFFIX}")):
        delivered = _deliver_file(path, bus, target)
        if delivered is None:
            done.skipped += 1
        else:
            done.files += 1
            done.records += delivered
    return done


def _deliver_file(path: Path, bus: Bus, target: str) -> int | None:
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        return None
    except OSError as exc:  # one file that cannot be read must not block the others
        log.error("spill file %s cannot be read (%s); it is kept", path, exc)
        return None
    with stream:
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # its writer is alive, or another process is delivering it
        if os.fstat(stream.fileno()).st_nlink == 0:
            return None  # delivered and deleted while this waited
        if _read_header(stream) != target:
            return None
        header_end = stream.tell()
        try:
            records, damage = _read_frames(stream)
        except (OSError, ValueError) as exc:  # one file that cannot be read must not block the others
            log.error("spill file %s cannot be read (%s); it is kept", path, exc)
            return None
        for start in range(0, len(records), _DELIVERY_CHUNK):
            bus.append(records[start:start + _DELIVERY_CHUNK])
        if damage:
            # never delete what was not delivered: keep it, with the header, for a person to look at
            stream.seek(0)
            kept = _keep_damaged(path, stream.read(header_end), damage)
            if kept is None:
                return None  # the file stays whole; a later delivery repeats (the projector skips duplicates)
        path.unlink()
        log.warning("delivered %d bus records kept in %s to %s", len(records), path, target)
        return len(records)


def _keep_damaged(path: Path, header: bytes, damage: _Damage) -> Path | None:
    """Write the undeliverable bytes of spill file `path` to `<name>.damaged` (owner-only)."""
    damaged = path.with_suffix(".damaged")
    what = []
    if damage.frames:
        what.append(f"{damage.frames} frame(s) whose key is not UTF-8")
    if damage.tail_at is not None:
        what.append(f"a frame at byte {damage.tail_at} that runs past the end of the file (cut short or "
                    f"damaged) and everything after it")
    try:
        fd = os.open(damaged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(header + bytes(damage.data))
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        log.error("spill file %s holds %d bytes that cannot be delivered (%s) and they cannot be kept in %s "
                  "(%s): the file is kept whole", path, len(damage.data), "; ".join(what), damaged, exc)
        return None
    log.error("spill file %s holds %d bytes that cannot be delivered (%s): they are kept in %s",
              path, len(damage.data), "; ".join(what), damaged)
    return damaged
