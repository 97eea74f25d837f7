"""The projection as the UI server reads it.

`ServedRunDB` is what `runbus ui` uses with RUNBUS_PROJECTION=service: every read is a session of
the home's projection service, which the UI shares with every other reader (it holds no file).
`HeldRunDB` reads a connection this process holds itself (RUNBUS_PROJECTION=inprocess, tests).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

import duckdb

from engine.bootstrap import Services
from projections import Projector, RunDB
from projections.query import SnapshotSource, seal
from projections.remote import RemoteProjection


class ServedRunDB(RunDB):
    """A RunDB whose every read is answered by `source` (the projection service's client)."""

    def __init__(self, svc: Services, source: SnapshotSource, as_of: int | datetime | str | None = None) -> None:
        super().__init__(svc.bus, svc.settings.db_path, svc.codec, svc.settings.db_timeout_s,
                         svc.user_projections, as_of, source=source)
        self.services = svc

    def at(self, as_of: int | datetime | str | None) -> ServedRunDB:
        """The same service, answering as of an events.position or a time (None: now)."""
        assert self.source is not None
        return ServedRunDB(self.services, self.source, as_of)


class HeldRunDB(RunDB):
    """A RunDB over a connection this process keeps open; every read folds new events first.

    The database is sealed once the projector has prepared it: SQL reads no file outside
    `readable_dirs` (none unless the user opted in), writes none, changes no setting.
    """

    def __init__(self, svc: Services, con: duckdb.DuckDBPyConnection,
                 as_of: int | datetime | str | None = None, *, readable_dirs: Sequence[str] = (),
                 _shared: HeldRunDB | None = None) -> None:
        super().__init__(svc.bus, svc.settings.db_path, svc.codec, svc.settings.db_timeout_s,
                         svc.user_projections, as_of)
        self.services = svc
        self._con = con
        self._lock = _shared._lock if _shared else threading.RLock()
        self._held_projector = _shared._held_projector if _shared else Projector(
            svc.bus, con, svc.codec, user_projections=svc.user_projections)
        if _shared is None:
            seal(con, readable_dirs)

    def at(self, as_of: int | datetime | str | None) -> HeldRunDB:
        """The same held file, answering as of an events.position or a time (None: now)."""
        return HeldRunDB(self.services, self._con, as_of, _shared=self)

    def _server(self) -> RemoteProjection | None:
        return None  # this process is the server

    @contextmanager
    def _live(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            self._held_projector.catch_up()
            yield self._con

    def catch_up(self) -> int:
        with self._lock:
            return self._held_projector.catch_up()


UIStore = ServedRunDB | HeldRunDB
"""What the UI app reads: either store answers `reader()`, `at()`, `sql()`, `log_lines()`, `catch_up()`."""
