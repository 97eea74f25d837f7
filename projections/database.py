"""Opening the projection file.

DuckDB lets one process hold a file and refuses all others, readers included. Every Runbus
process therefore takes a file lock before it opens the file, and holds both only for a short unit
of work (catch up, query). So that a burst of queries in one process does not pay for an open each
time, the file stays open for a linger time (0.25 s; `configure`) after its last use, then is
closed and unlocked. Another process waits its turn, up to a timeout, instead of failing.

The file is only a cache of the log. One that DuckDB cannot read (truncated, corrupt, written by
an incompatible version) is renamed aside with a timestamp, its .wal with it, and a new one is
created, to be folded again from the log; a warning line says so. Corruption found when the file
is opened is repaired at once; corruption found later (in a data block) fails that unit of work
and the file is moved aside for the next one.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from filelock import FileLock, Timeout

_linger_s = 0.25
_fallback_interval_s = 5.0
_log = logging.getLogger("runbus.projection")
# What DuckDB says about a file it cannot read (it has no exception class of its own for this).
_HELD_BY_ANOTHER = "Could not set lock on file"  # DuckDB's lock, held by another process
_UNREADABLE = ("not a valid DuckDB database file", "Could not read enough bytes", "Corrupt database file",
               "checksum", "replaying WAL", "version number")


def configure(linger_s: float, heartbeat_interval_s: float | None = None) -> None:
    """Set how long a projection stays open after its last use in this process (0: close at once)
    and the heartbeat interval assumed for runs that recorded none."""
    global _linger_s, _fallback_interval_s
    _linger_s = linger_s
    if heartbeat_interval_s is not None:
        _fallback_interval_s = heartbeat_interval_s


def fallback_heartbeat_interval_s() -> float:
    """The heartbeat interval assumed for runs that recorded none (RUNBUS_HEARTBEAT_INTERVAL)."""
    return _fallback_interval_s


_USER_STATEMENT = "_runbus_user_statement"
# Damage found while reading a block surfaces as DuckDB's generic Error or an IOException; the other
# kinds a user's statement can raise carry a message of the user's choosing (error(), casts).
_STORAGE_ERRORS = (duckdb.Error, duckdb.IOException)


def from_user_statement(exc: BaseException) -> BaseException:
    """Mark `exc`, raised by a user's SQL statement, as never counting as damage to the file unless
    it is of a kind only storage raises: `SELECT error('Corrupt database file')` moves nothing aside,
    a checksum failure in a block the statement read still does."""
    if type(exc) not in _STORAGE_ERRORS:
        setattr(exc, _USER_STATEMENT, True)
    return exc


def is_unreadable(exc: BaseException) -> bool:
    """True for DuckDB's errors about a damaged or foreign file (not locks or permissions), as
    found by Runbus's own work on the file, not by a user's statement."""
    return (isinstance(exc, duckdb.Error) and not getattr(exc, _USER_STATEMENT, False)
            and any(sign in str(exc) for sign in _UNREADABLE))


def move_aside(path: Path, exc: BaseException) -> Path:
    """Rename a damaged projection (and its .wal) with a timestamp; returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}-{os.getpid()}")
    os.replace(path, aside)
    wal = wal_path(path)
    if wal.exists():
        os.replace(wal, wal_path(aside))
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    _log.warning("runbus: the projection %s could not be read (%s); moved it to %s, a new one is "
                 "folded from the log", path, reason, aside)
    return aside


# DuckDB's checkpoint merges adjacent partly filled row groups ("vacuum") by building the merged
# ones whole in memory: folding 1M events, every third automatic checkpoint merged three row groups
# of ~80,000 events into two and the projection service's RSS jumped by ~100 MB (379 MB peak; 300
# without merging). How much a merge holds grows with the events' payloads, so no memory_limit
# bounds it (and the service has no temp directory to spill to). Row groups are therefore never
# merged, and a connection does not checkpoint when it closes: a session's few appends wait in the
# WAL for the next automatic checkpoint (every 16 MB of WAL) instead of each closing session writing
# row groups of their own (200 sessions: 200 row groups and a file 28x larger, without merging).
STORAGE_SETTINGS = ("SET max_vacuum_tasks = 0", "PRAGMA disable_checkpoint_on_shutdown")


