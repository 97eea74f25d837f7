"""Filtering and sorting runs: the one query behind `RunDB.list_runs` and the UI's runs page.

It reads `runs_wide` (one row a run, numeric params and results as columns; see projections.tables),
so a filter or a sort on a param or a result reads one table. A key without a column (never numeric,
or one runs_wide could not give a column) is read from `params`/`results` instead. Every value a
caller gives goes into the SQL as a bound parameter; a param or result key is named in the SQL only
as the quoted identifier of a column listed in `runs_wide_columns`.
"""

from __future__ import annotations

import operator
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import duckdb

from projections.tables import RUN_COLUMNS, VALUE_TABLES, quoted

if TYPE_CHECKING:  # readers get DataFrames (pandas imported on the first conversion, projections.wire)
    import pandas as pd

Fetch = Callable[..., "pd.DataFrame"]
"""`fetch(sql, params=None) -> DataFrame`: one read-only query (a `RunDB.reader()` session)."""

STATES = ("running", "completed", "error", "aborted", "lost")
SORTABLE_RUN_COLUMNS = ("uid", "parent_uid", "iteration", "project", "name", "state", "handler", "runtime",
                        "host", "started_at", "finished_at", "duration_s", "last_event_at")
VALUE_OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "~")
_VALUE_FILTER = re.compile(r"^\s*(result|param)\.(.+?)\s*(<=|>=|!=|=|<|>|~)\s*(.*?)\s*$")
_SQL_OPERATORS = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


@dataclass(frozen=True)
class ValueFilter:
    """`<kind>.<key> <op> <value>` on a param or result: a number compares numerically, text with
    = / != compares the value as text, ~ is a case-insensitive "contains"."""

    kind: str   # "param" or "result"
    key: str
    op: str
    value: str

    @staticmethod
    def parse(text: str) -> ValueFilter:
        """'result.loss < 0.5'; ValueError names a filter that does not parse."""
        match = _VALUE_FILTER.match(text)
        if not match:
            raise ValueError(f"filter {text!r} must look like 'result.<key> <op> <value>' or "
                             f"'param.<key> <op> <value>' with op one of {' '.join(VALUE_OPERATORS)}")
        kind, key, op, value = match.groups()
        found = ValueFilter(kind, key, op, value)
        if op not in ("=", "!=", "~") and found.number() is None:
            raise ValueError(f"filter {text!r}: {op} needs a number")
        return found

    def number(self) -> float | None:
        try:
            return float(self.value)
        except ValueError:
            return None

    def text(self) -> str:
        """The value without the quotes around it, if any."""
        raw = self.value
        return raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"" else raw


