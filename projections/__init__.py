"""Projections: consumers that fold events into DuckDB tables, and the query API over them."""

from projections.database import ProjectionBusy, open_projection
from projections.projector import Progress, Projector
from projections.query import ReadOnlyError, RunDB, check_read_only

__all__ = ["Progress", "ProjectionBusy", "Projector", "ReadOnlyError", "RunDB", "check_read_only",
           "open_projection"]
