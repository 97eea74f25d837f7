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

`runs_wide` is the layout runs are filtered and sorted on: one row a run, the public `runs` columns
followed by one DOUBLE column per numeric param and result key ("param.<key>", "result.<key>"),
added with ALTER TABLE the first time a key has a numeric value, so a filter on params and results
reads one table instead of joining key/value rows. `runs_wide_columns` says which key has which
column: two keys of a kind whose names DuckDB cannot tell apart (they differ only in ASCII case, see
`_ensure_value_columns`), an unprintable or very long key, and the keys beyond `MAX_VALUE_COLUMNS`
have none and are queried through `params`/`results`. It is written by `write_runs_wide` in the
transaction that writes the batch, from the tables just written, so it always agrees with them.

Deleting and amending (events written about a run by another process, see producers.amendments):
a run_deleted run, and its iterations (runs whose parent_uid it is), leave every table that holds
rows folded from its events (`RUN_ROW_TABLES`, the `amendments` and `result_history` views) and are
listed in `hidden_runs` (internal); the deleted run itself is in `deleted_runs`. Their events stay
in `events`, and events that come later are stored there without being folded. A run_restored folds
the run and its iterations again from `events`, in the transaction that applies it. `amendments`
is the history of edits (labels set and removed, notes) of the runs shown; `runs.note` is the
latest note. An iteration whose own tombstone still stands stays deleted when its parent is restored.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

if TYPE_CHECKING:
    from projections.fold import TableBatch

# Bump when a table's shape changes: a projection built by another version is rebuilt on open.
PROJECTION_VERSION = 13  # 11: JSON nested deeper than MAX_DEPTH refused; 12-13: case twins have no column

# At most this many param/result columns in runs_wide; later keys are queried through params/results.
MAX_VALUE_COLUMNS = 500
MAX_COLUMN_KEY_CHARS = 120
VALUE_TABLES = {"param": "params", "result": "results"}  # value column kind -> key/value table

# A running run counts as lost after this many of its heartbeat intervals without an event.
LOST_AFTER_HEARTBEATS = 3

PUBLIC_TABLES = ("runs", "runs_wide", "runs_wide_columns", "params", "results", "metrics", "labels",
                 "artifacts", "logs", "events", "dead_letters", "conflicts", "duplicates", "deleted_runs")
INTERNAL_TABLES = ("run_rows", "run_progress", "run_starts", "log_progress", "positions", "projection_meta",
                   "hidden_runs", "runs_wide_keys")
# Every table holding rows of a run folded from its events (keyed by `uid`): a deleted run leaves them all.
RUN_ROW_TABLES = ("run_rows", "runs", "runs_wide", "params", "results", "metrics", "labels", "artifacts",
                  "logs", "log_progress")

# The columns of the public `runs` table, in order (the query layer and the UI rely on them).
RUN_COLUMN_TYPES = (
    ("uid", "VARCHAR"), ("parent_uid", "VARCHAR"), ("iteration", "INTEGER"), ("project", "VARCHAR"),
    ("name", "VARCHAR"), ("state", "VARCHAR"), ("handler", "VARCHAR"), ("runtime", "VARCHAR"), ("host", "VARCHAR"),
    ("labels", "JSON"), ("started_at", "TIMESTAMPTZ"), ("finished_at", "TIMESTAMPTZ"), ("duration_s", "DOUBLE"),
    ("error", "VARCHAR"), ("return_value", "JSON"), ("traceback", "VARCHAR"), ("inputs", "JSON"), ("extra", "JSON"),
    ("last_event_at", "TIMESTAMPTZ"), ("note", "VARCHAR"))
RUN_COLUMNS = tuple(name for name, _ in RUN_COLUMN_TYPES)

# runs_wide's string columns that every filter, sort and listing scans whole (uid breaks ties in
# every order): kept uncompressed, as decoding them (DICT_FSST, 32 random hex characters for uid)
# was most of a query over 100k runs; ~4 MB per 100k runs. Value columns keep DuckDB's compression:
# a home holds up to MAX_VALUE_COLUMNS of them, most sparse, at 0.8 MB per 100k runs each uncompressed.
SCANNED = "USING COMPRESSION uncompressed"
SCANNED_RUN_COLUMNS = ("uid", "name")


def quoted(name: str) -> str:
    """`name` as a DuckDB quoted identifier (any character allowed, quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def runs_wide_column_ddl(name: str, kind: str) -> str:
    """The definition of runs_wide's column `name` of type `kind` (or of a table stored as runs_wide
    is): the scanned columns uncompressed, every other column compressed as DuckDB chooses."""
    return f"{quoted(name)} {kind}" + (f" {SCANNED}" if name in SCANNED_RUN_COLUMNS else "")


def _run_ddl(wide: bool = False) -> str:
    """The column definitions of a table of runs (uid the key); runs_wide's with `wide`."""
    return ", ".join((runs_wide_column_ddl(name, kind) if wide else f"{name} {kind}")
                     + (" PRIMARY KEY" if name == "uid" else "") for name, kind in RUN_COLUMN_TYPES)


