"""`runbus ui`: serve the app over the home's projection.

The UI is one more reader of the projection, never its holder: with RUNBUS_PROJECTION=service
(the default) every request is a session of the home's projection service, which the UI shares
with every other reader; with RUNBUS_PROJECTION=inprocess every request locks, opens and folds the
file and releases it after the linger time, as any in-process reader does, so other processes
take their turns instead of waiting for the UI to stop. It says where it listens in ui.json and
keeps its access token in ui.token (0600) for API clients (`engine.ui.announcement`).
"""

from __future__ import annotations

import secrets
import signal
import socket
import sys
from collections.abc import Sequence

import uvicorn

from engine.bootstrap import Services
from engine.ui.announcement import announce, running_ui, withdraw, write_token
from engine.ui.app import create_app, is_loopback
from engine.ui.store import ServedRunDB
from projections.client import ServiceClient
from projections.query import READ_ONLY_SCHEME


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def serve(host: str = "127.0.0.1", port: int = 8765, *, svc: Services, token: str | None = None,
          readable_dirs: Sequence[str] = (), viewer_token: str | None = None,
          public_names: Sequence[str] = ()) -> None:
    """Serve the UI over `svc`'s home until Ctrl-C / SIGTERM.

    Beyond loopback `token` is required (every request must carry it). On loopback a random token
    is made when none is given; either way it is kept in ui.token (mode 0600) for API clients.
    SQL may read, never write, files under `readable_dirs` (none by default) as
    `readonly:///<dir>/<file>`. `viewer_token`: a second token that reads but never edits.
    `public_names`: the names a reverse proxy serves it under (a token is then required).
    One UI per home (ui.json and ui.token name one): a second one
    fails naming the first.
    """
    wide = not is_loopback(host) or bool(public_names)
    if wide and not token:
        raise ValueError(f"--host {host}{' with --public-name' if public_names else ''} reaches beyond this "
                         f"machine: give an access token with --token "
                         f"or RUNBUS_UI_TOKEN")
    token = token or secrets.token_urlsafe(32)
    home = svc.settings.home
    running = running_ui(home)
    if running is not None:
        raise RuntimeError(f"a runbus ui already serves {home} at {running.url}")
    sock = bind(host, port)
    port = sock.getsockname()[1]
    # uvicorn re-raises the signal that stopped it once it is done; make SIGTERM unwind (and clean up)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        store = ServedRunDB(svc, _source(svc, readable_dirs), readable_dirs=readable_dirs)
        store.sql("SELECT 1")  # the projection answers (and reads the same directories)
        write_token(home, token)  # before the announcement: a client that finds one finds both
        announce(home, host, port)
        app = create_app(store, host, token, viewer_token, public_names)
        for line in startup_lines(host, port, svc, wide, readable_dirs):
            print(line, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        withdraw(home)
        sock.close()


def _source(svc: Services, readable_dirs: Sequence[str]) -> ServiceClient | None:
    """The projection service's client reading `readable_dirs` (RUNBUS_PROJECTION=service), else None."""
    if svc.settings.projection != "service":
        return None
    from engine.projection_service import service_client

    client = service_client(svc.settings, svc.bus, readable_dirs)
    if not set(client.readable_dirs) <= set(client.ping()["readable_dirs"]):
        client.stop()  # started by a reader that did not opt in to those files: the next request starts one
    return client


def startup_lines(host: str, port: int, svc: Services, wide: bool, readable_dirs: Sequence[str]) -> list[str]:
    """What `runbus ui` says when it starts: where, what, and who may come in."""
    shown = f"[{host}]" if ":" in host else host
    lines = [f"runbus ui on http://{shown}:{port}/ serving {svc.settings.home} (bus {svc.bus.url}); "
             f"Ctrl-C to stop"]
    if wide:
        lines.append(f"listening beyond loopback on {host}: every request needs the access token; open "
                     f"http://{shown}:{port}/?token=<token> once per browser, or send "
                     f"'Authorization: Bearer <token>'")
    if readable_dirs:
        lines.append("SQL may read (never write) the files under " + ", ".join(map(str, readable_dirs))
                     + f" as {READ_ONLY_SCHEME}:///<dir>/<file>, e.g. read_csv('{READ_ONLY_SCHEME}://"
                     + f"{readable_dirs[0]}/data.csv')")
    return lines


def _exit_on_signal(signum: int, _frame: object) -> None:
    sys.exit(0)
