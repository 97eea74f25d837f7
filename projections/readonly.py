"""The read-only machinery every SQL surface runs user statements through: a sealed database
(`seal`), one statement of a read-only kind (`check_read_only`), a READ ONLY transaction that is
never committed, and a deadline per statement (`ReadOnlySession`, `read_only_tables`). Answers are
Arrow tables; `projections.query` turns them into DataFrames. No pandas here: the projection service
imports this.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from projections.database import from_user_statement
from projections.errors import QueryTimeout, ReadOnlyError

_READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}
READ_ONLY_SCHEME = "readonly"
QUERY_TIMEOUT_S = 60.0
"""Files a user opted in are read as `readonly:///<dir>/<file>` (see `seal`)."""

ARROW_TEXT = "SET GLOBAL arrow_large_buffer_size = true"
"""Text leaves DuckDB as Arrow large_string, what pandas' string dtype holds, so turning an answer
into a DataFrame (projections.wire) casts no column (a third of converting 100 runs). Set on every
projection connection from its start (the projector too: user projections see one type)."""

TableQuery = Callable[..., pa.Table]
"""`query(sql, params=None) -> pyarrow.Table`: the same, answered as Arrow (`read_only_tables`)."""


def check_read_only(query: str) -> duckdb.Statement:
    """The one SELECT/EXPLAIN statement in `query`; ReadOnlyError names any other kind.

    Only a friendly first refusal: what makes the surface read-only is `read_only_query`.
    """
    try:
        statements = _parsed(query) if len(query) <= _CACHED_QUERY_CHARS else tuple(duckdb.extract_statements(query))
    except duckdb.Error as exc:
        raise ValueError(f"SQL does not parse: {_first_line(exc)}") from None
    if not statements:
        raise ValueError("no SQL statement given")
    for statement in statements:
        kind = statement.type.name
        if kind not in _READ_ONLY_STATEMENTS:
            raise ReadOnlyError(f"the SQL surface is read-only: {kind} statements are refused "
                                f"({statement.query.strip()[:60]!r})")
    if len(statements) > 1:
        raise ReadOnlyError(f"the SQL surface is read-only and runs one statement at a time "
                            f"({len(statements)} given)")
    return statements[0]


_CACHED_QUERY_CHARS = 4096  # a longer text is parsed each time: a parse tree can take 15x its text


@lru_cache(maxsize=256)
def _parsed(query: str) -> tuple[duckdb.Statement, ...]:
    """The statements of `query` (a reader repeats its queries: parsing one was ~5% of answering it
    through the service). A parsed statement runs any number of times, on any cursor."""
    return tuple(duckdb.extract_statements(query))


def seal(con: duckdb.DuckDBPyConnection, readable_dirs: Sequence[str] = ()) -> None:
    """Close the database behind `con` to the outside for the rest of its life: no file read or
    written (COPY, EXPORT, ATTACH, read_csv...), no extension installed or loaded, and no setting
    changed afterwards. Tables can still be written by this process (the projector); user
    statements are kept from that by `read_only_query`.

    Files under `readable_dirs` can be read, never written, as `readonly:///<dir>/<file>`: DuckDB
    lets its allowed directories be written too, so they are only allowed through a filesystem
    that refuses every write, while their plain paths stay closed.
    """
    if con.execute("SELECT current_setting('lock_configuration')").fetchone() == (True,):
        return
    if readable_dirs:
        roots = [Path(d).resolve() for d in readable_dirs]
        con.register_filesystem(_read_only_files(roots))
        allowed = [f"{READ_ONLY_SCHEME}://{root}/" for root in roots]
        con.execute("SET allowed_directories = ?", [allowed])
    # no temp directory: DuckDB would add it to the allowed directories, where COPY could write
    for setting in ("SET GLOBAL TimeZone = 'UTC'", ARROW_TEXT, "SET temp_directory = ''",
                    "SET autoinstall_known_extensions = false",
                    "SET autoload_known_extensions = false", "SET allow_community_extensions = false",
                    "SET enable_external_access = false", "SET lock_configuration = true"):
        con.execute(setting)


class ReadOnlyFileError(PermissionError):
    """A statement tried to write through the `readonly://` filesystem."""


def _read_only_files(roots: Sequence[Path]) -> Any:
    """An fsspec local filesystem under the `readonly` scheme whose every write raises and that
    reaches nothing outside `roots`, symbolic links resolved."""
    from fsspec.implementations.local import LocalFileSystem

    def refuse(self: Any, path: Any = "", *args: Any, **kwargs: Any) -> None:
        raise ReadOnlyFileError(f"{READ_ONLY_SCHEME}:// files cannot be written ({path})")

    def inside(path: Any) -> str:
        real = Path(os.path.realpath(LocalFileSystem._strip_protocol(str(path).removeprefix(
            f"{READ_ONLY_SCHEME}://"))))
        if not any(real == root or root in real.parents for root in roots):
            raise ReadOnlyFileError(f"{READ_ONLY_SCHEME}:// reaches only the opted-in directories ({path})")
        return str(real)

    class ReadOnlyFiles(LocalFileSystem):  # type: ignore[misc]
        protocol = (READ_ONLY_SCHEME,)

        @classmethod
        def _strip_protocol(cls, path: Any) -> Any:
            return LocalFileSystem._strip_protocol(str(path).removeprefix(f"{READ_ONLY_SCHEME}://"))

        def _open(self, path: Any, mode: str = "rb", **kwargs: Any) -> Any:
            if set(mode) & set("wax+"):
                refuse(self, path)
            return super()._open(inside(path), mode=mode, **kwargs)

        def ls(self, path: Any, detail: bool = False, **kwargs: Any) -> Any:
            inside(path)
            return super().ls(path, detail=detail, **kwargs)

        def info(self, path: Any, **kwargs: Any) -> Any:
            inside(path)
            return super().info(path, **kwargs)

    for name in ("mkdir", "makedirs", "rm", "rm_file", "rmdir", "mv", "move", "rename", "touch", "cp_file",
                 "copy", "put", "put_file", "pipe_file", "link", "symlink", "chmod"):
        setattr(ReadOnlyFiles, name, refuse)
    return ReadOnlyFiles()


class ReadOnlySession:
    """One snapshot of the database behind `con`: a cursor of its own inside one READ ONLY
    transaction, so that several statements see the same state while another cursor writes.
    `fetch(sql, params=None) -> pyarrow.Table` answers one statement, treated as `read_only_query`
    treats it; after a failed one the session goes on in a new transaction (DuckDB aborts the
    failed one). `close` rolls the transaction back. `sealed`: the caller sealed the database
    already (the projection service), so it is not checked again.

    `reusable`: every statement was a SELECT that answered in time, so the session holds nothing a
    statement left behind and another request may go on in it. Any other statement (an EXPLAIN)
    runs on a cursor of its own (see `_apart`); the session is not kept after one all the same. A
    SELECT can set the random seed (setseed, also through query()): the next requests on the
    session draw random() from it. That is left so: every reader of a home is its owner, and
    DuckDB's random() is no secret anyway."""

    def __init__(self, con: duckdb.DuckDBPyConnection, timeout_s: float = QUERY_TIMEOUT_S, *,
                 sealed: bool = False, begin: Callable[[duckdb.DuckDBPyConnection], None] | None = None) -> None:
        """`begin` begins the session's READ ONLY transaction on its cursor (default: BEGIN alone; the
        projection service's also takes the snapshot then, see ProjectionService._begin_whole); after
        a failed statement the next statement begins a new one with it."""
        self.timeout_s = timeout_s
        self.reusable = True
        self.began = time.monotonic()  # DuckDB's now() is the time its transaction began
        self._begin = begin or _begin_read_only
        self._cursor = con.cursor()  # before anything else: another thread may be using `con` (the projector)
        try:
            if not sealed:
                seal(self._cursor)
            self._begin(self._cursor)
        except BaseException:
            self._cursor.close()
            raise
        self._begun = True

    def fetch(self, query: str, params: Sequence[Any] | None = None) -> pa.Table:
        statement = check_read_only(query)
        if statement.type.name != "SELECT":
            self.reusable = False
            return self._apart(statement, params)
        if not self._begun:  # a statement failed: its transaction was rolled back
            self._begin(self._cursor)
            self._begun = True
        try:
            table, in_time = _read_only_statement(self._cursor, statement, params, self.timeout_s)
        except BaseException:
            self.reusable = False
            self._begun = False
            with suppress(duckdb.Error):
                self._cursor.execute("ROLLBACK")
            raise
        # the deadline fired as the statement ended: its interrupt may still reach the next statement
        self.reusable = self.reusable and in_time
        return table

    def _apart(self, statement: duckdb.Statement, params: Sequence[Any] | None) -> pa.Table:
        """A statement that is not a SELECT (an EXPLAIN, whose ANALYZE runs the statement it wraps)
        on a cursor of its own, in a READ ONLY transaction of its own that is rolled back before the
        cursor is closed. EXPLAIN ANALYZE COMMIT ends the transaction it runs in: on the session's
        cursor, the session's next statements ran outside any (and could write). Its snapshot is
        its own, taken when it begins."""
        cursor = self._cursor.cursor()
        try:
            self._begin(cursor)
            return _read_only_statement(cursor, statement, params, self.timeout_s)[0]
        finally:
            with suppress(duckdb.Error):  # it may have ended its transaction itself
                cursor.execute("ROLLBACK")
            cursor.close()

    def close(self) -> None:
        with suppress(duckdb.Error):  # a statement may have ended the transaction itself
            self._cursor.execute("ROLLBACK")
        self._cursor.close()


