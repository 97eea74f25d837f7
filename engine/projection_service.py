"""The projection service's process:
`python -m engine.projection_service [--follow] [--foreground] [--sql-read-dir DIR]`.

Its composition root: settings are read once, the bus and the service are built from them. Readers
start it on demand (`start_service`); `runbus project --follow` becomes it (`--follow --foreground`:
no idle exit, progress on stdout, `serve_as_follower`). A second service for the same home exits at
once, quietly (status 0), and so does one a reader started while a follower waits for the home; in
the foreground it waits RUNBUS_DB_TIMEOUT plus RELEASE_MARGIN_S and exits with status 1, saying so.
A follower in the foreground stopped by a purge serves again, with a new service, once the purge is
done (`serve_through_purges`).
It loads what serving and folding need, and no pandas when no user projection is configured.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib.abc import MetaPathFinder
from pathlib import Path
from types import ModuleType

from filelock import FileLock, Timeout

from engine.settings import Settings, load_settings
from engine.terminal import neutral
from producers.bus import Bus
from producers.spill import make_private_folder
from projections.client import ServiceClient
from projections.database import ProjectionBusy
from projections.errors import ServiceRefused
from projections.service import (
    RELEASE_MARGIN_S,
    ProjectionService,
    ServiceAddress,
    first_line,
    readable_dirs_refused,
)

# a service started as another exits waits this long for it before leaving quietly
LOCK_WAIT_S = 5.0
SQL_READ_DIRS = "RUNBUS_SERVICE_SQL_READ_DIRS"  # what the starting reader asked for (os.pathsep-separated)


def build_service(settings: Settings, bus: Bus, *, follow: bool = False,
                  readable_dirs: Sequence[str] = ()) -> ProjectionService:
    """The projection service of `settings.home` over `bus` (exits when idle unless `follow`)."""
    from engine.bootstrap import load_user_projections
    from projections.database import configure
    from schemas import EventCodec

    make_private_folder(settings.home)
    configure(0.0, settings.heartbeat_interval_s)
    return ProjectionService(bus, settings.db_path, ServiceAddress.of(settings.home), EventCodec(),
                             load_user_projections(settings.projections),
                             idle_s=None if follow else settings.projection_idle_s,
                             wait_timeout_s=settings.db_timeout_s, readable_dirs=readable_dirs)


def start_service(settings: Settings, readable_dirs: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Launch a service process for `settings.home`, detached (its own session), logging to
    RUNBUS_HOME/projection.log; returns at once."""
    address = ServiceAddress.of(settings.home)
    make_private_folder(settings.home)
    env = {**os.environ, "RUNBUS_HOME": str(settings.home), "RUNBUS_BUS": settings.bus_url,
           SQL_READ_DIRS: os.pathsep.join(readable_dirs)}
    fd = os.open(address.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        return subprocess.Popen(service_command(), env=env,
                                stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
    finally:
        os.close(fd)


def service_client(settings: Settings, bus: Bus, readable_dirs: Sequence[str] = ()) -> ServiceClient:
    """A client of `settings.home`'s projection service that starts one when none answers.

    A reader that asks SQL to read `readable_dirs` fails here (ServiceRefused, one line) when a follower
    (`runbus project --follow`) serves the home without them: its DuckDB settings were fixed when it
    started, and it would refuse every session. (A service a reader started is not a follower: it can
    be stopped, and the next reader starts one that allows them.)"""
    dirs = [str(Path(d).resolve()) for d in readable_dirs]
    client = ServiceClient(ServiceAddress.of(settings.home), bus, lambda: start_service(settings, dirs),
                           settings.db_timeout_s, dirs)
    if dirs:
        found = client.running()
        allowed = list(found.get("readable_dirs") or []) if found else []
        if found is not None and found.get("follow") and not set(dirs) <= set(allowed):
            raise ServiceRefused(readable_dirs_refused(settings.home, int(found["pid"]), True, allowed, dirs))
    return client


def follower_refused(client: ServiceClient, readable_dirs: Sequence[str]) -> str | None:
    """Why a follower must not take `client`'s home now (one line), or None: another follower
    serves it, or a service a reader started lets SQL read directories that this follower would not
    (taking over would refuse that reader's every session)."""
    found = client.running()
    if found is None:
        return None
    home, pid = client.address.home, int(found["pid"])
    if found.get("follow"):
        return (f"a projection service already follows {home} as pid {pid}; this one exits "
                f"(stop that one first: kill -TERM {pid})")
    extra = sorted(set(found.get("readable_dirs") or []) - {str(Path(d).resolve()) for d in readable_dirs})
    if extra:
        return (f"the projection service of {home} (pid {pid}) lets SQL read {extra} for a reader that asked for "
                f"them (runbus ui --sql-read-dir); start the follower with --sql-read-dir for each, or stop that "
                f"reader first")
    return None


class _NoPandas(MetaPathFinder):
    """Refuses pandas: see keep_pandas_out."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> None:
        if fullname == "pandas" or fullname.startswith("pandas."):
            raise ModuleNotFoundError(f"the projection service does not load {fullname}", name=fullname)


def keep_pandas_out() -> None:
    """Make `import pandas` fail in this process (a finder first on sys.meta_path). pyarrow imports
    pandas, when installed, the first time it converts Python values (`pa.array`, which the
    projector's writer uses) only to ask whether they are pandas objects; the service never holds
    any, and pandas would cost it ~40 MB of RSS and 0.4 s of CPU. pyarrow takes the failed import
    as "no pandas" and converts the values as they are. No-op once pandas is loaded."""
    if "pandas" not in sys.modules and not any(isinstance(f, _NoPandas) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoPandas())


# `python -m` would put the current directory first on sys.path: a `secrets.py` or `json.py` there
# would stand in for the library the service imports. It goes last (a user projection there imports).
_LAUNCH = ("import os, runpy, sys; sys.path.pop(0); sys.path.append(os.getcwd()); del sys.argv[0]; "
           "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def service_command(*args: str) -> list[str]:
    """The command line that runs this module as a process, as `python -m engine.projection_service
    ARGS` does but with the current directory last on sys.path."""
    return [sys.executable, "-c", _LAUNCH, "engine.projection_service", *args]


def foreground_command(readable_dirs: Sequence[str]) -> list[str]:
    """The command line of a follower in the foreground (what `runbus project --follow` becomes once
    it has checked that it may take the home: it replaces itself with this process, which loads only
    what serving and folding need)."""
    return service_command("--follow", "--foreground", *(f"--sql-read-dir={d}" for d in readable_dirs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.projection_service")
    parser.add_argument("--follow", action="store_true",
                        help="never exit when idle; take the home from a service a reader started, waiting "
                             "RUNBUS_DB_TIMEOUT (plus a margin) for it (status 1 when another service keeps it), "
                             "and serve again after each purge")
    parser.add_argument("--foreground", action="store_true",
                        help="say on stdout what it folds (runbus project --follow)")
    parser.add_argument("--sql-read-dir", action="append", default=[])
    args = parser.parse_args(argv)
    # the projection holds every run's data: its files (DuckDB's WAL, the locks) are the owner's
    # only, even in a home folder that others may list
    os.umask(0o077)
    readable = [*args.sql_read_dir, *filter(None, os.environ.get(SQL_READ_DIRS, "").split(os.pathsep))]
    settings = load_settings()
    from engine.bootstrap import make_bus

    bus = make_bus(settings.bus_url, settings)
    service = build_service(settings, bus, follow=args.follow, readable_dirs=readable)
    if not service.user_projections:  # a user's projection may use pandas: its process keeps it
        keep_pandas_out()
    serving = Serving(service)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: serving.shutdown())
    try:
        if args.foreground:
            return _serve_in_foreground(settings, bus, serving)
        try:
            if not args.follow:
                service.run(lock_timeout_s=LOCK_WAIT_S)
            elif not serve_through_purges(settings, bus, serving) and not serving.service.stop.is_set():
                print(_kept_by_another(settings), file=sys.stderr, flush=True)
                return 1
        except Exception as exc:  # one line in the home's projection.log, as in the foreground
            print(_stopped(settings, exc), file=sys.stderr, flush=True)
            return 1
    finally:
        bus.close()
    return 0


class Serving:
    """The service a process serves its home with now (a follower's is replaced after each purge);
    `shutdown` (a signal handler) stops it and ends the serving for good."""

    def __init__(self, service: ProjectionService) -> None:
        self.service = service
        self.ended = threading.Event()

    def shutdown(self) -> None:
        """Stop the current service, and serve with no other one (safe from a signal handler)."""
        self.ended.set()
        self.service.shutdown()

    def replace(self, service: ProjectionService) -> None:
        """Serve with `service` from now on; it is stopped at once if `shutdown` came first."""
        self.service = service
        if self.ended.is_set():  # the signal stopped the previous service, between the check and the swap
            service.shutdown()


def serve_through_purges(settings: Settings, bus: Bus, serving: Serving,
                         report: Callable[[ProjectionService], None] = lambda _: None) -> bool:
    """`serve_as_follower` with `serving.service`, and again with a new service each time a purge stops
    it (`ProjectionService.stopped_for_purge`): once the purge lock is free (the purge removed the
    projection's files), saying so in one line; the new service folds the log from its start. Any other
    stop ends it. `report` is called with each service before it serves. What the last
    `serve_as_follower` returned; its exceptions propagate."""
    while True:
        service = serving.service
        report(service)
        served = serve_as_follower(settings, service)
        if not (served and service.stopped_for_purge):
            return served
        home = neutral(str(settings.home), one_line=True)
        print(f"projector: waiting for the purge of {home} to end", flush=True)
        if not _purge_done(settings, serving):
            return served
        serving.replace(build_service(settings, bus, follow=True, readable_dirs=service.readable_dirs))
        if settings.db_path.exists():  # the purge ended before it removed them (killed, or it failed)
            print(f"projector: the purge of {home} left its projection in place; serving it again", flush=True)
        else:
            print(f"projector: {home} was purged; folding the log again from the start", flush=True)


def _purge_done(settings: Settings, serving: Serving) -> bool:
    """Wait for the home's purge lock, which a purge holds until the projection's files are removed,
    at most RUNBUS_DB_TIMEOUT plus RELEASE_MARGIN_S (the purge itself gives up after RUNBUS_DB_TIMEOUT);
    False when `serving` was shut down first."""
    purging = FileLock(str(serving.service.address.purge), mode=0o600, thread_local=False)
    try:
        purging.acquire(timeout=settings.db_timeout_s + RELEASE_MARGIN_S, cancel_check=serving.ended.is_set)
    except Timeout:
        pass  # a purge that stalls (or a shutdown that cancelled the wait): the follower serves on regardless
    else:
        purging.release()
    return not serving.ended.is_set()


def _serve_in_foreground(settings: Settings, bus: Bus, serving: Serving) -> int:
    """Serve until stopped (through purges), printing how far the fold is; 1 (and one line on stderr
    naming the cause) when another service keeps the home or the projection fails."""
    home = neutral(str(settings.home), one_line=True)
    print(f"projector following {neutral(bus.url, one_line=True)} into "
          f"{neutral(str(settings.db_path), one_line=True)} (Ctrl-C to stop)", flush=True)

    def report(service: ProjectionService) -> None:
        threading.Thread(target=_report, args=(service,), daemon=True).start()

    try:
        served = serve_through_purges(settings, bus, serving, report)
    except Exception as exc:  # the fold (or opening the file) failed: the service has ended
        print(_stopped(settings, exc), file=sys.stderr, flush=True)
        return 1
    service = serving.service
    if served:
        print(f"projector stopped at {sum(service.positions().values())} records", flush=True)
        return 0
    if service.stop.is_set():  # Ctrl-C or SIGTERM while it waited for the home
        print(f"projector stopped before it took {home}", flush=True)
        return 0
    print(_kept_by_another(settings), file=sys.stderr, flush=True)
    return 1


def _kept_by_another(settings: Settings) -> str:
    """The line saying a follower did not get its home: another service kept it."""
    # (not named by pid: a service that holds the lock may answer no ping yet)
    return (f"error: another projection service kept {neutral(str(settings.home), one_line=True)} for more than "
            f"{settings.db_timeout_s + RELEASE_MARGIN_S:g}s; this one exits")


def serve_as_follower(settings: Settings, service: ProjectionService) -> bool:
    """Take `settings.home` for `service` (a follower: built with follow=True) and serve until it is
    stopped; False when it did not get the home (another follower keeps it, or `stop` was set first).

    The follower marks the home first (no service a reader starts takes it from then on), then asks
    the service a reader started to stop, again while another one holds the home, and waits for the
    home RUNBUS_DB_TIMEOUT plus RELEASE_MARGIN_S (a stopping service releases it within
    RUNBUS_DB_TIMEOUT and that margin). Asking only once it is ready leaves no window in which a reader
    starts a service that wins. Exceptions of the projection propagate."""
    client = ServiceClient(service.address, service.bus, start=None, timeout_s=settings.db_timeout_s)
    asked: set[int] = set()

    def stop_a_readers_service() -> None:
        try:
            found = client.running()
            if found is None or found.get("follow"):
                return  # none, or another follower: that one is not asked to leave
            stopped = client.stop()
        except ProjectionBusy:  # a stalled service: the wait for the home bounds this
            return
        if stopped is not None and stopped not in asked:
            asked.add(stopped)
            print(f"asked the projection service running as pid {stopped} to stop", flush=True)

    try:
        return service.run(lock_timeout_s=settings.db_timeout_s + RELEASE_MARGIN_S,
                           while_waiting=stop_a_readers_service)
    finally:
        client.close()


def _stopped(settings: Settings, exc: BaseException) -> str:
    """The one line that says why the service of `settings.home` ended (a failure of its projection)."""
    return (f"error: the projection service of {neutral(str(settings.home), one_line=True)} stopped: "
            f"{neutral(first_line(exc), one_line=True)}")


def _report(service: ProjectionService) -> None:
    """Print the records folded, when it changed and at most every 2 s, until the service stops."""
    last_time, last = time.monotonic(), -1
    while not service.stop.wait(1.0):
        folded = sum(service.positions().values())
        if folded != last and (time.monotonic() - last_time > 2 or last < 0):
            print(f"projector: at {folded} records", flush=True)
            last_time, last = time.monotonic(), folded


if __name__ == "__main__":
    sys.exit(main())
