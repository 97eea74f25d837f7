"""Write a folded `TableBatch` into DuckDB (inside the caller's transaction)."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from projections.fold import TableBatch
from projections.tables import RUN_COLUMNS, RUN_ROW_TABLES, judged_state
from schemas.codec import MetricColumns

_RUN_COLUMNS = (*RUN_COLUMNS, "stream", "heartbeat_interval_s")
_TIME_COLUMNS = {"started_at", "finished_at", "last_event_at", "received_at"}
_UPDATABLE = ("state", "finished_at", "duration_s", "error", "traceback", "return_value",
              "last_event_at", "heartbeat_interval_s", "note")
_DEAD_COLUMNS = ("partition", "offset", "key", "error", "raw", "received_at", "event_id", "run_uid",
                 "stream", "seq", "type")
_CONFLICT_COLUMNS = ("partition", "offset", "event_id", "run_uid", "stream", "seq", "type", "reason",
                     "payload", "received_at")
_DUPLICATE_COLUMNS = ("partition", "offset", "event_id", "run_uid", "stream", "seq", "type",
                      "received_at")


# Arrow types of the columns staged for the big tables: given, not inferred from 50k Python values.
_TYPES = {"position": pa.int64(), "partition": pa.int32(), "offset": pa.int64(), "event_id": pa.string(),
          "run_uid": pa.string(), "seq": pa.int64(), "type": pa.string(), "ts": pa.float64(),
          "payload": pa.string(), "stream": pa.string(), "uid": pa.string(), "key": pa.string(),
          "step": pa.int64(), "value": pa.float64()}
_TYPED = {"_events", "_metrics"}
_EVENT_COLUMNS = ("position", "partition", "offset", "event_id", "run_uid", "seq", "type", "ts", "payload", "stream")
_METRIC_COLUMNS = ("uid", "key", "step", "value", "ts")


def _table(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> pa.Table:
    values = zip(*rows, strict=True)
    if name in _TYPED:
        arrays = [pa.array(column, type=_TYPES[c]) for c, column in zip(columns, values, strict=True)]
    else:
        arrays = [pa.array(column) for column in values]
    return pa.Table.from_arrays(arrays, names=list(columns))


def _stage(con: duckdb.DuckDBPyConnection, name: str, columns: Sequence[str],
           rows: Sequence[Sequence[Any]]) -> None:
    con.register(name, _table(name, columns, rows))


def _same(value: Any, count: int, column: str) -> pa.Array:
    return pa.repeat(pa.scalar(value, _TYPES[column]), count)


def _metric_table(columns: MetricColumns) -> pa.Table:
    """The metrics rows of metric events given as columns (as `fold` makes them one by one)."""
    count = len(columns)
    arrays = [_same(columns.run_uid, count, "uid"), pa.array(columns.key, _TYPES["key"]),
              pa.array(columns.step, _TYPES["step"]), pa.array(columns.value, _TYPES["value"]),
              pa.array(columns.timestamp, _TYPES["ts"])]
    return pa.Table.from_arrays(arrays, names=list(_METRIC_COLUMNS))


def _event_table(position: int, partition: int, offset: int, columns: MetricColumns) -> pa.Table:
    """The events rows of metric events given as columns (as the projector makes them one by one:
    the payload as orjson writes the decoded payload)."""
    count = len(columns)
    dumps = orjson.dumps
    payloads = [dumps({"key": key, "value": value, "step": step, "timestamp": timestamp}).decode()
                for key, value, step, timestamp
                in zip(columns.key, columns.value, columns.step, columns.timestamp, strict=True)]
    arrays = [pa.array(range(position, position + count), _TYPES["position"]),
              _same(partition, count, "partition"), _same(offset, count, "offset"),
              pa.array(columns.event_id, _TYPES["event_id"]), _same(columns.run_uid, count, "run_uid"),
              pa.array(columns.seq, _TYPES["seq"]), _same("metric", count, "type"),
              pa.array(columns.ts, _TYPES["ts"]), pa.array(payloads, _TYPES["payload"]),
              _same(columns.stream, count, "stream")]
    return pa.Table.from_arrays(arrays, names=list(_EVENT_COLUMNS))


def _stage_in_order(con: duckdb.DuckDBPyConnection, name: str, columns: Sequence[str],
                    rows: Sequence[Sequence[Any]], tables: Sequence[tuple[int, pa.Table]]) -> bool:
    """Stage `rows` with `tables` (each with the number of rows that come before it) in that order."""
    if not rows and not tables:
        return False
    pieces, start = [], 0
    for before, table in tables:
        if before > start:
            pieces.append(_table(name, columns, rows[start:before]))
        pieces.append(table)
        start = before
    if start < len(rows):
        pieces.append(_table(name, columns, rows[start:]))
    con.register(name, pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces))
    return True


def _ts(column: str, source: str = "") -> str:
    """SQL for `column` of the staged table, converting epoch seconds to timestamps."""
    return f"to_timestamp({source}{column})" if column in _TIME_COLUMNS else f"{source}\"{column}\""


def _update_sql(column: str) -> str:
    """SET clause for one run column: only runs whose update names the column change it, and
    last_event_at never moves back (events of a run may arrive out of time order)."""
    if column == "last_event_at":
        return (f"{column} = CASE WHEN u.set_{column} THEN greatest({_ts(column, 'u.')}, "
                f"coalesce(run_rows.{column}, {_ts(column, 'u.')})) ELSE run_rows.{column} END")
    return f"{column} = CASE WHEN u.set_{column} THEN {_ts(column, 'u.')} ELSE run_rows.{column} END"


def _insert(con: duckdb.DuckDBPyConnection, table: str, staged: str, columns: Sequence[str]) -> None:
    select = ", ".join(_ts(c) for c in columns)
    names = ", ".join(f'"{c}"' for c in columns)
    con.execute(f"INSERT INTO {table} ({names}) SELECT {select} FROM {staged}")


def copy_runs(con: duckdb.DuckDBPyConnection, now: float, fallback_interval_s: float, where: str) -> None:
    """Copy the `run_rows` matching `where` into the public `runs`, judging silent ones lost at `now`."""
    columns = ", ".join(judged_state("r") if c == "state" else f"r.{c}" for c in RUN_COLUMNS)
    con.execute(f"INSERT OR REPLACE INTO runs SELECT {columns} FROM run_rows r WHERE {where}",
                [now, fallback_interval_s])


def refresh_judgement(con: duckdb.DuckDBPyConnection, now: float, fallback_interval_s: float) -> int:
    """Update the public state, in `runs` and `runs_wide`, of the runs still running in `run_rows`:
    'lost' while silent too long at `now`; how many rows changed."""
    changed = 0
    for table in ("runs", "runs_wide"):
        count = con.execute(f"""
            UPDATE {table} SET state = j.state FROM (
                SELECT r.uid, {judged_state("r")} AS state FROM run_rows r WHERE r.state = 'running') j
            WHERE {table}.uid = j.uid AND {table}.state IS DISTINCT FROM j.state""",
                            [now, fallback_interval_s]).fetchone()
        changed += int(count[0]) if count else 0
    return changed


def write_batch(con: duckdb.DuckDBPyConnection, batch: TableBatch) -> None:
    """Write the batch's rows (inside the caller's transaction)."""
    staged: list[str] = []

    def stage(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> bool:
        if not rows:
            return False
        _stage(con, name, columns, rows)
        staged.append(name)
        return True

    try:
        if stage("_runs", _RUN_COLUMNS, [[r[c] for c in _RUN_COLUMNS] for r in batch.new_runs.values()]):
            select = ", ".join(_ts(c) for c in _RUN_COLUMNS)
            con.execute(f"INSERT OR REPLACE INTO run_rows SELECT {select} FROM _runs")
        updates = [[uid, *(u.get(c) for c in _UPDATABLE), *(c in u for c in _UPDATABLE)]
                   for uid, u in batch.run_updates.items()]
        if stage("_run_updates", ("uid", *_UPDATABLE, *(f"set_{c}" for c in _UPDATABLE)), updates):
            sets = ", ".join(_update_sql(c) for c in _UPDATABLE)
            con.execute(f"UPDATE run_rows SET {sets} FROM _run_updates u WHERE run_rows.uid = u.uid")
        for table, rows in (("params", batch.params), ("results", batch.results)):
            if stage(f"_{table}", ("uid", "key", "value", "value_num"),
                     [(uid, key, value, num) for (uid, key), (value, num) in rows.items()]):
                con.execute(f"INSERT OR REPLACE INTO {table} SELECT * FROM _{table}")
        if stage("_labels", ("uid", "key", "value"),
                 [(uid, key, value) for (uid, key), value in batch.labels.items()]):
            con.execute("DELETE FROM labels WHERE (uid, key) IN (SELECT (uid, key) FROM _labels WHERE value IS NULL)")
            con.execute("INSERT OR REPLACE INTO labels SELECT * FROM _labels WHERE value IS NOT NULL")
        if batch.labelled_runs:
            stage("_labelled", ("uid",), [(uid,) for uid in batch.labelled_runs])
            con.execute("""
                UPDATE run_rows SET labels = coalesce(l.labels, '{}') FROM _labelled t LEFT JOIN (
                    SELECT uid, json_group_object(key, value) AS labels FROM labels
                    WHERE uid IN (SELECT uid FROM _labelled) GROUP BY uid) l ON l.uid = t.uid
                WHERE run_rows.uid = t.uid""")
        touched = batch.new_runs.keys() | batch.run_updates.keys() | batch.labelled_runs
        if stage("_touched", ("uid",), [(uid,) for uid in touched]):
            copy_runs(con, batch.judged_at, batch.fallback_interval_s, "r.uid IN (SELECT uid FROM _touched)")
        if stage("_artifacts", ("uid", "key", "kind", "uri", "sha256", "size", "format", "labels", "meta"),
                 [(uid, key, *rest) for (uid, key), rest in batch.artifacts.items()]):
            con.execute("INSERT OR REPLACE INTO artifacts SELECT * FROM _artifacts")
        if _stage_in_order(con, "_metrics", _METRIC_COLUMNS, batch.metrics,
                           [(before, _metric_table(columns)) for before, columns in batch.metric_columns]):
            staged.append("_metrics")
            con.execute("INSERT INTO metrics SELECT uid, key, step, value, to_timestamp(ts) FROM _metrics")
        if _stage_in_order(con, "_events", _EVENT_COLUMNS, batch.events,
                           [(before, _event_table(*placed)) for before, placed in batch.event_columns]):
            staged.append("_events")
            con.execute("INSERT INTO events SELECT position, partition, \"offset\", event_id, run_uid, "
                        "seq, type, to_timestamp(ts), payload, stream FROM _events")
        for table, columns, rows in (("dead_letters", _DEAD_COLUMNS, batch.dead_letters),
                                     ("conflicts", _CONFLICT_COLUMNS, batch.conflicts),
                                     ("duplicates", _DUPLICATE_COLUMNS, batch.duplicates)):
            if stage(f"_{table}", columns, rows):
                _insert(con, table, f"_{table}", columns)
        if stage("_starts", ("uid", "stream", "event_id"),
                 [(uid, stream, event_id) for uid, (stream, event_id) in batch.run_starts.items()]):
            con.execute("INSERT OR REPLACE INTO run_starts SELECT * FROM _starts")
        if stage("_progress", ("uid", "stream", "last_seq"),
                 [(uid, stream, seq) for (uid, stream), seq in batch.run_progress.items()]):
            con.execute("INSERT OR REPLACE INTO run_progress SELECT * FROM _progress")
        if stage("_positions", ("partition", "next_offset"), list(batch.positions.items())):
            con.execute("INSERT OR REPLACE INTO positions SELECT * FROM _positions")
    finally:
        for name in staged:
            with contextlib.suppress(duckdb.Error):  # an aborted transaction refuses it too
                con.unregister(name)


def _uids(con: duckdb.DuckDBPyConnection, sql: str, uids: Collection[str]) -> list[str]:
    return [row[0] for row in con.execute(sql, [list(uids)]).fetchall()] if uids else []


def hide_runs(con: duckdb.DuckDBPyConnection, parents: Mapping[str, str | None]) -> None:
    """Hide runs (run -> its parent uid): list them in hidden_runs and remove their folded rows from
    every table (`RUN_ROW_TABLES`); their events stay (inside the caller's transaction)."""
    if not parents:
        return
    uids = list(parents)
    con.execute("INSERT OR REPLACE INTO hidden_runs SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[])",
                [uids, [parents[uid] for uid in uids]])
    for table in RUN_ROW_TABLES:
        con.execute(f"DELETE FROM {table} WHERE uid IN (SELECT unnest(?::VARCHAR[]))", [uids])


def delete_run(con: duckdb.DuckDBPyConnection, uid: str, ts: float, by: str, reason: str, position: int) -> None:
    """Apply a tombstone (inside the caller's transaction): the run is listed in deleted_runs (its
    first standing tombstone is kept) and it and its iterations are hidden."""
    if con.execute("SELECT 1 FROM deleted_runs WHERE uid = ?", [uid]).fetchone():
        return
    con.execute("INSERT INTO deleted_runs VALUES (?, to_timestamp(?), ?, ?, ?)", [uid, ts, by, reason, position])
    shown = con.execute("SELECT uid, parent_uid FROM run_rows WHERE uid = ? OR parent_uid = ?", [uid, uid]).fetchall()
    hidden = dict(shown)
    hidden.setdefault(uid, None)
    known = _uids(con, "SELECT uid FROM hidden_runs WHERE uid IN (SELECT unnest(?::VARCHAR[]))", hidden)
    for already in known:  # hidden already (by its parent's tombstone): keep its row as it is
        hidden.pop(already)
    hide_runs(con, hidden)


def undelete_run(con: duckdb.DuckDBPyConnection, uid: str) -> list[str]:
    """Lift a run's tombstone (inside the caller's transaction); returns the runs to fold again from
    their events: the run and its iterations, except those still deleted themselves or by a parent.
    Nothing when the run was not deleted."""
    if not con.execute("DELETE FROM deleted_runs WHERE uid = ? RETURNING uid", [uid]).fetchall():
        return []
    shown = [row[0] for row in con.execute("""
        SELECT h.uid FROM hidden_runs h WHERE (h.uid = $1 OR h.parent_uid = $1)
        AND h.uid NOT IN (SELECT uid FROM deleted_runs)
        AND (h.parent_uid IS NULL OR h.parent_uid NOT IN (SELECT uid FROM deleted_runs))""", [uid]).fetchall()]
    if shown:
        con.execute("DELETE FROM hidden_runs WHERE uid IN (SELECT unnest(?::VARCHAR[]))", [shown])
    return sorted(shown)
