"""The projection service: the one writer of a home's projection, answering readers over a socket.

One process per home holds the DuckDB file for its lifetime. A thread folds the bus continuously
(and judges silent runs); every connection is served on a thread of its own, on a cursor of its
own inside a READ ONLY transaction (`ReadOnlySession`), so readers never fold, never wait on one
another and never wait on the folding thread (DuckDB's MVCC). A reader sends the bus end offsets
it saw; its session opens once the projection has folded up to them (read your writes). A session
that ran only SELECTs is kept for the next request while nothing is folded (see `_WARM_SESSIONS`).

The socket is a Unix domain socket in the home (0700; the socket and the key are 0600), spoken
with `multiprocessing.connection` and an authkey kept in an owner-only key file, and only
`send_bytes`/`recv_bytes` (never pickles). Requests are small JSON objects; answers are tagged
messages: Arrow IPC for a statement's answer (DuckDB's Arrow table as it is: nothing is converted
in the service), JSON for anything else (an error names its class from a fixed allow-list, see
`projections.errors.error_from_payload`).

Requests: {"op": "session", "first": <statement>, ...} opens a snapshot that answers its first
statement, then statements sent one at a time until {"end": true} (a `with db.reader()` block);
{"op": "answer", "statements": [...], ...} answers a fixed list of statements from one snapshot in
one exchange (`RunDB.answer`: `sql`, `read_run`, `get_log`); "catch_up", "rebuild", "stop" and
"ping" are one answer each. {"op": "stop", "for": "purge"} stops the service as "stop" does and tells
a follower's process to serve again, with a new service, once the purge is done (see
`ProjectionService.stopped_for_purge`; a service that does not know the field just stops).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from filelock import FileLock, Timeout

from producers.bus import Bus
from projections.as_of import cutoff
from projections.database import ProjectionBusy, is_unreadable, open_projection, reopen_projection, wal_path
from projections.errors import ServiceRefused, error_payload
from projections.projector import Projector
from projections.readonly import QUERY_TIMEOUT_S, ReadOnlySession, TableQuery, read_only_tables, seal
from projections.replay import stored_events
from projections.user import UserProjection
from projections.wire import ipc_buffer
from schemas import EventCodec

FRAME, JSON = b"A", b"J"
"""The tag that starts every answer: an Arrow IPC stream, or a JSON object ({"error", "type"} on failure)."""
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
_AS_OF_CACHE = 4
_AS_OF_BUILDS = 1  # past projections built at once: readers asking for others are told to ask again
_JUDGE_EVERY_S = 1.0
# Sessions kept open between requests while the fold changes nothing: a request takes one instead of
# beginning a transaction on a new cursor and rolling it back at its end (~0.45 of the ~1.5 ms the
# service spends on a small query here). Any change of the tables rolls them back (`_tables_changed`),
# and none is used once older than _KEPT_SESSION_S: DuckDB's now() is the time a transaction began
# (the reaper and purge measure a run's silence with it), so in a request it is at most that old.
_WARM_SESSIONS = 2
_KEPT_SESSION_S = 0.5
# Once the fold has been idle this long with at least this much in DuckDB's WAL, the WAL is written to
# the file (CHECKPOINT): rows left in the WAL are held in memory uncompressed (up to 16 MB of WAL,
# the automatic checkpoint's threshold, ~+20 MB of RSS), are replayed by every service start, and
# slow queries a little (100,000 runs, 3.7 MB of WAL: 3.3 against 3.1 ms, in-process A/B). Not after
# every batch: each checkpoint writes the rows appended since as row groups of their own (DuckDB
# merges none, max_vacuum_tasks = 0), so a trickle of events gets a row group per 2 MB of WAL at
# most, against one per 16 MB of automatic checkpoints.
CHECKPOINT_IDLE_S = 0.5
CHECKPOINT_WAL_BYTES = 2 << 20
# DuckDB reads the rows its instance appended more slowly than a new instance reads the same rows
# from the file, even after they were checkpointed: 100,000 runs inserted in-process, the benchmark's
# filter query took 2.5-4.5 ms against 1.7-1.8 after opening the file again, a page of runs read by
# rowid 12-14 against 6 ms (strings selected by a filter cost most of it). So once the fold has
# folded this many records since the file was opened and a checkpoint (DuckDB's own, or the idle
# one above) wrote to the file since, it opens the file again when idle and no reader's snapshot is
# open: ~20 ms at 100,000 runs, then the next query and the next fold read their blocks and indexes
# again (~6 and ~5 ms there). It checkpoints nothing itself (each checkpoint writes row groups of
# their own, see above): what the WAL holds is read back from it. A fold that is never idle (a steady
# trickle of records) opens it again between two batches instead, once the file has been open for
# REOPEN_BUSY_AFTER_S: each reopen makes the next batch read its tables' indexes again.
REOPEN_AFTER_RECORDS = 1_000
REOPEN_BUSY_AFTER_S = 60.0
# A reopen that is due holds readers beginning a snapshot back for this long at most, for those under
# way to end (readers asking back to back would otherwise put it off turn after turn); when they do
# not (a reader block held open), it gives up and tries again after a pause doubling from 0.1 s.
REOPEN_READERS_WAIT_S = 0.05
_LARGE_ANSWER_BYTES = 64 << 20  # an answer after which Arrow's unused memory is given back
_PURGE_TURN_S = 0.15  # between two tries at a home another service holds, the purge lock is free this long
_STOP_CHECK_S = 0.25  # a wait also looks at `stop` this often (it may be set without a notification)
RELEASE_MARGIN_S = 10.0
"""How much longer than its wait timeout a stopping service may take to release its home (the batch
in flight, closing the file): a follower waits for the home RUNBUS_DB_TIMEOUT plus this."""
HANDSHAKE_S = 10.0
"""The longest a client's authentication may take (either side) before the connection is dropped."""
_BACKLOG = 64  # connections waiting for accept(): readers that arrive together are not refused
_log = logging.getLogger("runbus.projection")


