"""The runs page: its query string (filters, sort, page) and what it shows. The runs are found and
counted by projections.run_query, the one run query `RunDB.list_runs` uses too."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlencode

from projections.query import Query
from projections.run_query import STATES, RunFilter, RunOrder, RunQuery, ValueFilter, label_filters

__all__ = ["PAGE_SIZES", "STATES", "RunsPage", "RunsQuery", "fetch_runs", "page_values", "run_row"]

PAGE_SIZES = (25, 50, 100, 200)
_PAGE_COLUMNS = ("uid", "name", "iteration", "parent_uid", "state", "labels", "started_at", "duration_s",
                 "finished_at", "extra")
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

    def run_filter(self) -> RunFilter:
        """The page's filters; ValueError names a `where` term that does not parse."""
        labels = label_filters([part.strip() for part in self.label.split(",") if part.strip()])
        values = tuple(ValueFilter.parse(part.strip()) for part in self.where.split(";") if part.strip())
        return RunFilter(name_contains=self.name or None, state=self.state or None, parent=self.parent or None,
                         labels=tuple((k.strip(), None if v is None else v.strip()) for k, v in labels),
                         values=values, since=self.since or None, until=self.until or None, top_level=self.top)

    def run_order(self) -> RunOrder:
        """The page's sort; ValueError names a column that cannot be sorted on."""
        return RunOrder.parse(self.sort)

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


def fetch_runs(fetch: Query, query: RunsQuery) -> RunsPage:
    """One page of runs with their labels and the value columns shown."""
    run_query = RunQuery.build(fetch, query.run_filter(), query.run_order())
    count_sql, count_args = run_query.count()
    total = int(fetch(count_sql, count_args).n[0])
    last = max(1, -(-total // query.size))
    if query.page > last:  # a page past the end (a link kept while runs were deleted, or typed): the last one
        query = replace(query, page=last)
    page_sql, page_args = run_query.select(_PAGE_COLUMNS, query.size, (query.page - 1) * query.size)
    frame = fetch(page_sql, page_args)
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
