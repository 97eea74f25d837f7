"""Write a folded `TableBatch` into DuckDB (inside the caller's transaction)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import duckdb
import pyarrow as pa

from projections.fold import TableBatch

_RUN_COLUMNS = ("uid", "parent_uid", "iteration", "project", "name", "state", "handler",
                "runtime", "host", "labels", "started_at", "finished_at", "duration_s", "error",
                "return_value", "traceback", "inputs", "extra", "last_event_at")
_TIME_COLUMNS = {"started_at", "finished_at", "last_event_at"}
_UPDATABLE = ("state", "finished_at", "duration_s", "error", "traceback", "return_value",
              "last_event_at")


def _stage(con: duckdb.DuckDBPyConnection, name: str, columns: Sequence[str],
           rows: Sequence[Sequence[Any]]) -> None:
    table = pa.table(dict(zip(columns, map(list, zip(*rows, strict=True)), strict=True)))
    con.register(name, table)


def _ts(column: str, source: str = "") -> str:
    """SQL for `column` of the staged table, converting epoch seconds to timestamps."""
    return f"to_timestamp({source}{column})" if column in _TIME_COLUMNS else f"{source}{column}"


def write_batch(con: duckdb.DuckDBPyConnection, batch: TableBatch) -> None:
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
            con.execute(f"INSERT OR REPLACE INTO runs SELECT {select} FROM _runs")
        updates = [[uid] + [u.get(c) for c in _UPDATABLE] for uid, u in batch.run_updates.items()]
        if stage("_run_updates", ("uid", *_UPDATABLE), updates):
            sets = ", ".join(f"{c} = coalesce({_ts(c, 'u.')}, runs.{c})" for c in _UPDATABLE)
            con.execute(f"UPDATE runs SET {sets} FROM _run_updates u WHERE runs.uid = u.uid")
        for table, rows in (("params", batch.params), ("results", batch.results)):
            if stage(f"_{table}", ("uid", "key", "value", "value_num"),
                     [(uid, key, value, num) for (uid, key), (value, num) in rows.items()]):
                con.execute(f"INSERT OR REPLACE INTO {table} SELECT * FROM _{table}")
        if stage("_labels", ("uid", "key", "value"),
                 [(uid, key, value) for (uid, key), value in batch.labels.items()]):
            con.execute("INSERT OR REPLACE INTO labels SELECT * FROM _labels")
        if batch.labelled_runs:
            stage("_labelled", ("uid",), [(uid,) for uid in batch.labelled_runs])
            con.execute("""
                UPDATE runs SET labels = l.labels FROM (
                    SELECT uid, json_group_object(key, value) AS labels FROM labels
                    WHERE uid IN (SELECT uid FROM _labelled) GROUP BY uid) l
                WHERE runs.uid = l.uid""")
        if stage("_artifacts", ("uid", "key", "kind", "uri", "sha256", "size", "format", "labels", "meta"),
                 [(uid, key, *rest) for (uid, key), rest in batch.artifacts.items()]):
            con.execute("INSERT OR REPLACE INTO artifacts SELECT * FROM _artifacts")
        if stage("_metrics", ("uid", "key", "step", "value", "ts"), batch.metrics):
            con.execute("INSERT INTO metrics SELECT uid, key, step, value, to_timestamp(ts) FROM _metrics")
        if stage("_events", ("position", "partition", "offset", "event_id", "run_uid", "seq", "type",
                             "ts", "payload", "stream"), batch.events):
            con.execute("INSERT INTO events SELECT position, partition, \"offset\", event_id, run_uid, "
                        "seq, type, to_timestamp(ts), payload, stream FROM _events")
        if stage("_dead", ("partition", "offset", "key", "error", "raw", "received_at"),
                 batch.dead_letters):
            con.execute("INSERT INTO dead_letters SELECT partition, \"offset\", key, error, raw, "
                        "to_timestamp(received_at) FROM _dead")
        if stage("_progress", ("uid", "stream", "last_seq"),
                 [(uid, stream, seq) for (uid, stream), seq in batch.run_progress.items()]):
            con.execute("INSERT OR REPLACE INTO run_progress SELECT * FROM _progress")
        if stage("_positions", ("partition", "next_offset"), list(batch.positions.items())):
            con.execute("INSERT OR REPLACE INTO positions SELECT * FROM _positions")
        con.execute("INSERT OR REPLACE INTO projection_meta VALUES ('next_position', ?)",
                    [str(batch.next_position)])
    finally:
        for name in staged:
            with contextlib.suppress(duckdb.Error):  # an aborted transaction refuses it too
                con.unregister(name)
