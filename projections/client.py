"""Reading a home's projection through its projection service (see projections.service).

A reader never opens the DuckDB file: it connects to the service's socket, sends the bus end
offsets it sees (so the answer includes everything appended before the request: read your
writes), and reads the answers of one snapshot as Arrow IPC, converted by `projections.wire`.
When no service answers (none yet, or one that was killed left its socket behind) the client has
one started with `start` and waits for it; while a follower waits for the home (it holds the home's
follower mark, see `projections.service.follower_waits`) it starts none and waits for the follower.

No wait is unbounded but a rebuild's: the connection and its handshake take at most
min(timeout_s, HANDSHAKE_S); a session (or a catch-up) must open within timeout_s plus a margin
(every request carries timeout_s, RUNBUS_DB_TIMEOUT: the service bounds its wait for the fold and
its build of a past projection by it and answers ProjectionBusy itself, naming what it was doing);
each statement must be answered within the service's statement timeout (QUERY_TIMEOUT_S) plus a
margin; the bytes of an answer must keep coming (no gap longer than the handshake bound). A
service that is stopped (SIGSTOP) or hung makes the reader fail with ProjectionBusy, naming its
pid, home and log, and the connection is closed. A rebuild waits as long as it takes: it folds the
whole log, which may take minutes, and the caller asked for exactly that (Ctrl-C ends the wait).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from subprocess import Popen
from typing import TYPE_CHECKING, Any

from producers.bus import Bus
from projections.database import ProjectionBusy
from projections.errors import error_from_payload
from projections.readonly import QUERY_TIMEOUT_S
from projections.service import (
    FRAME,
    HANDSHAKE_S,
    JSON,
    ServiceAddress,
    bound_io,
    follower_waits,
    peer_pid,
    read_key,
)
from projections.wire import from_ipc, to_frame

if TYPE_CHECKING:  # pandas is imported on the first answer converted: the service process stops services with this
    import pandas as pd

    from projections.query import Query, Statement

_POLL_S = 0.05
_LONGEST_WAIT_S = 365 * 86400.0  # a longer RUNBUS_DB_TIMEOUT ("forever") would overflow poll()
_KEEP_IDLE = 2  # connections kept between sessions (a UI serves a few requests at once)
_MARGIN_S = 5.0  # beyond the service's own deadline: its answer's way back on a loaded machine
_GONE = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError, EOFError)


class ServiceClient:
    """The reads of a RunDB, answered by the projection service of `address.home`.

    `start()` launches a service process for the home and returns at once; the client polls the
    socket until `timeout_s`, and starts another only once that one has ended (it found a service
    that was exiting). None: a missing service is an error.
    """

    def __init__(self, address: ServiceAddress, bus: Bus, start: Callable[[], Popen[bytes]] | None = None,
                 timeout_s: float = 60.0, readable_dirs: Sequence[str] = ()) -> None:
        self.address = address
        self.bus = bus
        self.start = start
        self.timeout_s = timeout_s
        self.readable_dirs = list(readable_dirs)
        # connections between sessions, kept for the next one (saves the connect and handshake)
        self._idle: list[Connection] = []
        self._idle_lock = threading.Lock()
        self._pid = os.getpid()

    def _reading(self, op: str, as_of: int | datetime | str | None) -> dict[str, Any]:
        """A request for a snapshot that includes every event on the bus now. It carries this
        client's timeout_s: the service bounds its own waits (the fold, a past projection's build)
        by it and says which ran out, before this client's bound (a margin longer) gives up on it."""
        wanted = self.bus.end_offsets()
        return {"op": op, "wait_for": {str(p): end for p, end in wanted.items()}, "timeout_s": self.timeout_s,
                "as_of": _plain(as_of) if as_of is not None else None, "readable_dirs": self.readable_dirs}

    def answer(self, statements: Sequence[Statement], as_of: int | datetime | str | None = None) -> list[pd.DataFrame]:
        """The answers to `statements` (sql, params), all from one snapshot that includes every
        event on the bus now: one request, whose answers arrive together. The first failing
        statement's error is raised."""
        request = self._reading("answer", as_of)
        request["statements"] = [{"sql": query, "params": [_plain(v) for v in params or []]}
                                 for query, params in statements]
        conn = self._open(request)
        frames: list[pd.DataFrame] = []
        while len(frames) < len(statements):
            try:
                answer = self._receive(conn, self._statement_s, "a statement")
            except (EOFError, OSError) as exc:
                conn.close()
                raise ProjectionBusy(f"the projection service of {self.address.home} went away during "
                                     f"a query ({type(exc).__name__}; see {self.address.log})") from None
            if answer[:1] != FRAME:
                self._keep(conn)  # the service answers no more for this request: the connection serves on
                raise _error(answer)
            frames.append(_frame(answer))
        self._keep(conn)
        return frames

    @contextmanager
    def snapshot(self, as_of: int | datetime | str | None = None) -> Iterator[Query]:
        """One read session: `query(sql, params=None) -> DataFrame`, every statement answered from
        the same state, which includes every event on the bus when the block began. The session
        is opened with its first statement, in one message (a block that asks nothing sends
        nothing)."""
        request = self._reading("session", as_of)
        conn: Connection | None = None
        pending = False  # a statement sent whose answer was not read: the connection cannot serve on

        def fetch(query: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
            nonlocal conn, pending
            statement = {"sql": query, "params": [_plain(v) for v in params or []]}
            if conn is None:
                conn = self._open({**request, "first": statement})  # raises what refused the session
                pending = True
            try:
                if not pending:
                    pending = True
                    conn.send_bytes(json.dumps(statement).encode())
                answer = self._receive(conn, self._statement_s, "a statement")
                pending = False
            except (EOFError, OSError) as exc:
                raise ProjectionBusy(f"the projection service of {self.address.home} went away during "
                                     f"a query ({type(exc).__name__}; see {self.address.log})") from None
            return _frame(answer)

        try:
            yield fetch
        finally:
            if conn is not None:
                self._end_session(conn, pending)

    def _end_session(self, conn: Connection, broken: bool) -> None:
        if not broken:
            try:
                conn.send_bytes(b'{"end": true}')
            except (EOFError, OSError):
                broken = True
        if broken:
            conn.close()
        else:
            self._keep(conn)

    def _pooled(self) -> Connection | None:
        with self._idle_lock:
            if os.getpid() != self._pid:  # a forked child: those connections are its parent's
                self._idle, self._pid = [], os.getpid()
            return self._idle.pop() if self._idle else None

    def close(self) -> None:
        """Close the connections kept between sessions (the service itself goes on serving)."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
            mine = os.getpid() == self._pid
        if mine:  # a forked child's list holds its parent's connections: leave them to the parent
            for conn in idle:
                conn.close()

    def catch_up(self) -> int:
        """Wait until the service has folded everything on the bus now (the service waits at most
        this client's timeout_s, then ProjectionBusy says how far behind it is); the records it
        folded meanwhile."""
        return int(self._call({"op": "catch_up", "timeout_s": self.timeout_s}, self._open_s)["applied"])

    def rebuild(self) -> int:
        """Have the service drop its tables and fold the whole log again; the records folded. Waits
        as long as the rebuild takes (no deadline: it is the wait the caller asked for)."""
        return int(self._call({"op": "rebuild"}, None)["applied"])

    def stop(self, for_purge: bool = False) -> int | None:
        """Ask a running service to exit once its sessions end; its pid, or None when none runs
        (none, a killed one's socket, or one already exiting, which drops the connection).
        `for_purge`: a follower's process serves again once the purge lock is free (a service a
        reader started just exits)."""
        answer = self._ask("stop", **({"for": "purge"} if for_purge else {}))
        return None if answer is None else int(answer["pid"])

    def running(self) -> dict[str, Any] | None:
        """What `ping` answers, from the service that serves the home now; None when none does
        (none is started)."""
        return self._ask("ping")

    def _ask(self, op: str, **fields: Any) -> dict[str, Any] | None:
        """The answer of a running service to `op` (with `fields`), or None when none runs (none is started)."""
        try:
            conn = self._connect()
        except _GONE:
            return None
        try:
            conn.send_bytes(json.dumps({"op": op, **fields}).encode())
            answer = self._receive(conn, self._open_s, f"a {op} request")
        except (EOFError, OSError):
            return None
        finally:
            conn.close()
        return dict(json.loads(answer[1:])) if answer[:1] == JSON else None

    def ping(self) -> dict[str, Any]:
        """The service's pid, home, folded positions and readable directories (started if needed)."""
        return self._call({"op": "ping"}, self._open_s)

    def _call(self, request: dict[str, Any], bound_s: float | None) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            conn = self._open(request, answered=False)
            try:
                answer = self._receive(conn, bound_s, f"a {request['op']} request")
                break
            except _GONE:  # a stopping service drops what it did not begin: ask the next one
                if time.monotonic() > deadline:
                    raise ProjectionBusy(f"the projection service of {self.address.home} went away during "
                                         f"a {request['op']} request (see {self.address.log})") from None
            finally:
                conn.close()
        if answer[:1] != JSON:
            raise RuntimeError(f"the projection service answered {answer[:40]!r} to {request['op']}")
        found = json.loads(answer[1:])
        if isinstance(found, dict) and "error" in found:
            raise _error(answer)  # e.g. ProjectionBusy: the fold did not reach the bus in time
        return dict(found)

    def _open(self, request: dict[str, Any], answered: bool = True) -> Connection:
        """A connection to the service that accepted `request` (and, if `answered`, said ok)."""
        deadline = time.monotonic() + self.timeout_s
        started: Popen[bytes] | None = None
        pooled = self._pooled() if answered else None
        if pooled is not None:
            try:
                pooled.send_bytes(json.dumps(request).encode())
                answer = self._receive(pooled, self._open_s, "the opening of a session")
            except (EOFError, OSError):
                pooled.close()  # the service that kept it has exited: connect afresh
            else:
                if answer[:1] == JSON and json.loads(answer[1:]).get("ok"):
                    return pooled
                self._keep(pooled)
                raise _error(answer)
        while True:
            try:
                conn = self._connect()
                conn.send_bytes(json.dumps(request).encode())
                if not answered:
                    return conn
                try:
                    answer = self._receive(conn, self._open_s, "the opening of a session")
                except BaseException:
                    conn.close()
                    raise
                if answer[:1] == JSON and json.loads(answer[1:]).get("ok"):
                    return conn
                self._keep(conn)
                raise _error(answer)
            except _GONE:
                # no service, a dead one's socket, or one that is exiting (idle): have one started,
                # unless a follower waits for the home (it would leave the home to it at once)
                if self.start is None:
                    raise ProjectionBusy(f"no projection service answers for {self.address.home} "
                                         f"(socket {self.address.socket})") from None
                if not follower_waits(self.address) and (started is None or started.poll() is not None):
                    started = self.start()
            if time.monotonic() > deadline:
                raise ProjectionBusy(f"the projection service of {self.address.home} did not answer within "
                                     f"{self.timeout_s:g}s (see {self.address.log}); set RUNBUS_DB_TIMEOUT "
                                     f"to wait longer")
            time.sleep(_POLL_S)

    def _keep(self, conn: Connection) -> None:
        """Keep a connection between requests (a refused session leaves it so) for the next session."""
        with self._idle_lock:
            if len(self._idle) < _KEEP_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    @property
    def _handshake_s(self) -> float:
        return min(self.timeout_s, HANDSHAKE_S)

    @property
    def _open_s(self) -> float:
        return self.timeout_s + _MARGIN_S

    @property
    def _statement_s(self) -> float:
        return QUERY_TIMEOUT_S + _MARGIN_S

    def _connect(self) -> Connection:
        """An authenticated connection (the stdlib's challenge both ways, as `Client` does it), or
        ProjectionBusy when the service does not take it within the handshake bound. The bound stays
        on the socket: a read that gets no byte for that long fails (an answer stalled midway)."""
        key = read_key(self.address.key)
        if key is None:
            raise FileNotFoundError(self.address.key)
        bound = self._handshake_s
        with socket.socket(socket.AF_UNIX) as sock:
            bound_io(sock, bound)  # also bounds a connect() that waits for a full backlog
            try:
                sock.connect(str(self.address.socket))
            except BlockingIOError:
                raise self._stalled(None, "a connection", bound) from None
            conn = Connection(sock.detach())
        try:
            answer_challenge(conn, key)
            deliver_challenge(conn, key)
        except BlockingIOError:
            pid = peer_pid(conn)
            conn.close()
            raise self._stalled(pid, "the handshake", bound) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _receive(self, conn: Connection, bound_s: float | None, what: str) -> bytes:
        """The next message on `conn`, or ProjectionBusy (the connection closed) when none begins
        within `bound_s` (None: no deadline) or it stalls midway."""
        try:
            if bound_s is None:
                bound_io(conn, None)  # the handshake's bound stays on the socket: a rebuild may take minutes
                return conn.recv_bytes()
            if conn.poll(min(bound_s, _LONGEST_WAIT_S)):
                return conn.recv_bytes()
        except BlockingIOError:
            pass
        pid = peer_pid(conn)
        conn.close()
        raise self._stalled(pid, what, bound_s)

    def _stalled(self, pid: int | None, what: str, bound_s: float | None) -> ProjectionBusy:
        """The error of a reader whose service did not answer `what` in time."""
        who = f"the projection service of {self.address.home}" + (f" (pid {pid})" if pid else "")
        if what == "a statement":
            advice = f"a statement is interrupted after {QUERY_TIMEOUT_S:g}s, so the service is stopped or hung"
        else:
            advice = "it is stopped or hung, or set RUNBUS_DB_TIMEOUT to wait longer"
        return ProjectionBusy(f"{who} did not answer {what} within {bound_s or 0:g}s: {advice} "
                              f"(see {self.address.log})")


def _frame(answer: bytes) -> pd.DataFrame:
    if answer[:1] == FRAME:
        return to_frame(from_ipc(memoryview(answer)[1:]))
    raise _error(answer)


def _error(answer: bytes) -> Exception:
    if answer[:1] == JSON:
        return error_from_payload(answer[1:])
    return RuntimeError(f"the projection service answered {answer[:40]!r}")


def _plain(value: Any) -> Any:
    """JSON for query parameters: numbers and text as they are, numpy scalars as numbers, anything
    else (times) as ISO text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value.item() if hasattr(value, "item") else str(value)