def _connect(path: Path) -> duckdb.DuckDBPyConnection:
    """Open the file (readable by its owner only) with STORAGE_SETTINGS, reading its catalog and
    bookkeeping; a file DuckDB cannot read is moved aside and a new one opened."""
    con = _connect_or_move_aside(path)
    if not _sealed(con):  # else an instance still open in this process: it has them, and takes no setting
        for setting in STORAGE_SETTINGS:
            con.execute(setting)
    for made in (path, wal_path(path)):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(made, 0o600)
    return con


def _connect_when_free(path: Path, timeout_s: float) -> duckdb.DuckDBPyConnection:
    """`_connect`, tried again while another process holds DuckDB's lock on the file, for
    `timeout_s` at most (then DuckDB's error)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _connect(path)
        except duckdb.IOException as exc:
            if _HELD_BY_ANOTHER not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def _sealed(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the instance behind `con` takes no setting any more (readonly.seal)."""
    return con.execute("SELECT current_setting('lock_configuration')").fetchone() == (True,)


def _connect_or_move_aside(path: Path) -> duckdb.DuckDBPyConnection:
    try:
        con = duckdb.connect(str(path))
    except duckdb.Error as exc:
        if not is_unreadable(exc) or not path.exists():
            raise
        move_aside(path, exc)
        return duckdb.connect(str(path))
    try:
        tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        for table in ("projection_meta", "positions"):
            if table in tables:
                con.execute(f"SELECT * FROM {table}").fetchall()
    except duckdb.Error as exc:
        con.close()
        if not is_unreadable(exc):
            raise
        move_aside(path, exc)
        return duckdb.connect(str(path))
    return con


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
                self.con = _connect(self.path)
            except BaseException:
                self.lock.release()
                raise
            self.prepared = False
        return self.con

    def reconnect(self, timeout_s: float) -> tuple[duckdb.DuckDBPyConnection, bool]:
        """Close the connection (and its cursors) and open the file again, keeping the lock: (the
        new connection, whether it is of a new DuckDB instance). Nothing is checkpointed: what the
        WAL holds is read back from it. The instance is the old one when another connection to the
        file is open in this process (DuckDB hands its cached instance back). The caller holds the
        connection's only user. Between the close and the open, a process that opens the file with
        DuckDB directly (not through Runbus's lock) can take DuckDB's own: see `_connect_when_free`.
        When the file cannot be opened again the lock is released."""
        assert self.con is not None
        self.con.close()
        self.con = None
        try:
            self.con = _connect_when_free(self.path, timeout_s)
        except BaseException:
            self.lock.release()
            raise
        renewed = not _sealed(self.con)  # the service seals its connection: a new instance is not yet
        self.prepared = self.prepared and not renewed
        return self.con, renewed

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
        except BaseException as exc:
            handle.close()  # a failed unit of work leaves nothing half-open behind
            if is_unreadable(exc) and path.exists():
                move_aside(path, exc)  # damage in a data block: the next unit of work rebuilds
            raise
        handle.release_later(linger)


def reopen_projection(con: duckdb.DuckDBPyConnection, timeout_s: float) -> tuple[duckdb.DuckDBPyConnection, bool]:
    """Open again the projection file `con` (from `open_projection`) is open on, closing `con`: the
    new connection, which the block of `open_projection` closes, and whether it is of a new DuckDB
    instance (see `_Handle.reconnect`, which also says what a failure leaves)."""
    for handle in list(_handles.values()):
        if handle.con is con:
            return handle.reconnect(timeout_s)
    raise ValueError("not a connection open_projection opened")


def discard_projection(path: str | os.PathLike[str], timeout_s: float = 60.0) -> None:
    """Close this process's hold on the projection file and, under its lock, delete it and its
    WAL: the next open folds the log from the start. (DuckDB keeps freed pages' old bytes, so
    rebuilding in place would leave removed values on disk.)"""
    path = Path(path).resolve()
    handle = _handle(path)
    with handle.use:
        handle.close()
        try:
            handle.lock.acquire(timeout=timeout_s)
        except Timeout:
            raise ProjectionBusy(f"the projection {str(path)!r} was held by another process for more than "
                                 f"{timeout_s:g}s; it was not discarded") from None
        try:
            remove_projection_files(path)
        finally:
            handle.lock.release()


def wal_path(path: str | os.PathLike[str]) -> Path:
    """The DuckDB write-ahead log of the projection file `path`."""
    path = Path(path)
    return path.with_name(path.name + ".wal")


def remove_projection_files(path: str | os.PathLike[str]) -> None:
    """Delete the projection file and its WAL (the caller holds whatever keeps others off them)."""
    path = Path(path)
    for stale in (path, wal_path(path)):
        stale.unlink(missing_ok=True)


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
