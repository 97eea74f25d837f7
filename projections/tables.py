"""DDL of the projection tables (the public SQL contract) and of the projector's own bookkeeping.

`run_rows` (internal) is the fold of the log; the public `runs` table is a copy of it in which a
run's state is also judged by the clock: a run whose last event is older than 3 of its own heartbeat
intervals (recorded in run_started or its latest heartbeat; the configured fallback for runs that
recorded none) reads as 'lost', with no finish time. The projector refreshes that judgement each
time it catches up, that is before every read through the query API and on every turn of
`runbus project --follow`, so a killed job shows lost without anyone running `runbus reap`
(`reap` writes the verdict to the log). It is running again as soon as it speaks.

Every record read from the bus is accounted for: an event is applied (`events`), skipped as an exact
duplicate (`duplicates`), refused because another event holds its place (`conflicts`), or
quarantined with its error (`dead_letters`, which also holds records that do not decode).
"""

from __future__ import annotations

import duckdb

# Bump when a table's shape changes: a projection built by another version is rebuilt on open.
PROJECTION_VERSION = 5

# A running run counts as lost after this many of its heartbeat intervals without an event.
LOST_AFTER_HEARTBEATS = 3

PUBLIC_TABLES = ("runs", "params", "results", "metrics", "labels", "artifacts", "logs", "events",
                 "dead_letters", "conflicts", "duplicates")
INTERNAL_TABLES = ("run_rows", "run_progress", "run_starts", "log_progress", "positions", "projection_meta")

# The columns of the public `runs` table, in order (the query layer and the UI rely on them).
RUN_COLUMNS = ("uid", "parent_uid", "iteration", "project", "name", "state", "handler", "runtime",
               "host", "labels", "started_at", "finished_at", "duration_s", "error",
               "return_value", "traceback", "inputs", "extra", "last_event_at")

_RUN_DDL = """
    uid VARCHAR PRIMARY KEY, parent_uid VARCHAR, iteration INTEGER, project VARCHAR,
    name VARCHAR, state VARCHAR, handler VARCHAR, runtime VARCHAR, host VARCHAR,
    labels JSON, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, duration_s DOUBLE,
    error VARCHAR, return_value JSON, traceback VARCHAR, inputs JSON, extra JSON,
    last_event_at TIMESTAMPTZ"""

_DDL = f"""
CREATE TABLE IF NOT EXISTS runs ({_RUN_DDL}
);
CREATE TABLE IF NOT EXISTS run_rows ({_RUN_DDL}, stream VARCHAR, heartbeat_interval_s DOUBLE
);
CREATE TABLE IF NOT EXISTS params (
    uid VARCHAR, key VARCHAR, value JSON, value_num DOUBLE, PRIMARY KEY (uid, key)
);
CREATE TABLE IF NOT EXISTS results (
    uid VARCHAR, key VARCHAR, value JSON, value_num DOUBLE, PRIMARY KEY (uid, key)
);
CREATE TABLE IF NOT EXISTS metrics (
    uid VARCHAR, key VARCHAR, step BIGINT, value DOUBLE, ts TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS labels (
    uid VARCHAR, key VARCHAR, value VARCHAR, PRIMARY KEY (uid, key)
);
CREATE TABLE IF NOT EXISTS artifacts (
    uid VARCHAR, key VARCHAR, kind VARCHAR, uri VARCHAR, sha256 VARCHAR, size BIGINT,
    format VARCHAR, labels JSON, meta JSON, PRIMARY KEY (uid, key)
);
CREATE TABLE IF NOT EXISTS logs (
    uid VARCHAR, stream VARCHAR, line_no BIGINT, ts TIMESTAMPTZ, text VARCHAR, PRIMARY KEY (uid, line_no)
);
CREATE TABLE IF NOT EXISTS events (
    position BIGINT, partition INTEGER, "offset" BIGINT, event_id VARCHAR, run_uid VARCHAR,
    seq BIGINT, type VARCHAR, ts TIMESTAMPTZ, payload JSON, stream VARCHAR
);
CREATE TABLE IF NOT EXISTS dead_letters (
    partition INTEGER, "offset" BIGINT, key VARCHAR, error VARCHAR, raw BLOB,
    received_at TIMESTAMPTZ, event_id VARCHAR, run_uid VARCHAR, stream VARCHAR, seq BIGINT,
    type VARCHAR
);
CREATE TABLE IF NOT EXISTS conflicts (
    partition INTEGER, "offset" BIGINT, event_id VARCHAR, run_uid VARCHAR, stream VARCHAR,
    seq BIGINT, type VARCHAR, reason VARCHAR, payload VARCHAR, received_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS duplicates (
    partition INTEGER, "offset" BIGINT, event_id VARCHAR, run_uid VARCHAR, stream VARCHAR,
    seq BIGINT, type VARCHAR, received_at TIMESTAMPTZ
);
CREATE OR REPLACE VIEW result_history AS
    SELECT run_uid AS uid, payload->>'$.key' AS key, (payload->>'$.value')::JSON AS value,
           TRY_CAST(payload->>'$.value' AS DOUBLE) AS value_num, position, ts
    FROM events WHERE type = 'result';
CREATE TABLE IF NOT EXISTS run_progress (uid VARCHAR, stream VARCHAR, last_seq BIGINT, PRIMARY KEY (uid, stream));
CREATE TABLE IF NOT EXISTS run_starts (uid VARCHAR PRIMARY KEY, stream VARCHAR, event_id VARCHAR);
CREATE TABLE IF NOT EXISTS log_progress (uid VARCHAR PRIMARY KEY, lines BIGINT);
CREATE TABLE IF NOT EXISTS positions (partition INTEGER PRIMARY KEY, next_offset BIGINT);
CREATE TABLE IF NOT EXISTS projection_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
"""


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(_DDL)
    con.execute("INSERT OR IGNORE INTO projection_meta VALUES ('version', ?)",
                [str(PROJECTION_VERSION)])


def judged_state(rows: str = "r", now: str = "?", fallback: str = "?") -> str:
    """SQL for the public state of a `run_rows` row: 'lost' once it has been silent too long."""
    return (f"CASE WHEN {rows}.state = 'running' AND {now} - epoch({rows}.last_event_at) > "
            f"{LOST_AFTER_HEARTBEATS} * coalesce({rows}.heartbeat_interval_s, {fallback}) "
            f"THEN 'lost' ELSE {rows}.state END")


def drop_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("DROP VIEW IF EXISTS result_history")
    for table in PUBLIC_TABLES + INTERNAL_TABLES:
        con.execute(f"DROP TABLE IF EXISTS {table}")


def stored_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The projection version the file was built with; None for a new file."""
    try:
        row = con.execute("SELECT value FROM projection_meta WHERE key = 'version'").fetchone()
    except duckdb.CatalogException:
        return None
    return int(row[0]) if row else None
