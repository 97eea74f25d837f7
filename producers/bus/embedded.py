"""Embedded bus: one SQLite file in WAL mode that many processes append to at once."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from producers.bus.base import Bus, BusError, BusRecord, BusRefused

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    pos   INTEGER PRIMARY KEY,  -- offset + 1 (SQLite rowids start at 1)
    key   TEXT,
    value BLOB NOT NULL,
    ts    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS committed (
    grp TEXT NOT NULL, part INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, part)
);
"""
_POLL_S = 0.05
# SQLite primary result codes that retrying cannot fix: the file is read-only or immutable, cannot
# be opened, is not a database, or the record is larger than SQLite allows
_REFUSALS = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH,
             sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


class EmbeddedBus(Bus):
    """A single-partition log at `path`. Writers are serialised by SQLite, so offsets only grow.

    A log this creates is readable by its owner only (0600 in a new 0700 folder); SQLite gives its
    -wal and -shm files the same mode."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.url = f"sqlite://{self.path}"
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._woken = threading.Event()  # set by `wake`: a waiting `read` looks again at once
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self._conn().executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise self._failure("open the log", exc) from exc

    def _failure(self, what: str, exc: BaseException) -> BusError:
        """`exc` as BusRefused when retrying cannot help (see _REFUSALS), else as BusError; names the file."""
        code = getattr(exc, "sqlite_errorcode", None)
        refused = isinstance(exc, PermissionError) or (code is not None and code & 0xFF in _REFUSALS)
        kind = BusRefused if refused else BusError
        return kind(f"embedded log {self.path}: cannot {what}: {type(exc).__name__}: {exc}")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self._busy_ms / 1000, isolation_level=None)
            self._use_wal(conn)
            # NORMAL: a committed append survives a process crash; only an OS crash can lose it.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Put the log in WAL mode (kept by the file). On a new file, connections of processes
        starting together (Dask workers) race to switch it, and SQLite answers the losers "database
        is locked" at once, without waiting its busy timeout: they try again until it has passed."""
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", None)
                if code is None or code & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(0.005)

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        if not records:
            return
        try:
            self._append(records)
        except (sqlite3.Error, OSError) as exc:
            raise self._failure(f"append {len(records)} records", exc) from exc

    def _append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO log (key, value, ts) VALUES (?, ?, ?)",
                             [(key, value, now) for key, value in records])
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # the append's own error is the one to report
                conn.execute("ROLLBACK")
            raise

    def partitions(self) -> list[int]:
        return [0]

    def end_offsets(self) -> dict[int, int]:
        (last,) = self._conn().execute("SELECT coalesce(max(pos), 0) FROM log").fetchone()
        return {0: last}

    def read(self, positions: Mapping[int, int], max_records: int = 10_000,
             timeout: float = 0.0) -> list[BusRecord]:
        start = positions.get(0, 0)
        deadline = time.monotonic() + timeout
        # a wake that came while no read waited is not cleared here: it may be a stopping caller's,
        # which must end this read at once (a leftover one only makes a read return early, empty)
        woken = False
        while True:
            rows = self._conn().execute(
                "SELECT pos, key, value, ts FROM log WHERE pos > ? ORDER BY pos LIMIT ?",
                (start, max_records)).fetchall()
            if rows or woken or time.monotonic() >= deadline:
                return [BusRecord(0, pos - 1, key, value, ts) for pos, key, value, ts in rows]
            # another process's appends tell this one nothing: look again after _POLL_S, or at once
            # when woken, and then return what that look found (the caller may be stopping)
            woken = self._woken.wait(min(_POLL_S, max(0.0, deadline - time.monotonic())))
            if woken:
                self._woken.clear()

    def wake(self) -> None:
        self._woken.set()

    def commit(self, group: str, positions: Mapping[int, int]) -> None:
        self._conn().executemany(
            "INSERT INTO committed VALUES (?, ?, ?) ON CONFLICT (grp, part) "
            "DO UPDATE SET next_offset = excluded.next_offset",
            [(group, part, offset) for part, offset in positions.items()])

    def committed(self, group: str) -> dict[int, int]:
        rows = self._conn().execute("SELECT part, next_offset FROM committed WHERE grp = ?", (group,))
        return dict(rows.fetchall())

    def epoch(self) -> str:
        """Changes each time records are rewritten (`blank_records`); "" for a log never rewritten.
        A consumer that folded records stores it and starts over when it changes."""
        try:
            row = self._conn().execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a log made before epochs, opened where it cannot be changed
                return ""
            raise self._failure("read the epoch", exc) from exc
        return row[0] if row else ""

    def blank_records(self, keys: Collection[str], filler: bytes, offsets: Collection[int] = ()) -> int:
        """Rewrite every record whose key is in `keys` (records are keyed by their run's uid), and
        those at `offsets` (where a consumer found events of those runs under another key), as
        `filler` with no key, in one transaction that also changes the `epoch`; returns how many.

        Offsets stay as they were (a deleted last record would let the next append reuse its
        offset and consumers skip it), so `filler` should be a record consumers read as nothing
        (an empty batch: EventCodec().encode_batch([])). The old bytes are overwritten on disk
        (secure_delete, then the WAL is checkpointed and the file vacuumed, as far as other
        connections allow)."""
        wanted = sorted(set(keys))
        try:
            conn = self._conn()
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS purged_keys (key TEXT PRIMARY KEY)")
                conn.execute("DELETE FROM purged_keys")
                conn.executemany("INSERT INTO purged_keys VALUES (?)", [(key,) for key in wanted])
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS purged_offsets (pos INTEGER PRIMARY KEY)")
                conn.execute("DELETE FROM purged_offsets")
                conn.executemany("INSERT OR IGNORE INTO purged_offsets VALUES (?)",
                                 [(int(offset) + 1,) for offset in offsets])
                changed = conn.execute("UPDATE log SET key = NULL, value = ? WHERE key IN "
                                       "(SELECT key FROM purged_keys) OR pos IN (SELECT pos FROM purged_offsets)",
                                       (filler,)).rowcount
                conn.execute("INSERT INTO meta VALUES ('epoch', ?) ON CONFLICT (key) DO UPDATE "
                             "SET value = excluded.value", (uuid.uuid4().hex,))
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            with contextlib.suppress(sqlite3.OperationalError):  # busy: another connection reads
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.execute("VACUUM")
            conn.execute("PRAGMA secure_delete=OFF")  # appends on this connection free nothing
        except (sqlite3.Error, OSError) as exc:
            raise self._failure(f"rewrite the records of {len(wanted)} keys", exc) from exc
        return changed

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