@dataclass(frozen=True)
class ServiceAddress:
    """Where a home's projection service listens and keeps its key, lock and log; `purge` is the
    lock a purge holds from before it stops the service until the projection's files are removed."""

    home: Path
    socket: Path
    key: Path
    lock: Path
    log: Path
    follower: Path
    purge: Path

    @classmethod
    def of(cls, home: str | os.PathLike[str]) -> ServiceAddress:
        """The service files of `home`. The socket is `projection.sock` in the home unless that path
        is too long for a socket address; then it lives in a private (0700) folder of this user
        under the temp directory, named by a hash of the home."""
        home = Path(home).resolve()
        sock = home / "projection.sock"
        if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
            folder = Path(tempfile.gettempdir()) / f"runbus-{os.getuid()}"
            folder.mkdir(mode=0o700, exist_ok=True)
            found = folder.lstat()
            if found.st_uid != os.getuid() or found.st_mode & 0o077 or not folder.is_dir() or folder.is_symlink():
                raise PermissionError(f"{folder} must be a folder owned by this user and private (0700)")
            sock = folder / (hashlib.sha256(os.fsencode(home)).hexdigest()[:24] + ".sock")
        return cls(home, sock, home / "projection.key", home / "projection.lock", home / "projection.log",
                   home / "projection.follower", home / "projection.purge")


def follower_waits(address: ServiceAddress) -> bool:
    """Whether a follower holds the home's follower mark (a lock it takes before it asks a reader's
    service to stop, and keeps until it exits): no service a reader starts may take the home then.
    The mark is a lock, so a follower that was killed holds none. ProjectionBusy names a mark that
    cannot be probed (a folder, a link, another user's file)."""
    if not address.follower.exists():
        return False
    probe = FileLock(str(address.follower), mode=0o600, thread_local=False)
    try:
        probe.acquire(blocking=False)
    except Timeout:
        return True
    except OSError as exc:
        raise ProjectionBusy(f"the follower mark {address.follower} cannot be read ({type(exc).__name__}: "
                             f"{exc.strerror or exc}); remove it if no `runbus project --follow` runs") from None
    probe.release()
    return False


class _Stopping(ProjectionBusy):
    """A request this service will not answer because it is stopping: its connection is closed
    unanswered, and the client asks the next service (a follower, or one it has started)."""


def read_key(path: Path) -> bytes | None:
    """The service's authkey, or None when there is none yet (or it is not owner-only)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        found = os.fstat(fd)
        if found.st_uid != os.getuid() or found.st_mode & 0o077:
            return None
        return os.read(fd, 256).strip() or None
    finally:
        os.close(fd)


def ensure_key(path: Path) -> bytes:
    """The home's authkey, made (owner-only, atomically) when there is none."""
    found = read_key(path)
    if found is not None:
        return found
    key = secrets.token_hex(32).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key


def send_json(conn: Connection, payload: Mapping[str, Any]) -> None:
    conn.send_bytes(JSON + json.dumps(payload, default=str).encode())


