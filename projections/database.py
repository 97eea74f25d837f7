"""Opening the projection file. DuckDB lets one process hold a file and refuses all others, so
every Runbus process takes a file lock first and holds the file only for one short unit of work
(catch up, query, close); a second process waits its turn up to a timeout instead of failing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from filelock import FileLock, Timeout


class ProjectionBusy(RuntimeError):
    """Another process held the projection for longer than the timeout."""


@contextmanager
def open_projection(path: str | os.PathLike[str], timeout_s: float = 60.0,
                    read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Lock and open the DuckDB file; closes and unlocks on exit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise ProjectionBusy(
            f"the projection {str(path)!r} was held by another process for more than {timeout_s:g}s "
            f"(a long rebuild or a follower that does not release it); set RUNBUS_DB_TIMEOUT "
            f"to wait longer") from None
    try:
        con = duckdb.connect(str(path), read_only=read_only)
        try:
            yield con
        finally:
            con.close()
    finally:
        lock.release()
