"""Helpers to compare projections: every public table's rows, in a canonical order."""

from __future__ import annotations

import duckdb

# Columns that legitimately differ between two foldings of the same log.
_VOLATILE = {"dead_letters": ["received_at"]}
TABLES = ("runs", "params", "results", "metrics", "labels", "artifacts", "events", "dead_letters", "deleted_runs",
          "amendments")


def snapshot(con: duckdb.DuckDBPyConnection, ignore: dict[str, list[str]] | None = None,
             tables: tuple[str, ...] = TABLES) -> dict[str, list[tuple]]:
    """Each table's rows as sorted tuples of text, without the columns named in `ignore`."""
    skipped = {**_VOLATILE, **(ignore or {})}
    rows = {}
    for table in tables:
        columns = [c[0] for c in con.execute(f"DESCRIBE {table}").fetchall()
                   if c[0] not in skipped.get(table, []) and c[0] not in _VOLATILE.get(table, [])]
        select = ", ".join(f'"{c}"::VARCHAR' for c in columns)
        rows[table] = sorted(con.execute(f"SELECT {select} FROM {table}").fetchall(),
                             key=lambda r: tuple("" if v is None else v for v in r))
    return rows


# Where a log was copied to another bus, records sit at other partitions and offsets.
WHERE_IT_SITS = {"events": ["position", "partition", "offset"], "deleted_runs": ["position"],
                 "amendments": ["position"]}
