"""Routing reads to the UI server while it holds the projection file.

`runbus ui` keeps the DuckDB file open for as long as it runs and announces itself in `ui.json`
beside the file (host, port, pid). A `RunDB` in another process that finds a live announcement (the
pid exists and the port accepts connections) sends each query to the server's `POST /api/sql`
instead of waiting for the file lock, with the server's per-instance access token, which the server
keeps beside ui.json in `ui.token`, readable by its owner only. Frames travel as Arrow IPC streams
with pandas metadata, so they arrive with the dtypes a local query gives; errors arrive as the same
exception classes.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import socket
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

ANNOUNCEMENT = "ui.json"
TOKEN_FILE = "ui.token"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
_BUILTIN_ERRORS = ("ValueError", "KeyError", "TypeError", "LookupError", "RuntimeError", "PermissionError")


def announcement_path(db_path: str | os.PathLike[str]) -> Path:
    return Path(db_path).resolve().parent / ANNOUNCEMENT


def announce(db_path: str | os.PathLike[str], host: str, port: int) -> Path:
    """Write ui.json (atomically) naming this process as the server of the projection."""
    path = announcement_path(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{ANNOUNCEMENT}.{os.getpid()}")
    tmp.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid(),
                               "db_path": str(Path(db_path).resolve())}))
    os.replace(tmp, path)
    return path


def token_path(db_path: str | os.PathLike[str]) -> Path:
    return announcement_path(db_path).with_name(TOKEN_FILE)


def write_token(db_path: str | os.PathLike[str], token: str) -> Path:
    """Keep the server's access token beside ui.json in a file only its owner can read."""
    path = token_path(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode on O_CREAT
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_token(db_path: str | os.PathLike[str]) -> str | None:
    """The announced server's access token, or None when there is none this user may read."""
    try:
        return token_path(db_path).read_text().strip() or None
    except OSError:
        return None


def withdraw(db_path: str | os.PathLike[str]) -> None:
    """Remove ui.json (and the token file) if ui.json still names this process."""
    path = announcement_path(db_path)
    found = _read(path)
    if found is not None and found.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
        token_path(db_path).unlink(missing_ok=True)


def find_server(db_path: str | os.PathLike[str], timeout_s: float = 60.0) -> RemoteProjection | None:
    """The announced UI server if its process is alive and its port accepts; None otherwise
    (also in the server's own process, which reads the file directly)."""
    found = _read(announcement_path(db_path))
    if found is None:
        return None
    try:
        pid, host, port = int(found["pid"]), _client_host(str(found["host"])), int(found["port"])
    except (KeyError, TypeError, ValueError):
        return None
    if pid == os.getpid() or not _alive(pid) or not _accepts(host, port):
        return None
    return RemoteProjection(host, port, timeout_s, read_token(db_path))


class RemoteProjection:
    """The query side of a UI server's JSON API; `token` is the server's access token."""

    def __init__(self, host: str, port: int, timeout_s: float = 60.0, token: str | None = None) -> None:
        self.url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        self.timeout_s = timeout_s
        self.token = token

    def query(self, sql: str, params: Any = None, as_of: int | datetime | str | None = None) -> pd.DataFrame:
        """Run one read-only query on the server; returns the frame a local query would."""
        body = {"sql": sql, "params": list(params or []), "as_of": as_of}
        return arrow_to_frame(self._post("/api/sql", body, ARROW_STREAM))

    def catch_up(self) -> int:
        return int(json.loads(self._post("/api/catch_up", {}, "application/json"))["applied"])

    def _post(self, route: str, body: dict[str, Any], accept: str) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": accept}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.url + route, data=json.dumps(body, default=_plain).encode(), method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise error_from_payload(exc.read()) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            from projections.database import ProjectionBusy

            raise ProjectionBusy(f"the UI server at {self.url}, which holds the projection, did not "
                                 f"answer within {self.timeout_s:g}s ({exc}); set RUNBUS_DB_TIMEOUT "
                                 f"to wait longer") from None


def frame_to_arrow(frame: pd.DataFrame) -> bytes:
    """A DataFrame as an Arrow IPC stream (pandas metadata included)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def arrow_to_frame(data: bytes) -> pd.DataFrame:
    return pa.ipc.open_stream(data).read_all().to_pandas()


def error_payload(exc: BaseException) -> dict[str, str]:
    """What the server sends for a failed query; `error_from_payload` rebuilds the exception."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return {"error": str(message), "type": type(exc).__name__}


def error_from_payload(data: bytes) -> Exception:
    try:
        payload = json.loads(data)
        name, message = str(payload["type"]), str(payload["error"])
    except (ValueError, KeyError, TypeError):
        return RuntimeError(f"the UI server answered: {data[:200]!r}")
    return _error_class(name)(message)


def _error_class(name: str) -> type[Exception]:
    from projections.database import ProjectionBusy
    from projections.query import QueryTimeout, ReadOnlyError

    known: dict[str, type[Exception]] = {"ReadOnlyError": ReadOnlyError, "ProjectionBusy": ProjectionBusy,
                                         "QueryTimeout": QueryTimeout}
    known.update({n: getattr(builtins, n) for n in _BUILTIN_ERRORS})
    if name in known:
        return known[name]
    found = getattr(duckdb, name, None)
    if isinstance(found, type) and issubclass(found, duckdb.Error):
        return found
    return RuntimeError


def _plain(value: Any) -> Any:
    """JSON for query parameters: numpy scalars as numbers, anything else (times) as text."""
    return value.item() if hasattr(value, "item") else str(value)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _client_host(host: str) -> str:
    # a server bound to every interface is reached on loopback
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False
