"""Ending the projection services a test started, so none outlives its test.

A reader starts its home's service on demand (engine.projection_service.start_service): a
detached process that exits when idle. A test's fixture asks the home's service to stop (the
service's own `stop` request) and then ends any service process still serving a home under the
test's folder (one still starting, or a service of another home the test made) by SIGTERM, which
the service handles as a stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.api import session
from engine.bootstrap import make_bus
from engine.projection_service import build_service
from producers.bus import Bus
from producers.bus.memory import MemoryBus
from projections.client import ServiceClient
from projections.service import ProjectionService, ServiceAddress, serving_in_thread

SERVICE_MODULE = b"engine.projection_service"
_EXIT_WAIT_S = 15.0
_STOP_GRACE_S = 5.0


def service_processes(under: Path) -> list[int]:
    """Pids of projection service processes of this user whose RUNBUS_HOME is `under` or below it."""
    root = os.fsencode(under.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if SERVICE_MODULE not in (entry / "cmdline").read_bytes().split(b"\0"):
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not this user's
            continue
        homes = [item.removeprefix(b"RUNBUS_HOME=") for item in environ if item.startswith(b"RUNBUS_HOME=")]
        if homes and (homes[0] == root or homes[0].startswith(root + b"/")) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def stop_projection_services(home: Path, under: Path) -> None:
    """Ask `home`'s service to stop, then SIGTERM every service still serving a home under `under`;
    returns once all of them have exited (AssertionError naming the pids left otherwise)."""
    asked = None
    if home.exists():
        # the client's bus is not used by `stop`: it only talks to the service's socket
        asked = ServiceClient(ServiceAddress.of(home), MemoryBus()).stop()
    began = time.monotonic()
    signalled: set[int] = set()
    while True:
        left = service_processes(under)
        if not left:
            return
        waited = time.monotonic() - began
        if waited > _EXIT_WAIT_S:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"projection service(s) {left} of {under} did not exit within {_EXIT_WAIT_S:g}s "
                                 f"(killed)")
        for pid in set(left) - signalled:
            if pid == asked and waited < _STOP_GRACE_S:
                continue  # asked to stop: it exits once its sessions end
            # still starting, another home's, or slow to stop: SIGTERM is a stop too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            signalled.add(pid)
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """False for a process that has exited (reaped here when it is this process's child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@contextlib.contextmanager
def service_in_thread(configure: Callable[[ProjectionService], None] = lambda service: None,
                      ) -> Iterator[tuple[ProjectionService, ServiceClient, Bus]]:
    """A projection service of the current session's home served in this process (`configure`d
    before it starts), a client of it, and another bus handle to append with (a job of another
    process); all ended with the block."""
    settings = session().services.settings
    bus = make_bus(settings.bus_url, settings)
    writer = make_bus(settings.bus_url, settings)
    service = build_service(settings, bus)
    configure(service)
    try:
        with serving_in_thread(service):
            client = ServiceClient(service.address, session().services.bus, start=None, timeout_s=60)
            try:
                yield service, client, writer
            finally:
                client.close()
    finally:
        writer.close()
        bus.close()
