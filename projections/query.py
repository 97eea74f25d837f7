"""The query API (`RunDB`), over the read-only machinery of `projections.readonly`.

A RunDB answers from the home's projection service (`source`, the default) or, in a process that
uses the projection alone (RUNBUS_PROJECTION=inprocess), by locking the file, folding what is new
and answering itself. Either way a statement runs in a READ ONLY transaction on a sealed database
and its Arrow answer becomes a DataFrame through `projections.wire.to_frame`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import duckdb

from producers.bus import Bus
from projections.as_of import cutoff as _cutoff
from projections.database import open_projection
from projections.errors import QueryTimeout, ReadOnlyError
from projections.projector import Projector
from projections.readonly import (
    QUERY_TIMEOUT_S,
    READ_ONLY_SCHEME,
    ReadOnlyFileError,
    TableQuery,
    check_read_only,
    read_only_tables,
    seal,
)
from projections.replay import stored_events
from projections.run_query import RunFilter, RunOrder, ValueColumnCache, find_runs, label_filters
from projections.user import UserProjection
from projections.wire import to_frame
from schemas import EventCodec

__all__ = ["QUERY_TIMEOUT_S", "READ_ONLY_SCHEME", "QueryTimeout", "ReadOnlyError", "ReadOnlyFileError", "RunDB",
           "TableQuery", "check_read_only", "read_only_query", "read_only_session", "read_only_tables",
           "resolve_uid", "seal"]

if TYPE_CHECKING:  # readers get DataFrames (pandas imported on the first conversion, projections.wire)
    import pandas as pd

Query = Callable[..., "pd.DataFrame"]
"""`query(sql, params=None) -> DataFrame`: one read-only query in a `RunDB.reader()` session."""
Statement = tuple[str, "Sequence[Any] | None"]
"""(sql, params) of one statement of a batch (`RunDB.answer`)."""


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
        `parent` is the uid runs name as their parent, or a unique prefix of a run's uid (KeyError
        when it is neither, or names several). The query is `projections.run_query`'s, the one the UI's runs page uses.
        """
        run_filter = RunFilter(name=name, project=project, labels=label_filters(labels), state=state,
                               since=since, until=until, parent=parent, top_level=not iterations)
        order = RunOrder.parse(sort_by)
        with self.reader() as fetch:
            if parent:
                if not isinstance(parent, str):
                    raise KeyError(f"parent must be a run uid (or a unique prefix of it), got {parent!r}")
                # a parent some run names as it is (even one with no row: a foreign iteration's), or a prefix
                if fetch("SELECT 1 FROM runs WHERE parent_uid = ? LIMIT 1", [parent]).empty:
                    found = _one_match(fetch(_MATCHES, [parent]).uid.tolist(), parent)
                    run_filter = dataclasses.replace(run_filter, parent=found)
            return find_runs(fetch, run_filter, order, limit, cache=self.remembered_columns)

    def read_run(self, uid: str) -> dict[str, Any]:
        """Everything known about one run, from one snapshot; `uid` may be a unique prefix. With
        the run's columns (`note` among them): params, results, artifacts, the last value of each
        metric, and `amendments`, the history of its edits, oldest first (position, ts,
        amended_by, labels, removed_labels, note). KeyError when `uid` is not text or names no run
        or several."""
        check_uid(uid)
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


_MATCHES = "SELECT uid FROM runs WHERE starts_with(uid, ?) LIMIT 2"
# a statement of a batch that reads one run by a uid prefix (when the prefix matches several, the
# batch's answer is refused by `_one_match`)
_MATCHING_UIDS = "{column} IN (SELECT uid FROM runs WHERE starts_with(uid, ?) LIMIT 2)"


def resolve_uid(fetch: Query, uid: str) -> str:
    """The full uid of the run whose uid starts with `uid`; KeyError if none or several."""
    return _one_match(fetch(_MATCHES, [uid]).uid.tolist(), uid)


def check_uid(uid: object) -> str:
    """`uid` when it is non-empty text (a run's uid or a prefix of it); KeyError saying so otherwise."""
    if not isinstance(uid, str) or not uid:
        raise KeyError(f"run uid must be non-empty text, got {uid!r}")
    return uid


def _one_match(matches: list[str], uid: str) -> str:
    if not matches:
        raise KeyError(f"no run with uid {uid!r}")
    if len(matches) > 1:
        raise KeyError(f"uid prefix {uid!r} matches more than one run; give more characters")
    return matches[0]
