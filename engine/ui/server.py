"""`runbus ui`: hold the projection for the server's lifetime and serve the app on it.

Start-up order matters: the port is bound first (a clash fails before anything is announced),
then `ui.json` announces the server, then the file is locked, opened and caught up, then requests
are served. A client that finds the announcement while the server is still catching up connects
(the kernel queues it) and gets its answer once the server is ready, instead of waiting on the
file lock the server is about to take. On shutdown ui.json goes first, then the file is released.
"""

from __future__ import annotations

import signal
import socket
import sys

import uvicorn

from engine.bootstrap import Services, services
from engine.ui.app import create_app
from engine.ui.store import HeldRunDB
from projections import open_projection
from projections.remote import announce, find_server, withdraw


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


def serve(host: str = "127.0.0.1", port: int = 8765, svc: Services | None = None) -> None:
    """Serve the UI until Ctrl-C / SIGTERM; other processes' queries go through it meanwhile."""
    svc = svc or services()
    db_path = svc.settings.db_path
    running = find_server(db_path)
    if running is not None:
        raise RuntimeError(f"a runbus ui already serves {svc.settings.home} at {running.url}")
    sock = bind(host, port)
    port = sock.getsockname()[1]
    # uvicorn re-raises the signal that stopped it once it is done; make SIGTERM unwind (and clean up)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    announce(db_path, host, port)
    try:
        with open_projection(db_path, svc.settings.db_timeout_s, linger_s=0) as con:
            try:
                store = HeldRunDB(svc, con)
                store.catch_up()
                print(f"runbus ui on http://{host}:{port}/ serving {svc.settings.home} "
                      f"(bus {svc.bus.url}); Ctrl-C to stop", flush=True)
                server = uvicorn.Server(uvicorn.Config(create_app(store, host), log_level="warning",
                                                       timeout_graceful_shutdown=3))
                server.run(sockets=[sock])
            finally:
                withdraw(db_path)  # before the file is released: new queries wait for the lock, not us
    except KeyboardInterrupt:
        pass
    finally:
        withdraw(db_path)
        sock.close()


def _exit_on_signal(signum: int, _frame: object) -> None:
    sys.exit(0)