def bound_io(conn: Connection | socket.socket, seconds: float | None) -> None:
    """Make every read and write of `conn` fail (BlockingIOError) after `seconds` without progress
    (SO_RCVTIMEO / SO_SNDTIMEO; a blocking connect() waiting for a full backlog too); None: wait forever."""
    whole = max(0.0, seconds or 0.0)
    if seconds is not None and whole < 1e-6:
        whole = 1e-6  # 0 would mean "forever"
    timeval = struct.pack("ll", int(whole), int((whole % 1) * 1_000_000))
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:  # the same socket: options are shared
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def peer_pid(conn: Connection) -> int | None:
    """The pid of the process at the other end of a Unix socket connection, when the system says."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:
        return None
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i")))[0]
    except OSError:
        return None
    return int(pid) or None


class _PastProjections:
    """Projections of the events up to a cutoff (`as_of`), built once and kept (a few, newest used).

    One is built at a time (a reader asking for another cutoff meanwhile is told to ask again: each
    build replays the log into memory, so readers cannot make the service hold many), on a thread of
    its own, which no other reader waits for: a reader waits for the one it asked for until its own
    deadline, then is told it is still being built (the build goes on, and a reader asking again
    later uses it). A kept one is used again while no event folded since it was built falls before
    its cutoff (on Kafka a lagging partition can still bring events below a position or time
    cutoff)."""

    def __init__(self, live: duckdb.DuckDBPyConnection, make_projector: Callable[[duckdb.DuckDBPyConnection],
                 Projector], stop: threading.Event, home: Path, size: int = _AS_OF_CACHE) -> None:
        self.live = live
        self.make_projector = make_projector
        self.stop = stop
        self.home = home
        self.size = size
        self.lock = threading.Lock()  # held only to look up, register and keep builds, never during one
        self.built: OrderedDict[tuple[str, tuple[Any, ...]],
                                tuple[duckdb.DuckDBPyConnection, dict[int, int]]] = OrderedDict()
        self.building: dict[tuple[str, tuple[Any, ...]], _Build] = {}

    def get(self, as_of: int | datetime | str, deadline: float) -> duckdb.DuckDBPyConnection:
        """The projection as of `as_of`; ProjectionBusy when it is not built by `deadline`
        (time.monotonic()) or the service stops meanwhile."""
        where, params = cutoff(as_of)
        key = (where, tuple(params))
        with self.lock:
            found = self.built.get(key)
            if found is not None and not self._late_events(where, params, found[1]):
                self.built.move_to_end(key)
                return found[0]
            build = self.building.get(key)
            if build is None:
                if self.stop.is_set():
                    raise _Stopping(f"the projection service of {self.home} is stopping")
                if len(self.building) >= _AS_OF_BUILDS:  # each holds a replay of the log in memory
                    under_way = ", ".join(repr(p[0] if len(p) == 1 else p) for _, p in self.building)
                    raise ProjectionBusy(
                        f"the projection service of {self.home} is building the projection as of {under_way} "
                        f"for another read; it builds one past projection at a time: ask again once it is built")
                build = self.building[key] = _Build()
                threading.Thread(target=self._build, args=(key, build), name="runbus-as-of", daemon=True).start()
        started = time.monotonic()
        while not build.done.wait(max(0.0, min(deadline - time.monotonic(), _STOP_CHECK_S))):
            if self.stop.is_set():
                raise _Stopping(f"the projection service of {self.home} is stopping: the projection "
                                f"as of {as_of!r} was not built")
            if time.monotonic() >= deadline:
                raise ProjectionBusy(
                    f"the projection service of {self.home} is still building the projection as of {as_of!r} "
                    f"(a replay of the events up to it) after {time.monotonic() - started:.3g}s; it goes on, "
                    f"and a read asking again uses it once built; set RUNBUS_DB_TIMEOUT to wait longer")
        if build.failure is not None:
            raise build.failure
        assert build.past is not None
        return build.past

    def building_any(self) -> bool:
        """Whether a past projection is being built (it reads the live connection)."""
        with self.lock:
            return bool(self.building)

    def drain(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) for the builds under way to end; they end soon after `stop`,
        and the live connection they read must not be closed under them."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            builds = list(self.building.values())
        for build in builds:
            build.done.wait(max(0.0, deadline - time.monotonic()))

    def _build(self, key: tuple[str, tuple[Any, ...]], build: _Build) -> None:
        where, params = key
        try:
            # positions first: an event folded meanwhile is in the past and also counts as late
            # (a needless rebuild next time, never a stale answer)
            folded = self._folded_positions()
            past = duckdb.connect(":memory:")
            replay = self.make_projector(past)
            for chunk in stored_events(self.live, where, params):
                if self.stop.is_set():
                    raise ProjectionBusy(f"the projection service of {self.home} is stopping")
                replay.apply_events(chunk)
            seal(past)
            build.past = past
            with self.lock:
                self.built[key] = (past, folded)
                self.built.move_to_end(key)
                while len(self.built) > self.size:
                    self.built.popitem(last=False)  # closed when its last session ends
        except BaseException as exc:  # the readers waiting for it are told
            build.failure = exc
        finally:
            with self.lock:
                self.building.pop(key, None)
            build.done.set()

    def _folded_positions(self) -> dict[int, int]:
        cursor = self.live.cursor()
        try:
            return dict(cursor.execute("SELECT partition, next_offset FROM positions").fetchall())
        finally:
            cursor.close()

    def _late_events(self, where: str, params: Sequence[Any], folded: dict[int, int]) -> bool:
        """Whether an event folded after `folded` (bus positions) falls before the cutoff."""
        since = ['(partition = ? AND "offset" >= ?)' for _ in folded]
        since.append(f"partition NOT IN ({', '.join('?' for _ in folded)})" if folded else "TRUE")
        args: list[Any] = [value for pair in folded.items() for value in pair] + list(folded)
        cursor = self.live.cursor()
        try:
            late = cursor.execute(f"SELECT count(*) FROM events WHERE ({' OR '.join(since)}) AND {where}",
                                  [*args, *params]).fetchone()
        finally:
            cursor.close()
        return late is None or late[0] > 0


class ReopenSchedule:
    """When the service opens its file again (see REOPEN_AFTER_RECORDS): the records folded since
    it was opened, the file's mtime and the time then, and the pause after a reopen was put off.
    Its counters are the service's (`reopened` is in its ping)."""

    def __init__(self, db_path: Path, after_records: int = REOPEN_AFTER_RECORDS) -> None:
        self.db_path = db_path
        self.after_records = after_records
        self.reopened = 0  # times the file was opened again on a new DuckDB instance
        self.put_off = 0  # times a due reopen was put off (a reader, a past projection's build)
        self._folded = 0
        self._file_at_open: int | None = None  # a checkpoint changes the file's mtime
        self._opened_at = 0.0
        self._not_before = 0.0
        self._put_offs_in_a_row = 0

    def opened(self) -> None:
        """The file was opened (again) now."""
        self._folded, self._put_offs_in_a_row = 0, 0
        self._file_at_open, self._opened_at = _modified(self.db_path), time.monotonic()

    def folded(self, records: int) -> None:
        self._folded += records

    def due(self, idle: bool) -> bool:
        """Whether to try now: enough folded since the file was opened and checkpointed into it, on
        an idle turn (or any once the file has been open for REOPEN_BUSY_AFTER_S), not in a pause."""
        now = time.monotonic()
        return (idle or now - self._opened_at >= REOPEN_BUSY_AFTER_S) and now >= self._not_before \
            and self._folded >= self.after_records and _modified(self.db_path) != self._file_at_open

    def postpone(self) -> None:
        """A due reopen was put off: the next try waits a pause doubling from 0.1 s, up to
        REOPEN_BUSY_AFTER_S."""
        self.put_off += 1
        self._put_offs_in_a_row += 1
        pause = min(REOPEN_BUSY_AFTER_S, 0.1 * 2 ** min(self._put_offs_in_a_row - 1, 10))
        self._not_before = time.monotonic() + pause


@dataclass
class _Build:
    """A past projection being built: `done` is set once `past` or `failure` is."""

    done: threading.Event = field(default_factory=threading.Event)
    past: duckdb.DuckDBPyConnection | None = None
    failure: BaseException | None = None