@dataclass(frozen=True)
class RunFilter:
    """Which runs: every condition given must hold."""

    name: str | None = None            # exactly this name
    name_contains: str | None = None   # case-insensitive substring of the name (no wildcards)
    project: str | None = None
    state: str | None = None
    parent: str | None = None          # iterations of this sweep (parent_uid)
    labels: tuple[tuple[str, str | None], ...] = ()   # (key, value) or (key, None): has the label
    values: tuple[ValueFilter, ...] = ()
    since: datetime | str | None = None   # started at or after
    until: datetime | str | None = None   # started before
    top_level: bool = False            # leave sweep iterations out

    def __post_init__(self) -> None:
        """ValueError naming a state that does not exist, or a since/until that is not a time (text
        is ISO 8601, kept as Python reads it: '2026-11-29', '2026-11-29T10:00:00Z')."""
        if self.state not in (None, "") and self.state not in STATES:
            raise ValueError(f"state {self.state!r} is not one of {', '.join(STATES)}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if isinstance(value, str) and value:
                try:
                    parsed = datetime.fromisoformat(value)
                except ValueError:
                    raise ValueError(f"{name} {value!r} is not a time: give a datetime or ISO 8601 text such as "
                                     "'2026-11-29' or '2026-11-29T10:00:00Z'") from None
                object.__setattr__(self, name, parsed.isoformat())
            elif value is not None and value != "" and not isinstance(value, datetime):
                raise TypeError(f"{name} must be a datetime or ISO 8601 text, got {type(value).__name__}")


@dataclass(frozen=True)
class RunOrder:
    """A sort: a runs column, or `param.<key>` / `result.<key>`; '-' in front sorts descending."""

    column: str = "started_at"
    descending: bool = True

    @staticmethod
    def parse(sort_by: str | Sequence[str] | None) -> RunOrder:
        """'-result.loss' (or ['-result.loss'], MLflow's order_by) -> RunOrder('result.loss', True);
        None or '' -> newest first. ValueError names a column that cannot be sorted on."""
        if isinstance(sort_by, (list, tuple)) and len(sort_by) <= 1:
            sort_by = sort_by[0] if sort_by else None
        if sort_by is not None and not isinstance(sort_by, str):
            raise TypeError(f"sort_by must be one column as text (e.g. '-result.loss'), got {sort_by!r}")
        if not sort_by:
            return RunOrder()
        column = sort_by.lstrip("-")
        if column not in SORTABLE_RUN_COLUMNS and not _value_key(column):
            raise ValueError(f"cannot sort by {column!r}: use one of {', '.join(SORTABLE_RUN_COLUMNS)}, "
                             f"result.<key> or param.<key>")
        return RunOrder(column, sort_by.startswith("-"))

    def text(self) -> str:
        return ("-" if self.descending else "") + self.column


def label_filters(labels: Mapping[str, str] | Sequence[str] | str | None) -> tuple[tuple[str, str | None], ...]:
    """A mapping, or "key" / "key=value" strings, as (key, value or None) pairs."""
    if labels is None:
        return ()
    if isinstance(labels, Mapping):
        return tuple((str(k), str(v)) for k, v in labels.items())
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, (list, tuple, set, frozenset)) or not all(isinstance(item, str) for item in labels):
        raise TypeError(f"labels must be a mapping or a list of 'key' / 'key=value' strings, got {labels!r}")
    pairs: list[tuple[str, str | None]] = []
    for item in labels:
        key, sep, value = item.partition("=")
        pairs.append((key, value if sep else None))
    return tuple(pairs)


def _value_key(column: str) -> tuple[str, str] | None:
    kind, sep, key = column.partition(".")
    return (kind, key) if sep and kind in VALUE_TABLES and key else None


@dataclass
class _Sql:
    """A statement being built: SQL text pieces and their bound arguments, in order."""

    joins: list[str]
    join_args: list[Any]
    where: list[str]
    where_args: list[Any]

    def clause(self) -> str:
        return f" WHERE {' AND '.join(self.where)}" if self.where else ""


