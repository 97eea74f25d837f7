"""User-defined projections: a fold over events into the user's own DuckDB tables.

The projector calls `apply` inside the same transaction as its own rows and positions, so a user
projection is exactly-once too. A projection whose `version` differs from the one the file was
built with is dropped and rebuilt from the `events` table.

`apply` receives only events the projector applies (never duplicates, conflicts or dead letters).
An event for which `apply` raises is quarantined like any event that cannot be folded: it goes to
`dead_letters` with the error and the rest of the batch is applied (a rebuild after a fix folds it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import duckdb

from schemas import Event


class UserProjection(ABC):
    """Subclass with a unique `name`, bump `version` when the tables change shape."""

    name: str = ""
    version: int = 1

    @abstractmethod
    def create(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create the projection's tables (IF NOT EXISTS)."""

    @abstractmethod
    def drop(self, con: duckdb.DuckDBPyConnection) -> None:
        """Drop the projection's tables."""

    @abstractmethod
    def apply(self, con: duckdb.DuckDBPyConnection, events: Sequence[Event]) -> None:
        """Fold new events (in log order, each once) into the tables."""