class ProjectionService:
    """The one writer of a projection file and the server of its readers (see the module doc)."""

    def __init__(self, bus: Bus, db_path: str | os.PathLike[str], address: ServiceAddress,
                 codec: EventCodec | None = None, user_projections: Sequence[UserProjection] = (), *,
                 idle_s: float | None = 300.0, wait_timeout_s: float = 60.0,
                 readable_dirs: Sequence[str] = (), fold_wait_s: float = 0.1,
                 batch_size: int = 50_000) -> None:
        """`idle_s`: exit after that long with no request (None: never). `wait_timeout_s`: how long
        a reader's session waits for the fold to reach the offsets it sent."""
        self.bus = bus
        self.db_path = Path(db_path)
        self.address = address
        self.codec = codec or EventCodec()
        self.user_projections = list(user_projections)
        self.idle_s = idle_s
        self.wait_timeout_s = wait_timeout_s
        self.readable_dirs = [str(Path(d).resolve()) for d in readable_dirs]
        self.fold_wait_s = fold_wait_s
        self.batch_size = batch_size
        self.reopens = ReopenSchedule(self.db_path)  # when it opens its file again
        self.stop = threading.Event()
        self.stopped_for_purge = False  # a {"op": "stop", "for": "purge"} request stopped it
        self.rebuilding = False  # a rebuild is under way (a purge refuses to run meanwhile)
        self.ready = threading.Event()
        self.fold_gate = threading.Event()  # cleared: the folding thread pauses between batches (tests)
        self.fold_gate.set()
        self._progress = threading.Condition()
        self._positions: dict[int, int] = {}
        self._failure: BaseException | None = None
        self._fold_lock = threading.Lock()  # the folding thread's turn, or a rebuild's
        self._active = 0
        self._last_request = time.monotonic()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._projector: Projector | None = None
        self._past: _PastProjections | None = None
        self._listener: Listener | None = None
        self._key = b""
        self._sessions_lock = threading.Lock()
        self._generation = 0  # bumped whenever the fold may have changed the tables
        self._warm: list[tuple[ReadOnlySession, int]] = []  # sessions of the current generation
        self._readers = 0  # readers' requests between the start and the end of their snapshot
        self._reopening = False  # the file is being opened again: a reader's snapshot waits for it

    # -- lifetime -----------------------------------------------------------------------------

    def run(self, lock_timeout_s: float = 0.0, while_waiting: Callable[[], None] | None = None) -> bool:
        """Serve until stopped (`stop`, idle, a `stop` request, or a failure of the projection);
        False when it did not get the home: another service held it for longer than `lock_timeout_s`,
        `stop` was set meanwhile, or (a service that exits when idle) a follower waits for it.

        A follower (`idle_s` None) takes the home's follower mark first and holds it until it ends
        (see `follower_waits`), and calls `while_waiting` about every _STOP_CHECK_S while another
        service holds the home (to ask it to stop). A service that exits when idle leaves the home
        to a follower that waits, before and after it gets the lock."""
        with contextlib.ExitStack() as held:
            try:
                if not self._take_home(held, time.monotonic() + lock_timeout_s, while_waiting):
                    return False
                with open_projection(self.db_path, self.wait_timeout_s, linger_s=0) as con:
                    self._serve(con)
                    if self._failure is not None:
                        raise self._failure  # damage: open_projection moves the file aside
                return True
            finally:
                self.ready.set()

    def _take_home(self, held: contextlib.ExitStack, deadline: float,
                   while_waiting: Callable[[], None] | None) -> bool:
        """Take the home's locks (released by `held`); False when this service must not serve it."""
        follower = self.idle_s is None
        if follower:
            mark = FileLock(str(self.address.follower), mode=0o600, thread_local=False)
            if not self._acquire(mark, deadline, None):
                return False
            held.callback(mark.release)
        elif follower_waits(self.address):
            return False
        # no service takes the home while a purge holds its lock (it stops the one serving, then
        # removes the projection's files): held until the home's lock is, so none slips in between.
        # Held for one try at the home's lock at a time, never through the whole wait for it: a
        # purge gets it between two tries (it failed when a follower waited for a reader's service,
        # saying another purge held its lock)
        purging = FileLock(str(self.address.purge), mode=0o600, thread_local=False)
        lock = FileLock(str(self.address.lock), thread_local=False)
        while True:
            if not self._acquire(purging, deadline, None):
                return False
            try:
                one_try = min(deadline, time.monotonic() + _STOP_CHECK_S)
                took = self._acquire(lock, one_try, while_waiting if follower else None)
            finally:
                purging.release()
            if took:
                held.callback(lock.release)
                break
            # a pause before the next try: a purge in another process polls for the lock (filelock:
            # every 50 ms), and taking it back at once left it no chance
            if time.monotonic() >= deadline or self.stop.wait(_PURGE_TURN_S) or self._gives_up_waiting():
                return False
        # one that took the lock just before a follower took its mark leaves the home to it
        return follower or not follower_waits(self.address)

    def _gives_up_waiting(self) -> bool:
        """Whether a wait for the home ends now: `stop` was set, or (a service that exits when
        idle) a follower waits for the home."""
        return self.stop.is_set() or (self.idle_s is not None and follower_waits(self.address))

    def _acquire(self, lock: FileLock, deadline: float, while_waiting: Callable[[], None] | None) -> bool:
        """`lock`, waiting until `deadline` at most; False when that passed, `stop` was set, or (a
        service that exits when idle) a follower came to wait for the home meanwhile."""
        last = [-float("inf")]

        def give_up() -> bool:  # filelock asks between its attempts
            if self._gives_up_waiting():
                return True
            if while_waiting is not None and time.monotonic() - last[0] >= _STOP_CHECK_S:
                last[0] = time.monotonic()
                while_waiting()
            return False

        try:
            lock.acquire(timeout=max(0.0, deadline - time.monotonic()), cancel_check=give_up)
        except Timeout:
            return False
        return True

    def _serve(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con
        self._projector = self._make_projector(con)
        seal(con, self.readable_dirs)
        self._positions = self._projector.positions()
        self.reopens.opened()
        self._past = _PastProjections(con, self._make_projector, self.stop, self.address.home)
        key = ensure_key(self.address.key)
        with contextlib.suppress(FileNotFoundError):
            self.address.socket.unlink()  # left by a service that was killed: we hold the lock now
        self._key = key
        # no authkey here: Listener.accept() would authenticate on the accepting thread, with no
        # deadline, so one silent client would keep every other one out; each client's thread does it
        self._listener = Listener(str(self.address.socket), family="AF_UNIX", backlog=_BACKLOG)
        try:
            os.chmod(self.address.socket, 0o600)
            threads = [threading.Thread(target=self._fold, name="runbus-fold", daemon=True)]
            if self.idle_s is not None:
                threads.append(threading.Thread(target=self._exit_when_idle, name="runbus-idle", daemon=True))
            # accept() on its own thread: a listening socket closed under a blocked accept() does not
            # always wake it (the wake-up connection needs the socket's path, which may be gone)
            threads.append(threading.Thread(target=self._accept, name="runbus-accept", daemon=True))
            for thread in threads:
                thread.start()
            self.ready.set()
            self.stop.wait()
        finally:
            self.stop.set()
            self._close_listener()
            self.fold_gate.set()
            # sessions under way and past projections being built end before the file is closed,
            # together within wait_timeout_s (a follower waits that plus RELEASE_MARGIN_S for the home)
            released_by = time.monotonic() + self.wait_timeout_s
            with self._progress:
                self._progress.wait_for(lambda: self._active == 0, timeout=self.wait_timeout_s)
            with self._fold_lock:  # the folding thread is done with the connection
                pass
            self._tables_changed()  # the kept sessions end before the file is closed
            if self._past is not None:
                self._past.drain(max(0.0, released_by - time.monotonic()))

    def pause_folding(self) -> None:
        """Stop folding once the batch in flight is committed (tests); `fold_gate.set()` resumes."""
        self.fold_gate.clear()
        with self._fold_lock:  # the batch in flight ends and publishes its positions
            pass

    def shutdown(self) -> None:
        """Stop serving (safe from a signal handler or another thread); `run` returns soon after, and
        readers waiting for the fold or for a past projection are told at once."""
        self.stop.set()
        self.bus.wake()  # the fold need not finish waiting for records first
        self._close_listener()

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # closing a listening socket does not wake a thread blocked in accept() on Linux: a
            # connection does (its handshake fails, and the accepting loop sees `stop`)
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as wake:
                wake.settimeout(1.0)
                wake.connect(str(self.address.socket))
            with contextlib.suppress(OSError):
                listener.close()  # removes the socket file
            with contextlib.suppress(FileNotFoundError):
                self.address.socket.unlink()

    def _accept(self) -> None:
        try:
            self._accept_until_stopped()
        finally:
            self.stop.set()  # a service that no longer accepts ends

    def _accept_until_stopped(self) -> None:
        while not self.stop.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                conn = listener.accept()
            except OSError:
                if self.stop.is_set() or self._listener is None:
                    return
                continue  # a client that went away before it was accepted
            if self.stop.is_set():
                conn.close()
                return
            threading.Thread(target=self._serve_client, args=(conn,), daemon=True).start()

    def _authenticated(self, conn: Connection) -> bool:
        """Whether the client proved it holds the home's key within HANDSHAKE_S (the stdlib's
        challenge, both ways, as Listener.accept does it); a client that fails or stalls is logged
        once and dropped, on its own thread, while others are served."""
        try:
            bound_io(conn, HANDSHAKE_S)
            deliver_challenge(conn, self._key)
            answer_challenge(conn, self._key)
            bound_io(conn, None)  # a session may rightly wait long for its reader's next statement
        except Exception as exc:  # a timeout (BlockingIOError), EOF, a wrong digest or a garbled message
            if not self.stop.is_set():  # else: the connection that wakes accept() at shutdown
                _log.warning("runbus: a client of the projection service was dropped during its handshake "
                             "(%s: %s)", type(exc).__name__, first_line(exc))
            return False
        return True

    def _touch(self, delta: int) -> None:
        with self._progress:
            self._active += delta
            self._last_request = time.monotonic()
            self._progress.notify_all()

    @property
    def requests_under_way(self) -> int:
        """How many requests are being answered now."""
        with self._progress:
            return self._active

    def _exit_when_idle(self) -> None:
        assert self.idle_s is not None
        while not self.stop.wait(min(1.0, self.idle_s / 4)):
            with self._progress:
                idle = self._active == 0 and time.monotonic() - self._last_request >= self.idle_s
            if idle:
                self.stop.set()
                self._close_listener()  # unblocks accept()

    def _fail(self, exc: BaseException) -> None:
        with self._progress:
            if self._failure is None:
                self._failure = exc
            self._progress.notify_all()
        self.stop.set()
        self._close_listener()

    # -- folding ------------------------------------------------------------------------------

    def _make_projector(self, con: duckdb.DuckDBPyConnection) -> Projector:
        return Projector(self.bus, con, self.codec, self.batch_size, self.user_projections)

    def _fold(self) -> None:
        assert self._projector is not None
        judged = 0.0
        folded = time.monotonic()
        try:
            while not self.stop.is_set():
                self.fold_gate.wait()
                with self._fold_lock:
                    if self.stop.is_set():
                        return
                    changes = self._projector.changes
                    consumed = self._projector.run_once(self.fold_wait_s)
                    idle = not consumed and time.monotonic() - folded >= CHECKPOINT_IDLE_S
                    if consumed:
                        folded = time.monotonic()
                        self.reopens.folded(consumed)
                    elif idle:
                        self._checkpoint_when_due()
                    if self.reopens.due(idle) and self._reopen():
                        changes = self._projector.changes  # a new projector's count
                    # idle, this loop turns every fold_wait_s: judging and reading the positions back
                    # are DuckDB statements, so they run after a batch (its events may revive a run
                    # judged lost) or once per _JUDGE_EVERY_S
                    judge = consumed > 0 or time.monotonic() - judged > _JUDGE_EVERY_S
                    if judge:
                        self._projector.judge_silent_runs()
                        judged = time.monotonic()
                    if self._projector.changes != changes:
                        self._tables_changed()  # before the positions: a reader waiting for them gets no kept session
                    if judge:
                        self._publish(self._projector.positions())
        except BaseException as exc:  # readers are told, the service ends and `run` raises it
            self._fail(exc)

    def _checkpoint_when_due(self) -> None:
        """Write DuckDB's WAL to the file when it holds CHECKPOINT_WAL_BYTES or more (see there).
        Readers go on meanwhile (DuckDB reads while it checkpoints)."""
        try:
            due = wal_path(self.db_path).stat().st_size >= CHECKPOINT_WAL_BYTES
        except FileNotFoundError:
            return
        if due:
            assert self._con is not None
            try:
                self._con.execute("CHECKPOINT")
            except duckdb.TransactionException as exc:  # another transaction in the way: next idle turn
                _log.info("checkpoint put off: %s", first_line(exc))

    def _reopen(self) -> bool:
        """Open the file again on a new connection (see REOPEN_AFTER_RECORDS), with a projector
        of its own, once no reader's snapshot is under way (see REOPEN_READERS_WAIT_S) and no past
        projection is being built (both read the live connection); readers beginning meanwhile wait
        for it. True when done; when it fails the service fails (the old connection is closed),
        before readers go on."""
        assert self._con is not None and self._past is not None
        with self._progress:
            self._reopening = True  # readers beginning a snapshot from now on wait for it
            # the readers under way may start a past projection's build, or a stop may come, meanwhile
            if not self._progress.wait_for(lambda: self._readers == 0, REOPEN_READERS_WAIT_S) or \
                    self.rebuilding or self.stop.is_set() or self._past.building_any():
                self._reopening = False
                self._progress.notify_all()
                self.reopens.postpone()
                return False
        try:
            self._tables_changed()  # the kept sessions' cursors are the old connection's
            con, renewed = reopen_projection(self._con, self.wait_timeout_s)
            projector = self._make_projector(con)
            seal(con, self.readable_dirs)
            self._con = self._past.live = con
            self._projector = projector
            self.reopens.opened()
            self._publish(projector.positions())  # a file moved aside as unreadable starts again from none
            if renewed:
                self.reopens.reopened += 1
            else:
                _log.warning("runbus: the projection service opened %s again on the same DuckDB instance "
                             "(another connection to it is open in this process)", self.db_path)
            return True
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            with self._progress:
                self._reopening = False
                self._progress.notify_all()

    def _tables_changed(self) -> None:
        """The tables may differ from what the kept sessions see: end them (called before the
        positions of the change are published, so a reader waiting for them begins a new one)."""
        with self._sessions_lock:
            self._generation += 1
            stale, self._warm = self._warm, []
        for session, _ in stale:
            session.close()

    def _take_session(self) -> tuple[ReadOnlySession, int]:
        """A session of the live projection that sees every change published so far (kept or new),
        and the generation it belongs to."""
        with self._sessions_lock:
            kept = self._warm.pop() if self._warm else None
            generation = self._generation  # read before the transaction begins: it sees at least that
        if kept is not None:
            if time.monotonic() - kept[0].began <= _KEPT_SESSION_S:
                return kept
            kept[0].close()
        assert self._con is not None
        return ReadOnlySession(self._con, QUERY_TIMEOUT_S, sealed=True, begin=self._begin_whole), generation

    def _begin_whole(self, cursor: duckdb.DuckDBPyConnection) -> None:
        """Begin a reader's READ ONLY transaction on `cursor` and take its snapshot now, while no
        rebuild is under way (ProjectionBusy when one is: a session's statement after a failed one
        begins anew). DuckDB takes a transaction's snapshot at its first read of the database, not
        at BEGIN: a session begun just before a rebuild would otherwise see its half-filled tables."""
        with self._progress:  # the rebuild sets its flag under it
            if self.rebuilding:
                raise self._rebuilt_meanwhile("ask again once it has ended")
            cursor.execute("BEGIN TRANSACTION READ ONLY")
            cursor.table("positions")  # binding a table reads the catalog: the snapshot is taken

    def _give_back(self, session: ReadOnlySession, generation: int) -> None:
        """Keep `session` for the next request when it is reusable and nothing changed since it
        began, else end it."""
        with self._sessions_lock:
            if session.reusable and generation == self._generation and len(self._warm) < _WARM_SESSIONS \
                    and time.monotonic() - session.began <= _KEPT_SESSION_S and not self.stop.is_set():
                self._warm.append((session, generation))
                return
        session.close()

    def _publish(self, positions: dict[int, int]) -> None:
        with self._progress:
            self._positions = positions
            self._progress.notify_all()

    def positions(self) -> dict[int, int]:
        """The bus positions folded so far."""
        with self._progress:
            return dict(self._positions)

    def wait_for(self, wanted: Mapping[int, int], timeout_s: float | None = None) -> None:
        """Return once every partition is folded up to `wanted`; ProjectionBusy naming how far
        behind the projection is after `timeout_s` (default: the service's wait timeout), or at
        once when the service is stopping (a shutdown or a follower's takeover does not wait out
        a long catch-up)."""
        started = time.monotonic()
        deadline = started + (self.wait_timeout_s if timeout_s is None else timeout_s)
        woken = False
        with self._progress:
            while True:
                if self._failure is not None:
                    raise ProjectionBusy(f"the projection service of {self.address.home} stopped: "
                                         f"{first_line(self._failure)}")
                behind = sum(max(0, end - self._positions.get(p, 0)) for p, end in wanted.items())
                if behind == 0:  # answered even while stopping: sessions under way end before the file closes
                    return
                if not woken:  # the records are on the bus: the fold need not wait for its next look
                    self.bus.wake()
                    woken = True
                if self.stop.is_set():
                    raise _Stopping(f"the projection service of {self.address.home} is stopping")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProjectionBusy(
                        f"the projection of {self.address.home} is still {behind} records behind the bus "
                        f"after {deadline - started:g}s; set RUNBUS_DB_TIMEOUT to wait longer")
                self._progress.wait(min(remaining, _STOP_CHECK_S))

    def _rebuilt_meanwhile(self, advice: str) -> ProjectionBusy:
        return ProjectionBusy(f"the projection of {self.address.home} is being rebuilt (runbus project --rebuild) "
                              f"and is not whole yet; {advice}")

    def _session_once_whole(self, deadline: float) -> tuple[ReadOnlySession, int]:
        """`_take_session` once no rebuild is under way (a new session's snapshot is taken under the
        lock a rebuild sets its flag under: it was taken before the rebuild's first commit, or the
        session waits for its end); ProjectionBusy saying so at `deadline`, or at once when the
        service is stopping."""
        with self._progress:
            while self.rebuilding:
                if self.stop.is_set():
                    raise _Stopping(f"the projection service of {self.address.home} is stopping")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._rebuilt_meanwhile("set RUNBUS_DB_TIMEOUT to wait longer")
                self._progress.wait(min(remaining, _STOP_CHECK_S))
            return self._take_session()

    def rebuild(self) -> int:
        """Drop every table and fold the whole log again; returns the records folded. A stop ends
        it between two batches (each commits with its positions, so the next service folds on from
        there) and the request goes unanswered, to be asked of the next service."""
        assert self._projector is not None

        def unless_stopping(_: Any) -> None:
            if self.stop.is_set():
                raise _Stopping(f"the projection service of {self.address.home} is stopping")

        with self._fold_lock:
            unless_stopping(None)  # a failed fold (or reopen) closed the connection meanwhile
            with self._progress:  # before the kept sessions end: a reader from now on waits for the end
                self.rebuilding = True
            try:
                self._tables_changed()
                count = self._projector.rebuild(unless_stopping)
                self.reopens.folded(count)  # every row is this instance's now
            finally:
                try:
                    self._tables_changed()
                finally:
                    with self._progress:
                        self.rebuilding = False
                        self._progress.notify_all()  # the readers waiting for the rebuild
                self._publish(self._projector.positions())
        return count

    # -- readers ------------------------------------------------------------------------------

    def _serve_client(self, conn: Connection) -> None:
        """The requests of one connection, one after another, until the client closes it (a client
        keeps its connection for its next session). Only a request under way counts as activity."""
        try:
            if not self._authenticated(conn):
                return
            while not self.stop.is_set():
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):
                    return  # the client went away
                if self.stop.is_set():
                    return  # unanswered: the client takes it as a service gone and asks the next one
                self._touch(+1)
                try:
                    if not self._handle(conn, json.loads(message)):
                        return
                except (EOFError, OSError, _Stopping):
                    return  # _Stopping: unanswered, the client asks the next service
                except Exception as exc:  # the client gets it, in one line
                    self._answer_error(conn, exc)
                finally:
                    self._touch(-1)
        finally:
            conn.close()

    def _handle(self, conn: Connection, request: Any) -> bool:
        """Answer one request; False when the connection is done."""
        op = request.get("op") if isinstance(request, dict) else None
        if op == "session":
            return self._session(conn, request)
        if op == "answer":
            self._answer(conn, request)
            return True
        if op == "catch_up":
            before = sum(self.positions().values())
            self.wait_for(self.bus.end_offsets(), _timeout(request.get("timeout_s")))
            send_json(conn, {"applied": sum(self.positions().values()) - before})
        elif op == "rebuild":
            send_json(conn, {"applied": self.rebuild()})
        elif op == "stop":
            self.stopped_for_purge = self.stopped_for_purge or request.get("for") == "purge"
            send_json(conn, {"pid": os.getpid()})
            self.shutdown()
            return False
        elif op == "ping":
            send_json(conn, {"pid": os.getpid(), "home": str(self.address.home), "follow": self.idle_s is None,
                             "positions": self.positions(), "readable_dirs": self.readable_dirs,
                             "rebuilding": self.rebuilding, "reopened": self.reopens.reopened})
        else:
            raise ValueError(f"the projection service has no operation {op!r}")
        return True

    def _answer_error(self, conn: Connection, exc: BaseException) -> None:
        if is_unreadable(exc):
            self._fail(exc)
        with contextlib.suppress(OSError, EOFError):
            send_json(conn, error_payload(exc))

    @contextlib.contextmanager
    def _snapshot(self, request: dict[str, Any]) -> Iterator[TableQuery]:
        """The read-only session a reader's request asks for, once the fold has reached the bus
        offsets it sent and a past projection it asks for (`as_of`) is built (answered {"ok": true}
        before the block runs). Both waits together take at most the request's "timeout_s" (the
        reader's RUNBUS_DB_TIMEOUT; default the service's), then ProjectionBusy says which one ran out. A
        session of the live projection also waits for a rebuild under way to end: its tables are
        dropped and refilled batch by batch, and a session begun meanwhile would see them half full."""
        deadline = time.monotonic() + (_timeout(request.get("timeout_s")) or self.wait_timeout_s)
        with self._progress:
            if not self._progress.wait_for(lambda: not self._reopening, max(0.0, deadline - time.monotonic())):
                raise ProjectionBusy(f"the projection service of {self.address.home} is still opening its file "
                                     "again; set RUNBUS_DB_TIMEOUT to wait longer")
            self._readers += 1
        try:
            with self._snapshot_of_live_or_past(request, deadline) as fetch:
                yield fetch
        finally:
            with self._progress:
                self._readers -= 1
                if self._readers == 0 and self._reopening:
                    self._progress.notify_all()  # a reopen waits for the last one

    @contextlib.contextmanager
    def _snapshot_of_live_or_past(self, request: dict[str, Any], deadline: float) -> Iterator[TableQuery]:
        """`_snapshot`'s session, of the live projection or of a past one."""
        wanted_dirs = [str(Path(d).resolve()) for d in request.get("readable_dirs") or []]
        if not set(wanted_dirs) <= set(self.readable_dirs):
            raise ServiceRefused(readable_dirs_refused(self.address.home, os.getpid(), self.idle_s is None,
                                                       self.readable_dirs, wanted_dirs))
        self.wait_for({int(p): int(end) for p, end in (request.get("wait_for") or {}).items()},
                      max(0.0, deadline - time.monotonic()))
        as_of = request.get("as_of")
        assert self._past is not None
        if as_of is not None:
            with read_only_tables(self._past.get(as_of, deadline), QUERY_TIMEOUT_S, sealed=True) as fetch:
                yield fetch
            return
        session, generation = self._session_once_whole(deadline)
        try:
            yield session.fetch
        except BaseException:
            session.close()
            raise
        self._give_back(session, generation)

    def _answer(self, conn: Connection, request: dict[str, Any]) -> None:
        """Statements of one snapshot, sent together: {"ok": true}, then each statement's answer
        in order, up to and including the first that fails."""
        statements = request.get("statements")
        if not isinstance(statements, list) or not all(isinstance(s, dict) for s in statements):
            raise ValueError('an "answer" request needs "statements": [{"sql": ..., "params": [...]}, ...]')
        with self._snapshot(request) as fetch:
            send_json(conn, {"ok": True})
            for statement in statements:
                if not self._answer_statement(conn, fetch, statement):
                    return

    def _answer_statement(self, conn: Connection, fetch: TableQuery, statement: dict[str, Any]) -> bool:
        """Answer one statement on `conn`: its table as one FRAME message, or its error (False).
        The table is dropped once it is an IPC buffer, and the buffer sent as it is: with bytes
        copies of it, the service held four times a large answer. After a large one, Arrow's
        allocator gives back what it no longer uses (it kept a 500 MB answer's 1.6 GB otherwise)."""
        self._touch(0)
        try:
            buffer = ipc_buffer(fetch(str(statement["sql"]), statement.get("params") or []), FRAME)
        except Exception as exc:
            self._answer_error(conn, exc)
            return False
        conn.send_bytes(buffer)
        if buffer.size > _LARGE_ANSWER_BYTES:
            del buffer
            pa.default_memory_pool().release_unused()
        return True

    def _session(self, conn: Connection, request: dict[str, Any]) -> bool:
        """One reader's snapshot: statements are answered until the client ends the session
        ({"end": true}: True, the connection serves on) or closes the connection (False)."""
        with self._snapshot(request) as fetch:
            send_json(conn, {"ok": True})
            statement = request.get("first")  # the block's first statement came with the request
            while True:
                if isinstance(statement, dict):
                    if statement.get("end"):
                        return True
                    self._answer_statement(conn, fetch, statement)  # a failed one is answered, the session goes on
                try:
                    statement = json.loads(conn.recv_bytes())
                except EOFError:
                    return False