_DDL = f"""
CREATE TABLE IF NOT EXISTS runs ({_run_ddl()});
CREATE TABLE IF NOT EXISTS runs_wide ({_run_ddl(wide=True)});
CREATE TABLE IF NOT EXISTS runs_wide_columns (kind VARCHAR, key VARCHAR, "column" VARCHAR PRIMARY KEY);
CREATE TABLE IF NOT EXISTS runs_wide_keys (kind VARCHAR, key VARCHAR, folded VARCHAR, PRIMARY KEY (kind, key));
CREATE TABLE IF NOT EXISTS run_rows ({_run_ddl()}, stream VARCHAR, heartbeat_interval_s DOUBLE);
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
CREATE TABLE IF NOT EXISTS deleted_runs (
    uid VARCHAR PRIMARY KEY, deleted_at TIMESTAMPTZ, deleted_by VARCHAR, reason VARCHAR, position BIGINT
);
CREATE TABLE IF NOT EXISTS hidden_runs (uid VARCHAR PRIMARY KEY, parent_uid VARCHAR);
CREATE OR REPLACE VIEW amendments AS
    SELECT run_uid AS uid, position, ts, payload->>'$.by' AS amended_by, payload->'$.labels' AS labels,
           payload->'$.removed_labels' AS removed_labels, payload->>'$.note' AS note
    FROM events WHERE type = 'run_amended' AND run_uid NOT IN (SELECT uid FROM hidden_runs);
CREATE OR REPLACE VIEW result_history AS
    SELECT run_uid AS uid, payload->>'$.key' AS key, (payload->>'$.value')::JSON AS value,
           TRY_CAST(payload->>'$.value' AS DOUBLE) AS value_num, position, ts
    FROM events WHERE type = 'result' AND run_uid NOT IN (SELECT uid FROM hidden_runs);
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


def value_columns(con: duckdb.DuckDBPyConnection | Any) -> dict[tuple[str, str], str]:
    """(kind, key) -> its runs_wide column, for the keys that have one. `con` may be a connection or
    a `query(sql) -> DataFrame` function."""
    sql = 'SELECT kind, key, "column" FROM runs_wide_columns'
    if isinstance(con, duckdb.DuckDBPyConnection):
        rows: Iterable[Sequence[Any]] = con.execute(sql).fetchall()
    else:
        rows = con(sql).itertuples(index=False)
    return {(kind, key): column for kind, key, column in rows}


def _stage(con: duckdb.DuckDBPyConnection, name: str, columns: dict[str, list[Any]], staged: list[str]) -> None:
    con.register(name, pa.table(columns))
    staged.append(name)


def write_runs_wide(con: duckdb.DuckDBPyConnection, batch: TableBatch) -> None:
    """Bring runs_wide up to date with a batch already written to runs/params/results (inside the
    caller's transaction): the runs the batch touched get their `runs` columns again, and their
    params and results changed by the batch (all of them for a run started in it) their columns."""
    touched = batch.new_runs.keys() | batch.run_updates.keys() | batch.labelled_runs
    old_values = [(uid, kind, key, num) for kind, rows in (("param", batch.params), ("result", batch.results))
                  for (uid, key), (_, num) in rows.items() if uid not in batch.new_runs]
    if not touched and not old_values:
        return
    staged: list[str] = []
    try:
        _stage(con, "_wide_new", {"uid": list(batch.new_runs)}, staged)
        _stage(con, "_wide_old", dict(zip(("uid", "kind", "key", "num"),
                                          map(list, zip(*old_values, strict=True)) if old_values else ([],) * 4,
                                          strict=True)), staged)
        values = """
            SELECT uid, kind, key, num FROM _wide_old
            UNION ALL SELECT uid, 'param', key, value_num FROM params WHERE uid IN (SELECT uid FROM _wide_new)
            UNION ALL SELECT uid, 'result', key, value_num FROM results WHERE uid IN (SELECT uid FROM _wide_new)"""
        # a batch of metrics for runs started before changes no value: no statement for it
        keys = con.execute(f"SELECT kind, key, bool_or(num IS NOT NULL) FROM ({values}) GROUP BY ALL "
                           "ORDER BY kind, key").fetchall() if batch.new_runs or old_values else []
        columns = _ensure_value_columns(con, keys, staged) if keys else {}
        if touched:
            _stage(con, "_wide_touched", {"uid": list(touched)}, staged)
            names = ", ".join(RUN_COLUMNS)
            con.execute(f"INSERT OR REPLACE INTO runs_wide ({names}) SELECT {names} FROM runs "
                        "WHERE uid IN (SELECT uid FROM _wide_touched)")
        chosen = [(kind, key, columns[(kind, key)]) for kind, key, _ in keys if (kind, key) in columns]
        if chosen:
            _update_values(con, values, chosen, staged)
    finally:
        for name in staged:
            with suppress(duckdb.Error):  # an aborted transaction refuses it too
                con.unregister(name)


def _ensure_value_columns(con: duckdb.DuckDBPyConnection, seen: Sequence[tuple[str, str, bool]],
                          staged: list[str]) -> dict[tuple[str, str], str]:
    """The runs_wide columns of the (kind, key) pairs, after adding those the numeric keys of `seen`
    (kind, key, numeric: every param and result key the batch wrote) may have (see the module
    docstring), and dropping those no key may have any more.

    DuckDB matches column names whatever their ASCII case, so two keys of a kind that differ only so
    (`loss`, `Loss`) cannot both have a column: neither has, once both have been folded, numbers or
    not (the column of the first is dropped when the second comes). Every key folded is kept in
    runs_wide_keys, which only grows, so whether a key is such a twin depends on which keys were
    folded, not on their order, their values or the batches (which keys get the MAX_VALUE_COLUMNS
    columns does depend on the order, and a column dropped so frees its place for a key that comes
    later, not for one turned away before). The batch's keys are looked up, not the whole table."""
    known = value_columns(con)
    folded = {(kind, key): f"{kind}.{key}".translate(_ASCII_LOWER) for kind, key, _ in seen}
    _stage(con, "_wide_keys", {"kind": [kind for kind, _ in folded], "key": [key for _, key in folded],
                               "folded": list(folded.values())}, staged)
    con.execute("INSERT OR IGNORE INTO runs_wide_keys SELECT kind, key, folded FROM _wide_keys")
    twinned = {name for (name,) in con.execute(
        "SELECT folded FROM runs_wide_keys WHERE folded IN (SELECT folded FROM _wide_keys) GROUP BY folded "
        "HAVING count(*) > 1").fetchall()}
    for pair in [pair for pair in known if known[pair].translate(_ASCII_LOWER) in twinned]:
        con.execute(f"ALTER TABLE runs_wide DROP COLUMN {quoted(known.pop(pair))}")
        con.execute('DELETE FROM runs_wide_columns WHERE kind = ? AND key = ?', list(pair))
    for kind, key, numeric in seen:
        if not numeric or (kind, key) in known or folded[(kind, key)] in twinned:
            continue
        if len(key) > MAX_COLUMN_KEY_CHARS or not key.isprintable() or len(known) >= MAX_VALUE_COLUMNS:
            continue
        column = f"{kind}.{key}"
        con.execute(f"ALTER TABLE runs_wide ADD COLUMN {runs_wide_column_ddl(column, 'DOUBLE')}")
        con.execute('INSERT INTO runs_wide_columns VALUES (?, ?, ?)', [kind, key, column])
        known[(kind, key)] = column
    return known


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # how DuckDB folds a name


def _update_values(con: duckdb.DuckDBPyConnection, values: str, chosen: Sequence[tuple[str, str, str]],
                   staged: list[str]) -> None:
    """Set the chosen columns from the values query (uid, kind, key, num), one pivot, one UPDATE;
    a run keeps a column the values do not name."""
    _stage(con, "_wide_columns", {"kind": [k for k, _, _ in chosen], "key": [k for _, k, _ in chosen],
                                  "idx": list(range(len(chosen)))}, staged)
    pivot = ", ".join(f"max(v.num) FILTER (WHERE c.idx = {i}) AS v{i}, bool_or(c.idx = {i}) AS h{i}"
                      for i in range(len(chosen)))
    sets = ", ".join(f"{quoted(column)} = CASE WHEN p.h{i} THEN p.v{i} ELSE runs_wide.{quoted(column)} END"
                     for i, (_, _, column) in enumerate(chosen))
    con.execute(f"""
        UPDATE runs_wide SET {sets} FROM (
            SELECT v.uid, {pivot} FROM ({values}) v JOIN _wide_columns c ON c.kind = v.kind AND c.key = v.key
            GROUP BY v.uid) p
        WHERE runs_wide.uid = p.uid""")


def has_running_runs(con: duckdb.DuckDBPyConnection) -> bool:
    """True when some run is running as folded: only those can be judged lost (the others' public
    state is set when they are written), so a catch-up with none has no judgement to refresh."""
    return con.execute("SELECT EXISTS (SELECT 1 FROM run_rows WHERE state = 'running')").fetchone() == (True,)


def drop_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("DROP VIEW IF EXISTS result_history")
    con.execute("DROP VIEW IF EXISTS amendments")
    for table in PUBLIC_TABLES + INTERNAL_TABLES:
        con.execute(f"DROP TABLE IF EXISTS {table}")


def stored_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The projection version the file was built with; None for a new file."""
    try:
        row = con.execute("SELECT value FROM projection_meta WHERE key = 'version'").fetchone()
    except duckdb.CatalogException:
        return None
    return int(row[0]) if row else None


# For a purge (see producers.bus.embedded.EmbeddedBus.blank_records, ArtifactStore.remove_unreferenced):
# the runs whose records go (every deleted run and every iteration hidden with its parent), and the
# artifact bodies the runs shown still reference.
PURGEABLE_RUNS_SQL = "SELECT uid FROM hidden_runs ORDER BY uid"


def purgeable_runs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The uids whose bus records a purge removes: deleted runs and the iterations they hide."""
    return [row[0] for row in con.execute(PURGEABLE_RUNS_SQL).fetchall()]
