"""Opening the projection file.

DuckDB lets one process hold a file and refuses all others, readers included. Every Runbus
process therefore takes a file lock before it opens the file, and holds both only for a short unit
of work (catch up, query). So that a burst of queries in one process does not pay for an open each
time, the file stays open for a linger time (0.25 s; `configure`) after its last use, then is
closed and unlocked. Another process waits its turn, up to a timeout, instead of failing.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from filelock import FileLock, Timeout

_linger_s = 0.25


def configure(linger_s: float) -> None:
    """Set how long a projection stays open after its last use in this process (0: close at once)."""
    global _linger_s
    _linger_s = linger_s


class ProjectionBusy(RuntimeError):
    """Another process held the projection for longer than the timeout."""


class _Handle:
    """One process's hold on a projection file: the lock, the connection, the idle timer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = FileLock(str(path) + ".lock", thread_local=False)
        self.use = threading.RLock()  # one thread at a time on the connection
        self.con: duckdb.DuckDBPyConnection | None = None
        self.timer: threading.Timer | None = None
        self.prepared = False  # the owner (the projector) checked the tables on this connection

    def open(self, timeout_s: float) -> duckdb.DuckDBPyConnection:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.con is None:
            try:
                self.lock.acquire(timeout=timeout_s)
            except Timeout:
                raise ProjectionBusy(
                    f"the projection {str(self.path)!r} was held by another process for more than "
                    f"{timeout_s:g}s (a long rebuild, or a process that does not release it); "
                    f"set RUNBUS_DB_TIMEOUT to wait longer") from None
            try:
                self.con = duckdb.connect(str(self.path))
            except BaseException:
                self.lock.release()
                raise
            self.prepared = False
        return self.con

    def release_later(self, linger_s: float) -> None:
        if linger_s <= 0:
            self.close()
            return
        self.timer = threading.Timer(linger_s, self._close_when_idle)
        self.timer.daemon = True
        self.timer.start()

    def _close_when_idle(self) -> None:
        if self.use.acquire(blocking=False):
            try:
                self.close()
            finally:
                self.use.release()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.con is not None:
            self.con.close()
            self.con = None
            self.lock.release()


_handles: dict[Path, _Handle] = {}
_handles_lock = threading.Lock()


def _handle(path: Path) -> _Handle:
    with _handles_lock:
        found = _handles.get(path)
        if found is None:
            found = _handles[path] = _Handle(path)
        return found


@contextmanager
def open_projection(path: str | os.PathLike[str], timeout_s: float = 60.0,
                    linger_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """Lock and open the DuckDB file for the block; it is closed and unlocked once idle."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    linger = _linger_s if linger_s is None else linger_s
    handle = _handle(path)
    with handle.use:
        con = handle.open(timeout_s)
        try:
            yield con
        except BaseException:
            handle.close()  # a failed unit of work leaves nothing half-open behind
            raise
        handle.release_later(linger)


def connection_is_prepared(con: duckdb.DuckDBPyConnection) -> bool:
    """True when the projector already checked the tables on this (reused) connection."""
    return any(h.con is con and h.prepared for h in list(_handles.values()))


def mark_prepared(con: duckdb.DuckDBPyConnection) -> None:
    for handle in list(_handles.values()):
        if handle.con is con:
            handle.prepared = True


def close_all() -> None:
    """Close every projection this process holds (at exit, or before another opens it)."""
    for handle in list(_handles.values()):
        with handle.use:
            handle.close()


atexit.register(close_all)
