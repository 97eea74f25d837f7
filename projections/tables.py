"""DDL of the projection tables (the public SQL contract) and of the projector's own bookkeeping."""

from __future__ import annotations

import duckdb

# Bump when a table's shape changes: a projection built by another version is rebuilt on open.
PROJECTION_VERSION = 3

PUBLIC_TABLES = ("runs", "params", "results", "metrics", "labels", "artifacts", "events",
                 "dead_letters")
INTERNAL_TABLES = ("run_progress", "positions", "projection_meta")

_DDL = """
CREATE TABLE IF NOT EXISTS runs (
    uid VARCHAR PRIMARY KEY, parent_uid VARCHAR, iteration INTEGER, project VARCHAR,
    name VARCHAR, state VARCHAR, handler VARCHAR, runtime VARCHAR, host VARCHAR,
    labels JSON, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, duration_s DOUBLE,
    error VARCHAR, return_value JSON, traceback VARCHAR, inputs JSON, extra JSON,
    last_event_at TIMESTAMPTZ
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
CREATE TABLE IF NOT EXISTS events (
    position BIGINT, partition INTEGER, "offset" BIGINT, event_id VARCHAR, run_uid VARCHAR,
    seq BIGINT, type VARCHAR, ts TIMESTAMPTZ, payload JSON, stream VARCHAR
);
CREATE TABLE IF NOT EXISTS dead_letters (
    partition INTEGER, "offset" BIGINT, key VARCHAR, error VARCHAR, raw BLOB,
    received_at TIMESTAMPTZ
);
CREATE OR REPLACE VIEW result_history AS
    SELECT run_uid AS uid, payload->>'$.key' AS key, (payload->>'$.value')::JSON AS value,
           TRY_CAST(payload->>'$.value' AS DOUBLE) AS value_num, position, ts
    FROM events WHERE type = 'result';
CREATE TABLE IF NOT EXISTS run_progress (uid VARCHAR, stream VARCHAR, last_seq BIGINT, PRIMARY KEY (uid, stream));
CREATE TABLE IF NOT EXISTS positions (partition INTEGER PRIMARY KEY, next_offset BIGINT);
CREATE TABLE IF NOT EXISTS projection_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
"""


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(_DDL)
    con.execute("INSERT OR IGNORE INTO projection_meta VALUES ('version', ?)",
                [str(PROJECTION_VERSION)])


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
