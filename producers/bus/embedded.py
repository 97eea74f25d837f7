"""Embedded bus: one SQLite file in WAL mode that many processes append to at once."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from producers.bus.base import Bus, BusRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    pos   INTEGER PRIMARY KEY,  -- offset + 1 (SQLite rowids start at 1)
    key   TEXT,
    value BLOB NOT NULL,
    ts    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS committed (
    grp TEXT NOT NULL, part INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, part)
);
"""
_POLL_S = 0.05


class EmbeddedBus(Bus):
    """A single-partition log at `path`. Writers are serialised by SQLite, so offsets only grow."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"sqlite://{self.path}"
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self._busy_ms / 1000, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a committed append survives a process crash; only an OS crash can lose it.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        if not records:
            return
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO log (key, value, ts) VALUES (?, ?, ?)",
                             [(key, value, now) for key, value in records])
            conn.execute("COMMIT")
        except BaseException:
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
        while True:
            rows = self._conn().execute(
                "SELECT pos, key, value, ts FROM log WHERE pos > ? ORDER BY pos LIMIT ?",
                (start, max_records)).fetchall()
            if rows or time.monotonic() >= deadline:
                return [BusRecord(0, pos - 1, key, value, ts) for pos, key, value, ts in rows]
            time.sleep(_POLL_S)

    def commit(self, group: str, positions: Mapping[int, int]) -> None:
        self._conn().executemany(
            "INSERT INTO committed VALUES (?, ?, ?) ON CONFLICT (grp, part) "
            "DO UPDATE SET next_offset = excluded.next_offset",
            [(group, part, offset) for part, offset in positions.items()])

    def committed(self, group: str) -> dict[int, int]:
        rows = self._conn().execute("SELECT part, next_offset FROM committed WHERE grp = ?", (group,))
        return dict(rows.fetchall())

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
