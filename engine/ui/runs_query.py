"""The runs page's query: filters, sort and one page of rows in a few set-based SQL statements
(a count, one LIMIT/OFFSET page, the page's values), so it stays fast with 100k runs."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlencode

from projections.query import Query

STATES = ("running", "completed", "error", "aborted", "lost")
PAGE_SIZES = (25, 50, 100, 200)
RUN_COLUMNS = {"name": "r.name", "iteration": "r.iteration", "state": "r.state",
               "started_at": "r.started_at", "duration_s": "r.duration_s", "uid": "r.uid"}
_VALUE_FILTER = re.compile(r"^\s*(result|param)\.(.+?)\s*(<=|>=|!=|=|<|>|~)\s*(.*?)\s*$")
_AUTO_RESULTS, _AUTO_PARAMS = 6, 4


@dataclass(frozen=True)
class RunsQuery:
    """What the runs page shows; every field is a URL query parameter of the page."""

    name: str = ""       # substring of the run name
    state: str = ""
    label: str = ""      # "key" or "key=value", several separated by commas
    where: str = ""      # "result.loss < 10; param.p1 = 2" (=, !=, <, <=, >, >=, ~ contains)
    since: str = ""      # started at or after (UTC)
    until: str = ""      # started before (UTC)
    top: bool = False    # hide sweep iterations
    parent: str = ""     # only the iterations of this sweep
    sort: str = "-started_at"
    page: int = 1
    size: int = 50
    columns: str = ""    # "result.loss,param.p1"; empty: the keys found on the page

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> RunsQuery:
        """Parse the page's query string; out-of-range numbers are clamped, not refused."""
        values: dict[str, Any] = {}
        for item in fields(cls):
            raw = params.get(item.name)
            if raw is None:
                continue
            if item.type == "bool":
                values[item.name] = raw not in ("", "0", "false", "off")
            elif item.type == "int":
                try:
                    values[item.name] = int(raw)
                except ValueError:
                    continue
            else:
                values[item.name] = raw.strip()
        query = cls(**values)
        size = query.size if query.size in PAGE_SIZES else 50
        return replace(query, page=max(1, query.page), size=size, sort=query.sort or "-started_at")

    def link(self, **changes: Any) -> str:
        """The page's query string with some fields changed (defaults left out)."""
        changed = replace(self, **changes)
        default = RunsQuery()
        pairs = {f.name: getattr(changed, f.name) for f in fields(self)
                 if getattr(changed, f.name) != getattr(default, f.name)}
        return "?" + urlencode({k: (1 if v is True else v) for k, v in pairs.items()})

    def sort_link(self, column: str) -> str:
        """Sort by `column`; the second click on the same column reverses the order."""
        return self.link(sort=f"-{column}" if self.sort == column else column, page=1)

    def value_columns(self) -> list[str]:
        return [c.strip() for c in self.columns.split(",") if c.strip().startswith(("result.", "param."))]


@dataclass
class RunsPage:
    query: RunsQuery
    total: int
    rows: list[dict[str, Any]]
    columns: list[str]
    result_keys: list[str] = field(default_factory=list)
    param_keys: list[str] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.query.size))


def conditions(query: RunsQuery) -> tuple[list[str], list[Any]]:
    """WHERE terms and their arguments; ValueError names a filter that does not parse."""
    where: list[str] = []
    args: list[Any] = []
    if query.name:
        where.append("contains(lower(r.name), lower(?))")  # literal: % and _ are no wildcards
        args.append(query.name)
    if query.state:
        where.append("r.state = ?")
        args.append(query.state)
    if query.parent:
        where.append("r.parent_uid = ?")
        args.append(query.parent)
    if query.top:
        where.append("r.iteration = 0")
    if query.since:
        where.append("r.started_at >= ?::TIMESTAMPTZ")
        args.append(query.since)
    if query.until:
        where.append("r.started_at < ?::TIMESTAMPTZ")
        args.append(query.until)
    for item in filter(None, (part.strip() for part in query.label.split(","))):
        key, sep, value = item.partition("=")
        where.append("r.uid IN (SELECT uid FROM labels WHERE key = ?" + (" AND value = ?)" if sep else ")"))
        args.extend([key.strip(), value.strip()] if sep else [key.strip()])
    for item in filter(None, (part.strip() for part in query.where.split(";"))):
        term, term_args = _value_filter(item)
        where.append(term)
        args.extend(term_args)
    return where, args


