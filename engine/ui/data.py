"""What the run, sweep and compare pages show, read with a `RunDB.reader()` query function."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from engine.sweep.summary import iteration_table
from engine.ui.previews import artifact_item
from projections.query import Query
from projections.run_query import RunFilter, RunOrder, find_runs

MAX_POINTS = 1000   # per metric series drawn; longer series are thinned evenly
MAX_EVENTS = 300    # raw events listed on a run page
MAX_LOG_LINES = 2000  # console lines a run page shows (the last ones; the page appends new ones)
Series = dict[str, tuple[list[float], list[float]]]


@dataclass
class RunView:
    run: dict[str, Any]
    params: dict[str, Any]
    results: dict[str, Any]
    artifacts: list[dict[str, Any]]
    metrics: dict[str, tuple[list[float], list[float]]]
    metric_points: dict[str, int]
    parent: dict[str, Any] | None
    children: list[dict[str, Any]]
    rerun_of: dict[str, Any] | None
    reruns: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)
    events_total: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)  # the last MAX_LOG_LINES lines, in order
    log_total: int = 0
    amendments: list[dict[str, Any]] = field(default_factory=list)  # edits of the run, oldest first

    @property
    def is_sweep(self) -> bool:
        return bool(self.children) or "sweep" in self.run["extra"]


def run_view(fetch: Query, uid: str, with_events: bool = True) -> RunView:
    """Everything the run page shows about one run."""
    run = fetch("SELECT * FROM runs WHERE uid = ?", [uid]).to_dict("records")
    if not run:
        raise KeyError(f"no run with uid {uid!r}")
    record = {key: None if _missing(value) else value for key, value in run[0].items()}
    for column in ("labels", "inputs", "extra", "return_value"):
        value = record.get(column)
        record[column] = json.loads(value) if isinstance(value, str) else ({} if column != "return_value" else None)
    values = _values(fetch, [uid]).get(uid, {"params": {}, "results": {}})
    artifacts = fetch("SELECT key, kind, uri, sha256, size, format, labels, meta FROM artifacts "
                      "WHERE uid = ? ORDER BY key", [uid]).to_dict("records")
    for artifact in artifacts:
        artifact["uid"] = uid
        artifact["labels"] = json.loads(artifact["labels"] or "{}")
        artifact["meta"] = json.loads(artifact["meta"] or "{}")
    series, points = metric_series(fetch, [uid])
    related = fetch(
        "SELECT 'parent' AS rel, uid, name, iteration, state, started_at FROM runs WHERE uid = ? "
        "UNION ALL SELECT 'child', uid, name, iteration, state, started_at FROM runs WHERE parent_uid = ? "
        "UNION ALL SELECT 'rerun_of', uid, name, iteration, state, started_at FROM runs WHERE uid = ? "
        "UNION ALL SELECT 'rerun', uid, name, iteration, state, started_at FROM runs "
        "WHERE extra->>'$.rerun_of' = ? ORDER BY iteration, started_at",
        [record["parent_uid"], uid, record["extra"].get("rerun_of"), uid]).to_dict("records")
    view = RunView(
        record, values["params"], values["results"], artifacts,
        {key: s for (_, key), s in series.items()}, {key: n for (_, key), n in points.items()},
        parent=next((r for r in related if r["rel"] == "parent"), None),
        children=[r for r in related if r["rel"] == "child"],
        rerun_of=next((r for r in related if r["rel"] == "rerun_of"), None),
        reruns=[r for r in related if r["rel"] == "rerun"])
    view.log, view.log_total = log_tail(fetch, uid)
    view.amendments = amendment_history(fetch, uid)
    if with_events:
        events = fetch("SELECT position, seq, type, ts, payload, count(*) OVER () AS total FROM events "
                       "WHERE run_uid = ? ORDER BY seq LIMIT ?", [uid, MAX_EVENTS])
        view.events = events.drop(columns="total").to_dict("records")
        view.events_total = int(events.total.iloc[0]) if len(events) else 0
    return view


def amendment_history(fetch: Query, uid: str) -> list[dict[str, Any]]:
    """The run's edits, oldest first: ts, amended_by, labels (set), removed_labels, note (None: kept)."""
    rows = fetch("SELECT position, ts, amended_by, labels, removed_labels, note FROM amendments "
                 "WHERE uid = ? ORDER BY position", [uid]).to_dict("records")
    for row in rows:
        row["labels"] = json.loads(row["labels"] or "{}")
        row["removed_labels"] = json.loads(row["removed_labels"] or "[]")
        row["note"] = None if _missing(row["note"]) else row["note"]
    return rows


def log_tail(fetch: Query, uid: str, limit: int = MAX_LOG_LINES) -> tuple[list[dict[str, Any]], int]:
    """The run's last `limit` console lines (line_no, stream, ts, text), oldest first, and how many
    lines its log holds."""
    lines = fetch("SELECT line_no, stream, ts, text, (SELECT count(*) FROM logs WHERE uid = ?) AS total "
                  "FROM logs WHERE uid = ? ORDER BY line_no DESC LIMIT ?", [uid, uid, limit])
    total = int(lines.total.iloc[0]) if len(lines) else 0
    return lines.drop(columns="total").iloc[::-1].to_dict("records"), total


def _missing(value: Any) -> bool:
    """NULL as pandas gives it back (None, NaN or NaT), which templates must not take for a value."""
    return value is None or value is pd.NaT or (isinstance(value, float) and value != value)


