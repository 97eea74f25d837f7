"""`runbus ui`: serve the app over the home's projection.

With RUNBUS_PROJECTION=service the UI is one more client of the projection service (it holds no
file, nothing routes through it); it keeps its access token in ui.token (0600) for API clients and
says where it listens in ui.json. With RUNBUS_PROJECTION=inprocess it holds the file itself:

Start-up order matters: the port is bound first (a clash fails before anything is announced),
then `ui.json` announces the server, then the file is locked, opened and caught up, then requests
are served. A client that finds the announcement while the server is still catching up connects
(the kernel queues it) and gets its answer once the server is ready, instead of waiting on the
file lock the server is about to take. On shutdown ui.json goes first, then the file is released.
"""

from __future__ import annotations

import secrets
import signal
import socket
import sys
from collections.abc import Sequence

import uvicorn

from engine.bootstrap import Services, services
from engine.ui.app import create_app, is_loopback
from engine.ui.store import HeldRunDB, ServedRunDB
from projections import open_projection
from projections.query import READ_ONLY_SCHEME
from projections.remote import announce, find_server, withdraw, write_token


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


def serve(host: str = "127.0.0.1", port: int = 8765, svc: Services | None = None, token: str | None = None,
          readable_dirs: Sequence[str] = ()) -> None:
    """Serve the UI until Ctrl-C / SIGTERM; other processes' queries go through it meanwhile.

    Beyond loopback `token` is required (every request must carry it). On loopback a random token
    is made when none is given; either way it is kept in ui.token (mode 0600) for the routed
    RunDB. SQL may read, never write, files under `readable_dirs` (none by default) as
    `readonly:///<dir>/<file>`.
    """
    svc = svc or services()
    wide = not is_loopback(host)
    if wide and not token:
        raise ValueError(f"--host {host} reaches beyond this machine: give an access token with --token "
                         f"or RUNBUS_UI_TOKEN")
    token = token or secrets.token_urlsafe(32)
    db_path = svc.settings.db_path
    running = find_server(db_path)
    if running is not None:
        raise RuntimeError(f"a runbus ui already serves {svc.settings.home} at {running.url}")
    sock = bind(host, port)
    port = sock.getsockname()[1]
    # uvicorn re-raises the signal that stopped it once it is done; make SIGTERM unwind (and clean up)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if svc.settings.projection == "service":
        _serve_as_client(sock, host, port, svc, token, wide, readable_dirs)
        return
    write_token(db_path, token)  # before the announcement: a client that finds one finds both
    announce(db_path, host, port)
    try:
        with open_projection(db_path, svc.settings.db_timeout_s, linger_s=0) as con:
            try:
                store = HeldRunDB(svc, con, readable_dirs=readable_dirs)
                store.catch_up()
                app = create_app(store, host, token)
                for line in startup_lines(host, port, svc, wide, readable_dirs):
                    print(line, flush=True)
                server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
                server.run(sockets=[sock])
            finally:
                withdraw(db_path)  # before the file is released: new queries wait for the lock, not us
    except KeyboardInterrupt:
        pass
    finally:
        withdraw(db_path)
        sock.close()


def _serve_as_client(sock: socket.socket, host: str, port: int, svc: Services, token: str, wide: bool,
                     readable_dirs: Sequence[str]) -> None:
    """Serve the app on `sock` with every read a session of the projection service."""
    from engine.projection_service import service_client

    db_path = svc.settings.db_path
    try:
        client = service_client(svc.settings, svc.bus, readable_dirs)
        if not set(client.readable_dirs) <= set(client.ping()["readable_dirs"]):
            client.stop()  # started by a reader that did not opt in to those files: the next request starts one
        store = ServedRunDB(svc, client)
        store.sql("SELECT 1")  # the service answers (and reads the same directories)
        write_token(db_path, token)
        # ui.json only says where the UI listens: a RunDB routes nothing through it in this mode
        announce(db_path, host, port)
        app = create_app(store, host, token)
        for line in startup_lines(host, port, svc, wide, readable_dirs):
            print(line, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        withdraw(db_path)
        sock.close()


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