def _begin_read_only(cursor: duckdb.DuckDBPyConnection) -> None:
    cursor.execute("BEGIN TRANSACTION READ ONLY")


@contextmanager
def read_only_tables(con: duckdb.DuckDBPyConnection, timeout_s: float = QUERY_TIMEOUT_S, *,
                     sealed: bool = False) -> Iterator[TableQuery]:
    """One `ReadOnlySession` of `con` for the block: yields its `fetch`, closed at the end."""
    session = ReadOnlySession(con, timeout_s, sealed=sealed)
    try:
        yield session.fetch
    finally:
        session.close()


def _read_only_statement(session: duckdb.DuckDBPyConnection, statement: duckdb.Statement,
                         params: Sequence[Any] | None, timeout_s: float) -> tuple[pa.Table, bool]:
    """The answer to `statement`, the one `check_read_only` parsed (what was checked is what runs,
    and the text is not parsed twice), and whether it came before its deadline fired."""
    shown = " ".join(statement.query.split())[:120]
    deadline = _DEADLINES.arm(session, timeout_s)
    try:
        # a relation answers in Arrow without the copy a DB-API result makes
        table = session.sql(statement, params=list(params)).to_arrow_table() if params else \
            session.sql(statement).to_arrow_table()
    except duckdb.InterruptException:
        raise QueryTimeout(f"the query ran longer than {timeout_s:g}s and was stopped (in {shown!r})") from None
    except (duckdb.TransactionException, duckdb.PermissionException) as exc:
        raise ReadOnlyError(f"the SQL surface is read-only: {_first_line(exc)} (in {shown!r})") from None
    except duckdb.InvalidInputException as exc:
        if "configuration has been locked" in str(exc):
            raise ReadOnlyError(f"the SQL surface is read-only: settings cannot be changed (in {shown!r})") from None
        raise from_user_statement(_one_line(exc, shown)) from None
    except duckdb.Error as exc:
        if ReadOnlyFileError.__name__ in str(exc):
            raise ReadOnlyError(f"the SQL surface is read-only: {_first_line(exc)} (in {shown!r})") from None
        raise from_user_statement(_one_line(exc, shown)) from None
    finally:
        in_time = _DEADLINES.disarm(deadline)
    return table, in_time


