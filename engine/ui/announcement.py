"""Where a running `runbus ui` says it is: `ui.json` (host, port, pid) and its access token in
`ui.token` (owner-only), both in RUNBUS_HOME, for API clients (scripts that call `/api/*` with
'Authorization: Bearer <token>'). Nothing reads the projection through the UI: every reader is a
client of the projection service (or folds the file itself, RUNBUS_PROJECTION=inprocess)."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANNOUNCEMENT = "ui.json"
TOKEN_FILE = "ui.token"


@dataclass(frozen=True)
class RunningUI:
    """A live `runbus ui` of a home, as its ui.json says."""

    host: str
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"


def announce(home: Path, host: str, port: int) -> Path:
    """Write ui.json (atomically) naming this process as the home's UI."""
    path = home / ANNOUNCEMENT
    tmp = path.with_name(f".{ANNOUNCEMENT}.{os.getpid()}")
    tmp.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}))
    os.replace(tmp, path)
    return path


def write_token(home: Path, token: str) -> Path:
    """Keep the UI's access token in ui.token, a file only its owner can read."""
    path = home / TOKEN_FILE
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode on O_CREAT
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def withdraw(home: Path) -> None:
    """Remove ui.json and ui.token if ui.json still names this process."""
    found = _read(home / ANNOUNCEMENT)
    if found is not None and found.get("pid") == os.getpid():
        (home / ANNOUNCEMENT).unlink(missing_ok=True)
        (home / TOKEN_FILE).unlink(missing_ok=True)


def running_ui(home: Path) -> RunningUI | None:
    """The home's announced UI if its process is alive and its port accepts connections (one
    left by a killed UI is ignored); None otherwise, and in the UI's own process."""
    found = _read(home / ANNOUNCEMENT)
    if found is None:
        return None
    try:
        ui = RunningUI(_client_host(str(found["host"])), int(found["port"]), int(found["pid"]))
    except (KeyError, TypeError, ValueError):
        return None
    if ui.pid == os.getpid() or not _alive(ui.pid) or not _accepts(ui.host, ui.port):
        return None
    return ui


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
