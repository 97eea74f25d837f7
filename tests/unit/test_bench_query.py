"""The query benchmark's bare table is stored as runs_wide is, with its types, so its ratio is Runbus's
own cost."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pandas as pd

from benchmarks.query import bare_table
from projections.tables import RUN_COLUMNS, SCANNED_RUN_COLUMNS, create_tables


def _uncompressed(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    """The columns `table`'s DDL (as DuckDB gives it back) stores uncompressed."""
    (sql,) = con.execute("SELECT sql FROM duckdb_tables() WHERE table_name = ?", [table]).fetchone()
    return {name.strip('"') for name in re.findall(r'("?[\w.]+"?) \w+ USING COMPRESSION Uncompressed', sql)}


def test_the_bare_table_keeps_uncompressed_exactly_the_columns_runs_wide_does(tmp_path: Path) -> None:
    projection = duckdb.connect()
    create_tables(projection)
    projection.execute("INSERT INTO runs (uid, name, project, started_at) VALUES "
                       "('a', 'q0', 'bench', now()), ('b', 'q1', 'bench', now())")
    projection.execute("INSERT INTO params VALUES ('a', 'p1', '3', 3), ('b', 'p1', '4', 4)")
    projection.execute("INSERT INTO results VALUES ('a', 'loss', '0.5', 0.5), ('b', 'loss', '0.1', 0.1)")
    db = SimpleNamespace(sql=lambda query: projection.sql(query).df())

    bare = bare_table(db, tmp_path / "bare.duckdb")  # type: ignore[arg-type]
    try:
        assert _uncompressed(projection, "runs_wide") == set(SCANNED_RUN_COLUMNS)
        assert _uncompressed(bare, "bare") == set(SCANNED_RUN_COLUMNS)
        frame = bare.execute('SELECT uid, "param.p1", "result.loss" FROM bare ORDER BY uid').df()
        pd.testing.assert_frame_equal(frame, pd.DataFrame({"uid": ["a", "b"], "param.p1": [3.0, 4.0],
                                                           "result.loss": [0.5, 0.1]}))
    finally:
        bare.close()


def _types(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    return dict(con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ?",
                            [table]).fetchall())


def test_the_bare_table_has_runs_wide_types_even_for_columns_no_run_filled(tmp_path: Path) -> None:
    """A column every run left empty (parent_uid, error, note...) arrives in pandas as all None; were it
    stored as DuckDB's NULL type, the bare table would scan nothing for it and look cheaper."""
    projection = duckdb.connect()
    create_tables(projection)
    projection.execute("INSERT INTO runs (uid, name, project, started_at) VALUES ('a', 'q0', 'bench', now())")
    projection.execute("INSERT INTO results VALUES ('a', 'loss', '0.5', 0.5)")
    db = SimpleNamespace(sql=lambda query: projection.sql(query).df())

    bare = bare_table(db, tmp_path / "bare.duckdb")  # type: ignore[arg-type]
    try:
        wide = _types(projection, "runs_wide")
        assert _types(bare, "bare") == {name: wide[name] for name in RUN_COLUMNS} | {"result.loss": "DOUBLE"}
    finally:
        bare.close()