class _Deadlines:
    """One thread that interrupts the statements still running at their deadline (a timer thread
    per statement would cost a thread start on every query)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the thread and the lock's holder are the parent's

    def _reset(self) -> None:
        self._changed = threading.Condition()
        self._armed: dict[int, tuple[float, duckdb.DuckDBPyConnection]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")  # when the watching thread looks next

    def arm(self, session: duckdb.DuckDBPyConnection, timeout_s: float) -> int:
        """Interrupt `session` in `timeout_s` unless disarmed by then; the token to disarm it with."""
        with self._changed:
            token = next(self._tokens)
            due = time.monotonic() + timeout_s
            self._armed[token] = (due, session)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="runbus-query-deadlines", daemon=True)
                self._thread.start()
            if due < self._wake_at:  # otherwise the thread looks before this one is due anyway
                self._changed.notify()
            return token

    def disarm(self, token: int) -> bool:
        """Forget the deadline of `token`; False when it had fired already."""
        with self._changed:
            return self._armed.pop(token, None) is not None

    def _watch(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for token, (due, session) in list(self._armed.items()):
                    if due <= now:
                        del self._armed[token]
                        with suppress(duckdb.Error):
                            session.interrupt()
                self._wake_at = min((due for due, _ in self._armed.values()), default=now + 3600.0)
                self._changed.wait(max(0.0, self._wake_at - now))


_DEADLINES = _Deadlines()


def _one_line(exc: duckdb.Error, statement: str) -> duckdb.Error:
    """The same kind of DuckDB error, its message on one line naming the statement."""
    message = f"{_first_line(exc)} (in {statement!r})"
    try:
        return type(exc)(message)
    except TypeError:  # an error class that takes more than a message
        return duckdb.Error(message)


def _first_line(exc: BaseException) -> str:
    """The line that says what went wrong (the last, for a Python traceback relayed by DuckDB)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if lines[0].startswith("Traceback (most recent call last)") else lines[0]

