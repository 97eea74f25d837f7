"""The projection as the UI server reads it.

`ServedRunDB` is what `runbus ui` uses: every read is a session of the home's projection service
(RUNBUS_PROJECTION=service), or (inprocess) the file locked, opened and folded for the request and
released after the linger time, as any in-process reader does. The UI holds no file either way.
`HeldRunDB` reads a connection the caller holds (tests that serve the app in their own process).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

import duckdb

from engine.bootstrap import Services
from projections import Projector, RunDB
from projections.database import connection_is_prepared
from projections.query import SnapshotSource, seal


class ServedRunDB(RunDB):
    """A RunDB over `svc`'s home whose reads are answered by `source` (the projection service's
    client), or by this process folding the file per request when `source` is None."""

    def __init__(self, svc: Services, source: SnapshotSource | None, as_of: int | datetime | str | None = None,
                 *, readable_dirs: Sequence[str] = ()) -> None:
        super().__init__(svc.bus, svc.settings.db_path, svc.codec, svc.settings.db_timeout_s,
                         svc.user_projections, as_of, source=source, readable_dirs=readable_dirs)
        self.services = svc

    def at(self, as_of: int | datetime | str | None) -> ServedRunDB:
        """The same reads, answered as of an events.position or a time (None: now)."""
        return ServedRunDB(self.services, self.source, as_of, readable_dirs=self.readable_dirs)


class HeldRunDB(RunDB):
    """A RunDB over a connection the caller keeps open; every read folds new events first.

    The database is sealed once the projector has prepared it: SQL reads no file outside
    `readable_dirs` (none unless the user opted in), writes none, changes no setting.

    A Projector remembers the positions it last read or wrote on its connection, so two folding
    one connection would each fold what the other did again (a dead letter twice). A connection
    from `open_projection` is shared with every in-process reader of the file, each with a
    Projector of its own: each read here folds with a new Projector, which reads the positions
    afresh (on a prepared connection it is made without a statement). A connection of the caller's
    own is folded by one Projector, shared by every `at()` of this store.
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

    def _folding(self) -> Projector:
        """The Projector of this read (see the class doc)."""
        if connection_is_prepared(self._con):
            return Projector(self.services.bus, self._con, self.services.codec,
                             user_projections=self.services.user_projections)
        return self._held_projector

    @contextmanager
    def _live(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            self._folding().catch_up()
            yield self._con

    def catch_up(self) -> int:
        with self._lock:
            return self._folding().catch_up()


UIStore = ServedRunDB | HeldRunDB
"""What the UI app reads: either store answers `reader()`, `answer()`, `at()`, `sql()`, `log_lines()`, `catch_up()`."""
