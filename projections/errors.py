"""The read side's errors, and how they cross a process boundary.

A reader of the projection service gets the same exception classes a local query raises: the
service sends {"error": <one line>, "type": <class name>} and `error_from_payload` rebuilds the
exception from a fixed allow-list of classes (anything else becomes a RuntimeError), never by
unpickling.
"""

from __future__ import annotations

import builtins
import json
from typing import Any

import duckdb

from projections.database import ProjectionBusy

_BUILTIN_ERRORS = ("ValueError", "KeyError", "TypeError", "LookupError", "RuntimeError", "PermissionError")


class ReadOnlyError(ValueError):
    """A statement that would change the projection or touch a file."""


class QueryTimeout(ValueError):
    """A user statement ran longer than its bound and was interrupted."""


class ServiceRefused(ProjectionBusy):
    """The projection service serving the home cannot answer this reader as it asks, for as long as
    it runs (the directories its SQL may read are fixed when it starts): the message names the
    service and what to do. A reader shows it as it shows a busy projection (the UI: 503)."""


def error_payload(exc: BaseException) -> dict[str, str]:
    """What a server sends for a failed request: the one-line message and the class's name."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return {"error": str(message), "type": type(exc).__name__}


def error_from_payload(data: bytes | str | dict[str, Any]) -> Exception:
    """The exception an `error_payload` describes (a RuntimeError quoting anything else)."""
    try:
        payload = data if isinstance(data, dict) else json.loads(data)
        name, message = str(payload["type"]), str(payload["error"])
    except (ValueError, KeyError, TypeError):
        return RuntimeError(f"the projection service answered: {str(data)[:200]}")
    return _error_class(name)(message)


def _error_class(name: str) -> type[Exception]:
    known: dict[str, type[Exception]] = {"ReadOnlyError": ReadOnlyError, "ProjectionBusy": ProjectionBusy,
                                         "QueryTimeout": QueryTimeout, "ServiceRefused": ServiceRefused}
    known.update({n: getattr(builtins, n) for n in _BUILTIN_ERRORS})
    if name in known:
        return known[name]
    found = getattr(duckdb, name, None)
    if isinstance(found, type) and issubclass(found, duckdb.Error):
        return found
    return RuntimeError