def _values(fetch: Query, uids: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    frame = fetch("SELECT 'params' AS kind, uid, key, value FROM params WHERE uid IN (SELECT unnest(?::VARCHAR[])) "
                  "UNION ALL SELECT 'results', uid, key, value FROM results "
                  "WHERE uid IN (SELECT unnest(?::VARCHAR[])) ORDER BY key", [uids, uids])
    values: dict[str, dict[str, dict[str, Any]]] = {uid: {"params": {}, "results": {}} for uid in uids}
    for kind, uid, key, value in zip(frame.kind, frame.uid, frame.key, frame.value, strict=True):
        values[uid][kind][key] = json.loads(value)
    return values


def metric_series(fetch: Query, uids: list[str]) -> tuple[dict[tuple[str, str], tuple[list[float], list[float]]],
                                                          dict[tuple[str, str], int]]:
    """(uid, key) -> (x, y), thinned to at most MAX_POINTS evenly spaced points (the last kept);
    and (uid, key) -> how many points were logged. x is the step, or the logging order without one."""
    frame = fetch(
        "SELECT uid, key, x, value, n FROM (SELECT uid, key, value, "
        "coalesce(step, row_number() OVER w - 1) AS x, row_number() OVER w AS rn, "
        "count(*) OVER (PARTITION BY uid, key) AS n FROM metrics WHERE uid IN (SELECT unnest(?::VARCHAR[])) "
        "WINDOW w AS (PARTITION BY uid, key ORDER BY step NULLS LAST, ts)) "
        "WHERE n <= ? OR (rn - 1) % ceil(n / ?)::BIGINT = 0 OR rn = n ORDER BY key, uid, rn",
        [uids, MAX_POINTS, MAX_POINTS])
    series: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    points: dict[tuple[str, str], int] = {}
    for (uid, key), group in frame.groupby(["uid", "key"], sort=False):
        series[(uid, key)] = (group.x.astype(float).tolist(), group.value.astype(float).tolist())
        points[(uid, key)] = int(group.n.iloc[0])
    return series, points


@dataclass
class SweepView:
    parent: dict[str, Any]
    table: pd.DataFrame
    best: int | None
    uids: dict[int, str]
    selector: str | None


def sweep_view(fetch: Query, uid: str, store_root: str | Path) -> SweepView:
    """The sweep's iteration_results table (from its artifact, or from the iterations while it runs);
    KeyError when `uid` is no run, or a run with no sweep and no iterations."""
    parent = fetch("SELECT uid, name, state, extra FROM runs WHERE uid = ?", [uid]).to_dict("records")
    if not parent:
        raise KeyError(f"no run with uid {uid!r}")
    record = parent[0]
    extra = json.loads(record["extra"] or "{}")
    children = find_runs(fetch, RunFilter(parent=uid), RunOrder("iteration", descending=False),
                         columns=("uid", "iteration", "state"))
    if "sweep" not in extra and children.empty:
        raise KeyError(f"run {uid!r} is not a sweep (it has no iterations)")
    best = fetch("SELECT value_num FROM results WHERE uid = ? AND key = 'best_iteration'", [uid]).value_num
    artifact = fetch("SELECT key, kind, uri, sha256, size, format, labels, meta FROM artifacts "
                     "WHERE uid = ? AND key = 'iteration_results'", [uid]).to_dict("records")
    table = None
    if artifact:
        try:
            table = artifact_item(artifact[0], store_root).as_df()
        except (OSError, ValueError):
            table = None
    if table is None:
        values = _values(fetch, children.uid.tolist())
        table = iteration_table({int(row.iteration): (row.state, values[row.uid]["params"], values[row.uid]["results"])
                                 for row in children.itertuples()})
    return SweepView(record, table, int(best.iloc[0]) if len(best) and pd.notna(best.iloc[0]) else None,
                     {int(i): u for i, u in zip(children.iteration, children.uid, strict=True)},
                     (extra.get("sweep") or {}).get("selector"))


@dataclass
class CompareView:
    runs: list[dict[str, Any]]
    rows: list[tuple[str, str, list[Any], bool]]   # (section, key, value per run, differs)
    charts: dict[str, Series]                      # metric key -> run label -> (x, y)


def compare_view(fetch: Query, uids: list[str]) -> CompareView:
    """Params and results of the runs side by side, differences marked; metric curves per key."""
    runs = fetch("SELECT uid, name, iteration, state, duration_s, started_at FROM runs "
                 "WHERE uid IN (SELECT unnest(?::VARCHAR[]))", [uids]).to_dict("records")
    order = {uid: i for i, uid in enumerate(uids)}
    runs.sort(key=lambda r: order[r["uid"]])
    found = [r["uid"] for r in runs]
    values = _values(fetch, found)
    rows: list[tuple[str, str, list[Any], bool]] = []
    for column in ("state", "duration_s"):
        cells = [r[column] for r in runs]
        rows.append(("run", column, cells, column == "state" and len(set(cells)) > 1))
    for section in ("params", "results"):
        keys = sorted({k for uid in found for k in values[uid][section]})
        for key in keys:
            cells = [values[uid][section].get(key) for uid in found]
            rows.append((section, key, cells, len({json.dumps(c, sort_keys=True, default=str) for c in cells}) > 1))
    labels = {r["uid"]: f"{r['name']} {r['uid'][:8]}" for r in runs}
    series, _ = metric_series(fetch, found)
    charts: dict[str, Series] = {}
    for (uid, key), points in series.items():
        charts.setdefault(key, {})[labels[uid]] = points
    return CompareView(runs, rows, charts)