def _value_filter(text: str) -> tuple[str, list[Any]]:
    match = _VALUE_FILTER.match(text)
    if not match:
        raise ValueError(f"filter {text!r} must look like 'result.<key> <op> <value>' or "
                         f"'param.<key> <op> <value>' with op one of = != < <= > >= ~")
    kind, key, op, raw = match.groups()
    table = "results" if kind == "result" else "params"
    number = _number(raw)
    if op == "~":
        return (f"r.uid IN (SELECT uid FROM {table} WHERE key = ? AND contains(lower(value->>'$'), lower(?)))",
                [key, raw])
    if number is not None:
        sql_op = "<>" if op == "!=" else op
        return f"r.uid IN (SELECT uid FROM {table} WHERE key = ? AND value_num {sql_op} ?)", [key, number]
    if op not in ("=", "!="):
        raise ValueError(f"filter {text!r}: {op} needs a number")
    text_value = raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    sql_op = "<>" if op == "!=" else "="
    return f"r.uid IN (SELECT uid FROM {table} WHERE key = ? AND (value->>'$') {sql_op} ?)", [key, text_value]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def order_by(query: RunsQuery) -> tuple[str, str, list[Any]]:
    """(join, ORDER BY terms, join arguments) for the query's sort."""
    descending = query.sort.startswith("-")
    column = query.sort.lstrip("-")
    direction = "DESC" if descending else "ASC"
    if column.startswith(("result.", "param.")):
        table = "results" if column.startswith("result.") else "params"
        return (f"LEFT JOIN {table} s ON s.uid = r.uid AND s.key = ?",
                f"s.value_num {direction} NULLS LAST, s.value {direction} NULLS LAST, r.started_at DESC, r.uid",
                [column.split(".", 1)[1]])
    if column not in RUN_COLUMNS:
        raise ValueError(f"cannot sort by {column!r}: use one of {', '.join(RUN_COLUMNS)}, "
                         f"result.<key> or param.<key>")
    return "", f"{RUN_COLUMNS[column]} {direction} NULLS LAST, r.uid", []


def fetch_runs(fetch: Query, query: RunsQuery) -> RunsPage:
    """One page of runs with their labels and the value columns shown."""
    where, args = conditions(query)
    join, order, join_args = order_by(query)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    total = int(fetch(f"SELECT count(*) AS n FROM runs r{clause}", args).n[0])
    frame = fetch(
        f"SELECT r.uid, r.name, r.iteration, r.parent_uid, r.state, r.labels, r.started_at, r.duration_s, "
        f"r.finished_at, r.extra FROM runs r {join}{clause} ORDER BY {order} LIMIT ? OFFSET ?",
        [*join_args, *args, query.size, (query.page - 1) * query.size])
    rows = [run_row(record) for record in frame.to_dict("records")]
    values = page_values(fetch, [row["uid"] for row in rows])
    for row in rows:
        row["values"] = values.get(row["uid"], {})
    keys = fetch("SELECT 'result' AS kind, key FROM (SELECT DISTINCT key FROM results) "
                 "UNION ALL SELECT 'param', key FROM (SELECT DISTINCT key FROM params) ORDER BY kind, key")
    result_keys = keys.key[keys.kind == "result"].tolist()
    param_keys = keys.key[keys.kind == "param"].tolist()
    return RunsPage(query, total, rows, _columns(query, rows), result_keys, param_keys)


def page_values(fetch: Query, uids: list[str]) -> dict[str, dict[str, Any]]:
    """uid -> {"result.<key>" / "param.<key>": value} for the given runs, in one query."""
    if not uids:
        return {}
    frame = fetch("SELECT 'result' AS kind, uid, key, value FROM results WHERE uid IN (SELECT unnest(?::VARCHAR[])) "
                  "UNION ALL SELECT 'param', uid, key, value FROM params WHERE uid IN (SELECT unnest(?::VARCHAR[]))",
                  [uids, uids])
    values: dict[str, dict[str, Any]] = {}
    for kind, uid, key, value in zip(frame.kind, frame.uid, frame.key, frame.value, strict=True):
        values.setdefault(uid, {})[f"{kind}.{key}"] = json.loads(value)
    return values


def run_row(record: dict[str, Any]) -> dict[str, Any]:
    """A runs-table row from a runs record: labels parsed, `is_sweep` set, `values` empty."""
    labels, extra = record.get("labels"), record.pop("extra", None)
    record["labels"] = json.loads(labels) if isinstance(labels, str) else (labels or {})
    record["is_sweep"] = isinstance(extra, str) and "sweep" in json.loads(extra)
    record.setdefault("values", {})
    return record


def _columns(query: RunsQuery, rows: list[dict[str, Any]]) -> list[str]:
    chosen = query.value_columns()
    if not chosen:
        present: dict[str, None] = {}
        for row in rows:
            present.update(dict.fromkeys(row["values"]))
        results = sorted(k for k in present if k.startswith("result.") and k != "result.return")
        params = sorted(k for k in present if k.startswith("param."))
        chosen = results[:_AUTO_RESULTS] + params[:_AUTO_PARAMS]
    sort_column = query.sort.lstrip("-")
    if sort_column.startswith(("result.", "param.")) and sort_column not in chosen:
        chosen.append(sort_column)
    return chosen