def readable_dirs_refused(home: Path | str, pid: int, follow: bool, allowed: Sequence[str],
                          asked: Sequence[str]) -> str:
    """One line: the service `pid` of `home` lets SQL read `allowed` (fixed when it started), not
    `asked`, and what to do about it."""
    if follow:
        remedy = (f"stop that follower (`runbus project --follow`, pid {pid}) and start it again with "
                  f"--sql-read-dir for each directory asked (or start this reader without them)")
    else:
        remedy = (f"another reader started it; it exits after RUNBUS_PROJECTION_IDLE seconds without requests "
                  f"(or at once on `kill -TERM {pid}`), and the next reader starts one that allows them")
    return (f"the projection service of {home} (pid {pid}) lets SQL read {list(allowed) or 'no files'}, "
            f"not {list(asked)}: DuckDB's file settings are fixed when it starts; {remedy}")


def _timeout(value: Any) -> float | None:
    """A request's wait in seconds (a positive finite number), or None for the service's own."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"):
        return float(value)
    return None


def _modified(path: Path) -> int | None:
    """The file's modification time (ns); None when there is none."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def first_line(exc: BaseException) -> str:
    """An exception's first line (DuckDB's carry hints below), or its class name when it says nothing."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


SERVING_JOIN_S = 30.0


@contextlib.contextmanager
def serving_in_thread(service: ProjectionService, lock_timeout_s: float = 0.0) -> Iterator[ProjectionService]:
    """Run `service` on a thread for the block (tests and single-process use); stopped after.
    `lock_timeout_s`: see `ProjectionService.run`. RuntimeError when the block ended normally and
    the service has not stopped within SERVING_JOIN_S (it would keep the file)."""
    thread = threading.Thread(target=service.run, kwargs={"lock_timeout_s": lock_timeout_s},
                              name="runbus-projection-service", daemon=True)
    thread.start()
    service.ready.wait()
    try:
        yield service
    finally:
        service.shutdown()
        thread.join(timeout=SERVING_JOIN_S)
    if thread.is_alive():  # (not raised over an exception of the block: that one says more)
        raise RuntimeError(f"the projection service of {service.address.home} did not stop within "
                           f"{SERVING_JOIN_S:g}s of its shutdown")
