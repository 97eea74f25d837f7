"""Where a past state of the projection ends: `as_of`, an events.position or a time."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any


def cutoff(as_of: int | datetime | date | str) -> tuple[str, list[Any]]:
    """(SQL condition on `events`, its arguments) selecting the events up to `as_of`: an
    events.position (an int, or its digits as text) or a time (a datetime, a date or ISO 8601
    text; without a zone it is UTC). TypeError for a bool, ValueError for anything else."""
    if isinstance(as_of, bool):
        raise TypeError("as_of must be an events.position (int) or a time")
    if isinstance(as_of, int):
        return "position <= ?", [as_of]
    if isinstance(as_of, str) and as_of.strip().lstrip("-").isdigit():
        return "position <= ?", [int(as_of)]
    moment = _moment(as_of)
    if moment is None:
        raise ValueError(f"as_of {as_of!r} is neither an events.position nor a time")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return "ts <= ?::TIMESTAMPTZ", [moment.isoformat()]


def _moment(as_of: Any) -> datetime | None:
    if isinstance(as_of, datetime):  # pandas' Timestamp too
        return as_of
    if isinstance(as_of, date):
        return datetime(as_of.year, as_of.month, as_of.day)
    if isinstance(as_of, str):
        try:
            return datetime.fromisoformat(as_of.strip())
        except ValueError:
            return None
    return None
