"""Helpers to compare projections: every public table's rows, in a canonical order."""

from __future__ import annotations

import duckdb

# Columns that legitimately differ between two foldings of the same log.
_VOLATILE = {"dead_letters": ["received_at"]}
TABLES = ("runs", "params", "results", "metrics", "labels", "artifacts", "events", "dead_letters")


def snapshot(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    rows = {}
    for table in TABLES:
        columns = [c[0] for c in con.execute(f"DESCRIBE {table}").fetchall()
                   if c[0] not in _VOLATILE.get(table, [])]
        select = ", ".join(f'"{c}"::VARCHAR' for c in columns)
        rows[table] = sorted(con.execute(f"SELECT {select} FROM {table}").fetchall(),
                             key=lambda r: tuple("" if v is None else v for v in r))
    return rows


def snapshot_file(path: str) -> dict[str, list[tuple]]:
    con = duckdb.connect(path, read_only=True)
    try:
        return snapshot(con)
    finally:
        con.close()