class ValueColumnCache:
    """The runs_wide columns of (kind, key) pairs, remembered between the queries of one reader so a
    filter or sort on a value does not look its column up each time. A column can go (the fold
    drops it when a key differing only in case comes: DuckDB matches a quoted name whatever its
    case) and a rebuild makes them anew: a query built on remembered columns names each by exactly
    its name (see RunQuery._column), so it fails to bind when one is not there so; `find_runs` and
    `count_runs` then forget them and look the columns up again."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def columns_of(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str] | None:
        """The columns of every key, or None when one of them is not remembered."""
        with self._lock:
            if all(key in self._known for key in keys):
                return {key: self._known[key] for key in keys}
        return None

    def remember(self, columns: Mapping[tuple[str, str], str]) -> None:
        with self._lock:
            self._known.update(columns)

    def forget(self) -> None:
        with self._lock:
            self._known.clear()


class RunQuery:
    """SQL for one filter and order over runs_wide, with the columns the keys named have."""

    def __init__(self, run_filter: RunFilter, order: RunOrder, columns: Mapping[tuple[str, str], str],
                 remembered: bool = False) -> None:
        """`columns`: (kind, key) -> runs_wide column, for the keys the filter and order name.
        `remembered`: they came from a ValueColumnCache (they may be gone after a rebuild)."""
        self.filter = run_filter
        self.order = order
        self.columns = dict(columns)
        self.remembered = remembered

    @staticmethod
    def keys_named(run_filter: RunFilter, order: RunOrder) -> list[tuple[str, str]]:
        """The (kind, key) pairs the query needs a column for."""
        keys = [(f.kind, f.key) for f in run_filter.values]
        named = _value_key(order.column)
        return [*keys, named] if named else keys

    @classmethod
    def build(cls, fetch: Fetch, run_filter: RunFilter, order: RunOrder,
              cache: ValueColumnCache | None = None) -> RunQuery:
        """The query, with the columns of its keys taken from `cache` when it remembers them all,
        else looked up through `fetch` (and remembered in `cache`)."""
        keys = cls.keys_named(run_filter, order)
        if not keys:
            return cls(run_filter, order, {})
        remembered = cache.columns_of(keys) if cache is not None else None
        if remembered is not None:
            return cls(run_filter, order, remembered, remembered=True)
        frame = fetch('SELECT kind, key, "column" FROM runs_wide_columns WHERE '
                      + " OR ".join(["(kind = ? AND key = ?)"] * len(keys)),
                      [part for pair in keys for part in pair])
        columns = {(kind, key): column for kind, key, column in frame.itertuples(index=False)}
        if cache is not None:
            cache.remember(columns)
        return cls(run_filter, order, columns)

    def _column(self, column: str) -> str:
        """SQL naming a runs_wide column. A remembered one is named by a regular expression of exactly
        its name (DuckDB's COLUMNS, which matches case-sensitively), so a column that is not there
        under exactly that name fails to bind instead of answering for another key (see
        ValueColumnCache); one just looked up is named as it is."""
        if not self.remembered:
            return f"r.{quoted(column)}"
        exact = "".join(c if c.isalnum() else f"\\x{{{ord(c):x}}}" for c in column)  # RE2: no quote left
        return f"COLUMNS('^{exact}$')"

    def _conditions(self) -> _Sql:
        f = self.filter
        sql = _Sql([], [], [], [])
        for column, value in (("name", f.name), ("project", f.project), ("state", f.state),
                              ("parent_uid", f.parent)):
            if value is not None and value != "":
                sql.where.append(f"r.{column} = ?")
                sql.where_args.append(value)
        if f.name_contains:
            sql.where.append("contains(lower(r.name), lower(?))")
            sql.where_args.append(f.name_contains)
        if f.top_level:
            sql.where.append("r.iteration = 0")
        if f.since is not None and f.since != "":
            sql.where.append("r.started_at >= ?::TIMESTAMPTZ")
            sql.where_args.append(str(f.since))
        if f.until is not None and f.until != "":
            sql.where.append("r.started_at < ?::TIMESTAMPTZ")
            sql.where_args.append(str(f.until))
        for key, value in f.labels:
            if value is None:
                sql.where.append("r.uid IN (SELECT uid FROM labels WHERE key = ?)")
                sql.where_args.append(key)
            else:
                sql.where.append("r.uid IN (SELECT uid FROM labels WHERE key = ? AND value = ?)")
                sql.where_args.extend([key, value])
        for value_filter in f.values:
            self._value_condition(sql, value_filter)
        return sql

    def _value_condition(self, sql: _Sql, v: ValueFilter) -> None:
        table = VALUE_TABLES[v.kind]
        number = v.number()
        column = self.columns.get((v.kind, v.key))
        if v.op == "~":
            sql.where.append(f"r.uid IN (SELECT uid FROM {table} WHERE key = ? AND "
                             "contains(lower(value->>'$'), lower(?)))")
            sql.where_args.extend([v.key, v.value])
        elif number is not None and column is not None:
            sql.where.append(f"{self._column(column)} {_SQL_OPERATORS[v.op]} ?")
            sql.where_args.append(number)
        elif number is not None:
            sql.where.append(f"r.uid IN (SELECT uid FROM {table} WHERE key = ? AND value_num {_SQL_OPERATORS[v.op]} ?)")
            sql.where_args.extend([v.key, number])
        else:
            sql.where.append(f"r.uid IN (SELECT uid FROM {table} WHERE key = ? AND "
                             f"(value->>'$') {_SQL_OPERATORS[v.op]} ?)")
            sql.where_args.extend([v.key, v.text()])

    def _order_by(self, sql: _Sql) -> str:
        direction = "DESC" if self.order.descending else "ASC"
        named = _value_key(self.order.column)
        if named is None:
            tie = ", r.started_at DESC" if self.order.column != "started_at" else ""
            return f"r.{self.order.column} {direction} NULLS LAST{tie}, r.uid"
        column = self.columns.get(named)
        if column is not None:
            return f"{self._column(column)} {direction} NULLS LAST, r.started_at DESC, r.uid"
        # a key with no column (never numeric, or none could be made): its values as text
        sql.joins.append(f"LEFT JOIN {VALUE_TABLES[named[0]]} s ON s.uid = r.uid AND s.key = ?")
        sql.join_args.append(named[1])
        return f"s.value_num {direction} NULLS LAST, s.value {direction} NULLS LAST, r.started_at DESC, r.uid"

    def select(self, columns: Sequence[str] = RUN_COLUMNS, limit: int | None = None,
               offset: int = 0) -> tuple[str, list[Any]]:
        """(SQL, arguments) for the matching runs' `columns` (runs columns), in order."""
        unknown = [c for c in columns if c not in RUN_COLUMNS]
        if unknown:
            raise ValueError(f"not a runs column: {unknown[0]!r}")
        sql = self._conditions()
        order = self._order_by(sql)
        names = ", ".join(f"r.{c}" for c in columns)
        cut, cut_args = _page(limit, offset)
        if limit is not None and _value_key(self.order.column) is not None and not sql.joins:
            # a page sorted by a value column: its rows found on their sort keys alone, then only they
            # read whole. A sort carrying every column of every candidate was most of a page's time
            # at 100,000 runs (on the file opened again: 7.5-9.2 against 10.8-11.5 ms through the
            # service, query-only benches; ~1 ms more at 1,000 runs). DuckDB does this by itself only
            # up to 50 rows (late_materialization_max_rows). Not for a sort by a runs column: DuckDB
            # cuts the newest-first sort short by started_at's row-group statistics, and reading the
            # page apart cost more there
            page = f"SELECT r.rowid FROM runs_wide r{sql.clause()} ORDER BY {order}{cut}"
            return (f"SELECT {names} FROM runs_wide r WHERE r.rowid IN ({page}) ORDER BY {order}",
                    [*sql.where_args, *cut_args])
        query = f"SELECT {names} FROM runs_wide r {' '.join(sql.joins)}{sql.clause()} ORDER BY {order}{cut}"
        return query, [*sql.join_args, *sql.where_args, *cut_args]

    def count(self) -> tuple[str, list[Any]]:
        """(SQL, arguments) counting the matching runs (column `n`)."""
        sql = self._conditions()
        return f"SELECT count(*) AS n FROM runs_wide r{sql.clause()}", sql.where_args


def _page(limit: int | None, offset: int) -> tuple[str, list[int]]:
    """The LIMIT / OFFSET clause of a page (empty for all rows) and its arguments."""
    clause, args = "", []
    if limit is not None:
        clause += " LIMIT ?"
        args.append(_count(limit, "limit"))
    if offset:
        clause += " OFFSET ?"
        args.append(_count(offset, "offset"))
    return clause, args


def _count(value: Any, what: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = -1
    if isinstance(value, bool) or number < 0:
        raise ValueError(f"{what} must be an int >= 0, not {value!r}")
    return number


def _answered(fetch: Fetch, run_filter: RunFilter, order: RunOrder, cache: ValueColumnCache | None,
              statement: Callable[[RunQuery], tuple[str, list[Any]]]) -> pd.DataFrame:
    """The answer to the statement of the query; once more with its columns looked up when it
    failed with remembered ones (a rebuild may have dropped them)."""
    run_query = RunQuery.build(fetch, run_filter, order, cache)
    try:
        return fetch(*statement(run_query))
    except duckdb.BinderException:  # a column not there under exactly its name (any other error is the answer)
        if cache is None or not run_query.remembered:
            raise
    cache.forget()
    return fetch(*statement(RunQuery.build(fetch, run_filter, order, cache)))


def find_runs(fetch: Fetch, run_filter: RunFilter = RunFilter(), order: RunOrder = RunOrder(),
              limit: int | None = None, offset: int = 0, columns: Sequence[str] = RUN_COLUMNS,
              cache: ValueColumnCache | None = None) -> pd.DataFrame:
    """The matching runs (the given runs columns), sorted, one page of them when `limit` is given.
    `cache`: the reader's remembered value columns (see ValueColumnCache)."""
    return _answered(fetch, run_filter, order, cache, lambda q: q.select(columns, limit, offset))


def count_runs(fetch: Fetch, run_filter: RunFilter = RunFilter(), cache: ValueColumnCache | None = None) -> int:
    """How many runs match."""
    return int(_answered(fetch, run_filter, RunOrder(), cache, lambda q: q.count()).n[0])
