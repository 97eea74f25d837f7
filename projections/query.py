"""The query API (`RunDB`) and the read-only machinery every SQL surface runs statements through.

A RunDB answers from the home's projection service (`source`, the default) or, in a process that
uses the projection alone (RUNBUS_PROJECTION=inprocess), by locking the file, folding what is new
and answering itself. Either way a statement runs in a READ ONLY transaction on a sealed database
and its Arrow answer becomes a DataFrame through `projections.wire.to_frame`.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pandas as pd
import pyarrow as pa

from producers.bus import Bus
from projections.database import from_user_statement, open_projection
from projections.errors import QueryTimeout, ReadOnlyError
from projections.projector import Projector
from projections.replay import stored_events
from projections.run_query import RunFilter, RunOrder, ValueColumnCache, find_runs, label_filters
from projections.user import UserProjection
from projections.wire import to_frame
from schemas import EventCodec

__all__ = ["QueryTimeout", "ReadOnlyError", "RunDB", "check_read_only", "read_only_query", "read_only_session",
           "read_only_tables", "resolve_uid", "seal"]

_READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}
READ_ONLY_SCHEME = "readonly"
QUERY_TIMEOUT_S = 60.0
"""Files a user opted in are read as `readonly:///<dir>/<file>` (see `seal`)."""

Query = Callable[..., pd.DataFrame]
"""`query(sql, params=None) -> DataFrame`: one read-only query in a `RunDB.reader()` session."""
TableQuery = Callable[..., pa.Table]
"""`query(sql, params=None) -> pyarrow.Table`: the same, answered as Arrow (`read_only_tables`)."""
Statement = tuple[str, "Sequence[Any] | None"]
"""(sql, params) of one statement of a batch (`RunDB.answer`)."""


def check_read_only(query: str) -> duckdb.Statement:
    """The one SELECT/EXPLAIN statement in `query`; ReadOnlyError names any other kind.

    Only a friendly first refusal: what makes the surface read-only is `read_only_query`.
    """
    try:
        statements = duckdb.extract_statements(query)
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
    for setting in ("SET GLOBAL TimeZone = 'UTC'", "SET temp_directory = ''",
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


def read_only_query(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] | None = None,
                    timeout_s: float = QUERY_TIMEOUT_S) -> pd.DataFrame:
    """Run one user statement so that it cannot change anything: on a sealed database (`seal`),
    in a session of its own, inside a READ ONLY transaction that is always rolled back; it is
    interrupted after `timeout_s` (a query must not hold the projection, or the UI, forever).

    A refusal raises ReadOnlyError; any other DuckDB error keeps its class. Either way the
    message is one line naming the statement.
    """
    with read_only_session(con, timeout_s) as fetch:  # the session checks the statement first
        return fetch(query, params)


@contextmanager
def read_only_session(con: duckdb.DuckDBPyConnection, timeout_s: float = QUERY_TIMEOUT_S) -> Iterator[Query]:
    """One snapshot of the database behind `con`: yields `query(sql, params=None) -> DataFrame`
    (see `read_only_tables`)."""
    with read_only_tables(con, timeout_s) as fetch_table:
        yield lambda query, params=None: to_frame(fetch_table(query, params))


@contextmanager
def read_only_tables(con: duckdb.DuckDBPyConnection, timeout_s: float = QUERY_TIMEOUT_S, *,
                     sealed: bool = False) -> Iterator[TableQuery]:
    """One snapshot of the database behind `con`: yields `query(sql, params=None) -> pyarrow.Table`,
    every statement answered on one cursor inside one READ ONLY transaction (so several statements
    see the same state while another cursor writes), rolled back at the end. Each statement is
    treated as `read_only_query` treats it; after a failed one the session goes on in a new
    transaction (DuckDB aborts the failed one). `sealed`: the caller sealed the database already
    (the projection service, per request), so it is not checked again."""
    session = con.cursor()  # before anything else: another thread may be using `con` (the projector)
    if not sealed:
        seal(session)

    def fetch(query: str, params: Sequence[Any] | None = None) -> pa.Table:
        check_read_only(query)
        try:
            return _read_only_statement(session, query, params, timeout_s)
        except BaseException:
            with suppress(duckdb.Error):
                session.execute("ROLLBACK")
            session.execute("BEGIN TRANSACTION READ ONLY")
            raise

    try:
        session.execute("BEGIN TRANSACTION READ ONLY")
        yield fetch
    finally:
        with suppress(duckdb.Error):  # a statement may have ended the transaction itself
            session.execute("ROLLBACK")
        session.close()


def _read_only_statement(session: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] | None,
                         timeout_s: float) -> pa.Table:
    shown = " ".join(query.split())[:120]
    deadline = _DEADLINES.arm(session, timeout_s)
    try:
        # a relation answers in Arrow without the copy a DB-API result makes
        return session.sql(query, params=list(params)).to_arrow_table() if params else \
            session.sql(query).to_arrow_table()
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
        _DEADLINES.disarm(deadline)


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

    def disarm(self, token: int) -> None:
        with self._changed:
            self._armed.pop(token, None)

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


class SnapshotSource(Protocol):
    """Where a RunDB's reads are answered when this process does not fold the projection itself
    (the projection service's client, projections.client.ServiceClient)."""

    def snapshot(self, as_of: int | datetime | str | None = None) -> AbstractContextManager[Query]:
        """One consistent read session that sees every event on the bus when it began."""

    def answer(self, statements: Sequence[Statement], as_of: int | datetime | str | None = None) -> list[pd.DataFrame]:
        """The answers to `statements`, all from one snapshot that sees every event on the bus
        now, in one request; the first failing statement's error is raised."""

    def catch_up(self) -> int:
        """Wait until everything on the bus now is folded; the records folded meanwhile."""


class RunDB:
    """Runs, params, results, metrics, labels and artifacts as projected from the bus."""

    def __init__(self, bus: Bus, db_path: str | os.PathLike[str], codec: EventCodec | None = None,
                 lock_timeout_s: float = 60.0, user_projections: Sequence[UserProjection] = (),
                 as_of: int | datetime | str | None = None, *, source: SnapshotSource | None = None,
                 readable_dirs: Sequence[str] = ()) -> None:
        """`as_of`: answer from the tables as they were at that events.position (an int) or time.
        `source`: answer every read there (the projection service); None: fold in this process.
        `readable_dirs` (folding in this process only; the service has its own): SQL may read,
        never write, the files under them as `readonly:///<dir>/<file>`."""
        self.bus = bus
        self.db_path = db_path
        self.codec = codec or EventCodec()
        self.lock_timeout_s = lock_timeout_s
        self.user_projections = list(user_projections)
        self.as_of = as_of
        self.source = source
        self.readable_dirs = [str(Path(d).resolve()) for d in readable_dirs]
        self.remembered_columns = ValueColumnCache()

    def _projector(self, con: duckdb.DuckDBPyConnection) -> Projector:
        return Projector(self.bus, con, self.codec, user_projections=self.user_projections)

    @contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The projection, caught up with the bus, held for the duration of the block."""
        if self.as_of is not None:
            with self._as_of_connection() as con:
                yield con
            return
        with self._live() as con:
            yield con

    @contextmanager
    def _live(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The projection file, locked, opened (sealed) and caught up with the bus."""
        with open_projection(self.db_path, self.lock_timeout_s) as con:
            projector = self._projector(con)  # prepares the tables, which a sealed database refuses
            if self.readable_dirs:
                seal(con, self.readable_dirs)
            projector.catch_up()
            yield con

    @contextmanager
    def reader(self) -> Iterator[Query]:
        """One read session: yields `query(sql, params=None) -> DataFrame` over one caught-up view.

        Every query of one block sees the same state. With a `source` (the projection service)
        the block is one session there, each query a round trip; otherwise the file is opened
        (locked) and folded for the duration of the block. A fixed list of statements is cheaper
        through `answer` (one request).
        """
        if self.source is not None:
            with self.source.snapshot(self.as_of) as fetch:
                yield fetch
            return
        with self.connection() as con, read_only_session(con) as local_query:
            yield local_query

    def answer(self, statements: Sequence[Statement]) -> list[pd.DataFrame]:
        """The answers to `statements` (sql, params), all from one snapshot: one request to the
        projection service, or one session here. The first failing statement's error is raised."""
        if self.source is not None:
            return self.source.answer(statements, self.as_of)
        with self.reader() as fetch:
            return [fetch(query, params) for query, params in statements]

    @contextmanager
    def _as_of_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A temporary in-memory projection of the events up to `as_of`; the live one is only read."""
        where, params = _cutoff(self.as_of)
        past = duckdb.connect(":memory:")
        try:
            replay = self._projector(past)
            with self._live() as live:
                for chunk in stored_events(live, where, params):
                    replay.apply_events(chunk)
            yield past
        finally:
            past.close()

    def catch_up(self) -> int:
        """Fold (or wait until the service has folded) everything on the bus now; records folded."""
        if self.source is not None:
            return self.source.catch_up()
        with open_projection(self.db_path, self.lock_timeout_s) as con:
            return self._projector(con).catch_up()

    def sql(self, query: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read-only SQL query over the projection tables."""
        return self.answer([(query, params)])[0]

    def list_runs(self, name: str | None = None, project: str | None = None,
                  labels: Mapping[str, str] | Sequence[str] | None = None,
                  state: str | None = None, since: datetime | str | None = None,
                  until: datetime | str | None = None, parent: str | None = None,
                  sort_by: str | None = None, limit: int | None = None,
                  iterations: bool = True) -> pd.DataFrame:
        """Runs matching every filter given, newest first unless `sort_by` says otherwise.

        `labels` is a mapping or a list of "key" / "key=value" strings. `sort_by` is a runs
        column, or `result.<key>` / `param.<key>`; prefix it with '-' for descending order.
        The query is `projections.run_query`'s, the one the UI's runs page uses.
        """
        run_filter = RunFilter(name=name, project=project, labels=label_filters(labels), state=state,
                               since=since, until=until, parent=parent, top_level=not iterations)
        order = RunOrder.parse(sort_by)
        with self.reader() as fetch:
            return find_runs(fetch, run_filter, order, limit, cache=self.remembered_columns)

    def read_run(self, uid: str) -> dict[str, Any]:
        """Everything known about one run, from one snapshot; `uid` may be a unique prefix. With
        the run's columns (`note` among them): params, results, artifacts, the last value of each
        metric, and `amendments`, the history of its edits, oldest first (position, ts,
        amended_by, labels, removed_labels, note)."""
        # one request: every statement names the run by the prefix, the first says what it matches
        run_uids = _MATCHING_UIDS.format(column="uid")
        matches, runs, params, results, artifacts, last, edits = self.answer([
            (_MATCHES, [uid]),
            (f"SELECT * FROM runs WHERE {run_uids}", [uid]),
            (f"SELECT key, value FROM params WHERE {run_uids} ORDER BY key", [uid]),
            (f"SELECT key, value FROM results WHERE {run_uids} ORDER BY key", [uid]),
            (f"SELECT key, kind, uri, sha256, size, format, labels, meta FROM artifacts WHERE {run_uids} "
             "ORDER BY key", [uid]),
            (f"SELECT key, arg_max(value, rowid) AS value FROM metrics WHERE {run_uids} GROUP BY key ORDER BY key",
             [uid]),
            (f"SELECT position, ts, amended_by, labels, removed_labels, note FROM amendments WHERE {run_uids} "
             "ORDER BY position", [uid])])
        _one_match(matches.uid.tolist(), uid)
        run: dict[str, Any] = runs.iloc[0].to_dict()
        for column in ("labels", "inputs", "extra", "return_value"):
            if isinstance(run.get(column), str):
                run[column] = json.loads(run[column])
        for table, rows in (("params", params), ("results", results)):
            run[table] = {key: json.loads(value) for key, value in zip(rows.key, rows.value, strict=True)}
        run["artifacts"] = [{**row, "labels": json.loads(row["labels"]), "meta": json.loads(row["meta"])}
                            for row in artifacts.to_dict("records")]
        run["metrics"] = dict(zip(last.key.tolist(), last.value.tolist(), strict=True))
        run["amendments"] = [{**row, "labels": json.loads(row["labels"] or "{}"),
                              "removed_labels": json.loads(row["removed_labels"] or "[]")}
                             for row in edits.to_dict("records")]
        return run

    def get_log(self, uid: str, offset: int = 0) -> tuple[str, str]:
        """(state, text), as MLRun's get_log: the run's state and its console output from character
        `offset` on. The text is the run's lines (stdout, stderr and its logger, in the order they
        were logged), each ending with "\n"; a caller that follows the log adds len(text) to
        `offset`. `uid` may be a unique prefix (KeyError naming it otherwise)."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"get_log: offset must be a character count (an int >= 0), not {offset!r}")
        run_uids = _MATCHING_UIDS.format(column="uid")
        matches, states, rows = self.answer([
            (_MATCHES, [uid]),
            (f"SELECT state FROM runs WHERE {run_uids}", [uid]),
            (f"""SELECT text, ends FROM (
                    SELECT line_no, text, sum(length(text) + 1) OVER (ORDER BY line_no) AS ends
                    FROM logs WHERE {run_uids})
                WHERE ends > ? ORDER BY line_no""", [uid, offset])])
        _one_match(matches.uid.tolist(), uid)
        state = str(states.state.iloc[0])
        if rows.empty:
            return state, ""
        text = "".join(line + "\n" for line in rows.text)
        start = int(rows.ends.iloc[0]) - len(rows.text.iloc[0]) - 1  # where the first line begins
        return state, text[max(0, offset - start):]

    def log_lines(self, uid: str, after: int = 0, limit: int = 10_000) -> tuple[str, str, pd.DataFrame]:
        """(full uid, state, lines): the run's log lines numbered above `after` (line_no, stream,
        ts, text), at most `limit` of them, for a reader that follows the log line by line."""
        with self.reader() as fetch:
            full_uid = resolve_uid(fetch, uid)
            state = str(fetch("SELECT state FROM runs WHERE uid = ?", [full_uid]).state.iloc[0])
            lines = fetch("SELECT line_no, stream, ts, text FROM logs WHERE uid = ? AND line_no > ? "
                          "ORDER BY line_no LIMIT ?", [full_uid, int(after), int(limit)])
        return full_uid, state, lines


def _cutoff(as_of: int | datetime | str | None) -> tuple[str, list[Any]]:
    if isinstance(as_of, bool):
        raise TypeError("as_of must be an events.position (int) or a time")
    if isinstance(as_of, int):
        return "position <= ?", [as_of]
    if isinstance(as_of, str) and as_of.strip().lstrip("-").isdigit():
        return "position <= ?", [int(as_of)]
    try:
        moment = pd.Timestamp(as_of)
    except (ValueError, TypeError):
        raise ValueError(f"as_of {as_of!r} is neither an events.position nor a time") from None
    if moment.tzinfo is None:
        moment = moment.tz_localize("UTC")
    return "ts <= ?::TIMESTAMPTZ", [moment.isoformat()]


_MATCHES = "SELECT uid FROM runs WHERE starts_with(uid, ?) LIMIT 2"
# a statement of a batch that reads one run by a uid prefix (when the prefix matches several, the
# batch's answer is refused by `_one_match`)
_MATCHING_UIDS = "{column} IN (SELECT uid FROM runs WHERE starts_with(uid, ?) LIMIT 2)"


def resolve_uid(fetch: Query, uid: str) -> str:
    """The full uid of the run whose uid starts with `uid`; KeyError if none or several."""
    return _one_match(fetch(_MATCHES, [uid]).uid.tolist(), uid)


def _one_match(matches: list[str], uid: str) -> str:
    if not matches:
        raise KeyError(f"no run with uid {uid!r}")
    if len(matches) > 1:
        raise KeyError(f"uid prefix {uid!r} matches more than one run; give more characters")
    return matches[0]
