"""Finding 1: no statement through any SQL surface changes a table or writes a file.

A corpus of statement kinds and of the wrappers that once slipped them through (EXPLAIN ANALYZE,
data-modifying CTEs, several statements, transactions, PREPARE, the query() table function) is
sent through every surface: `get_run_db().sql`, `as_of` queries, `runbus sql`, the UI's SQL page
and `POST /api/sql`, and the RunDB routed through the UI. After each attempt every table, view,
macro, sequence, attached database and setting is as before, no file was written, and the call
raised one clear line. Statements that DuckDB runs without effect (EXPLAIN ANALYZE VACUUM...) may
answer, but must change nothing either.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import duckdb
import pandas as pd
import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import close_session
from projections import ReadOnlyError, database
from tests.e2e.test_ui import RUNBUS, start_ui, stop
from tests.support.handlers import seed_like

OUT = "{out}"  # replaced by a directory that must stay empty

REFUSED = [
    "DELETE FROM runs",
    "DROP TABLE runs",
    "EXPLAIN ANALYZE DELETE FROM runs",
    "EXPLAIN ANALYZE TRUNCATE runs",
    "EXPLAIN ANALYZE UPDATE results SET value_num = value_num + 1, value = '1'",
    "EXPLAIN ANALYZE INSERT INTO labels VALUES ('x', 'evil', 'yes')",
    "EXPLAIN ANALYZE INSERT INTO runs SELECT * FROM runs",
    "EXPLAIN ANALYZE UPDATE positions SET next_offset = next_offset + 1000000",
    "EXPLAIN ANALYZE DELETE FROM projection_meta",
    "EXPLAIN ANALYZE CREATE TABLE evil AS SELECT 1 AS x",
    "EXPLAIN ANALYZE CREATE VIEW evil AS SELECT 1 AS x",
    "EXPLAIN ANALYZE CREATE MACRO evil(x) AS x + 1",
    "EXPLAIN ANALYZE CREATE SEQUENCE evil",
    "EXPLAIN ANALYZE CREATE SCHEMA evil",
    "EXPLAIN ANALYZE DROP TABLE runs",
    "EXPLAIN ANALYZE ALTER TABLE runs ADD COLUMN evil INTEGER",
    "EXPLAIN ANALYZE ALTER TABLE runs RENAME TO evil",
    "EXPLAIN ANALYZE COPY (SELECT * FROM runs) TO '{out}/copy.csv'",
    "EXPLAIN ANALYZE COPY runs TO '{out}/copy.parquet' (FORMAT parquet)",
    "EXPLAIN COPY runs TO '{out}/explained.csv'",
    "EXPLAIN ANALYZE COPY runs FROM '{out}/missing.csv'",
    "COPY runs TO '{out}/plain.csv'",
    "COPY runs TO 'relative.csv'",
    "EXPORT DATABASE '{out}/export'",
    "ATTACH '{out}/other.duckdb' AS other",
    "ATTACH ':memory:' AS other",
    "DETACH runbus",
    "INSTALL httpfs",
    "LOAD httpfs",
    "EXPLAIN ANALYZE INSTALL httpfs",
    "EXPLAIN ANALYZE CREATE SECRET evil (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "SET threads = 1",
    "SET enable_external_access = true",
    "SET profile_output = '{out}/profile.json'",
    "RESET TimeZone",
    "PRAGMA enable_profiling",
    "EXPLAIN ANALYZE PRAGMA threads = 1",
    "EXPLAIN ANALYZE SET enable_external_access = true",
    "CHECKPOINT",
    "VACUUM",
    "CALL dbgen(sf = 0.01)",
    "SELECT 1; DELETE FROM runs",
    "SELECT 1; SELECT 2",
    "BEGIN TRANSACTION; DELETE FROM runs; COMMIT",
    "COMMIT",
    "ROLLBACK",
    "WITH gone AS (DELETE FROM runs RETURNING uid) SELECT * FROM gone",
    "EXPLAIN ANALYZE WITH gone AS (DELETE FROM runs RETURNING uid) SELECT * FROM gone",
    "WITH moved AS (UPDATE positions SET next_offset = 0 RETURNING *) SELECT count(*) FROM moved",
    "PREPARE evil AS DELETE FROM runs",
    "SELECT * FROM query('DELETE FROM runs RETURNING uid')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM '{out}/../secret.csv'",
    "SELECT * FROM read_parquet('{out}/copy.parquet')",
]

# DuckDB runs these in a read-only transaction without effect on the tables or files
HARMLESS = [
    "EXPLAIN ANALYZE VACUUM",
    "EXPLAIN ANALYZE COMMIT",
    "EXPLAIN ANALYZE SET VARIABLE evil = 1",
    "EXPLAIN ANALYZE CREATE TEMP TABLE evil AS SELECT 1 AS x",
    "SELECT * FROM checkpoint()",
]

# what `runbus sql` is tried with (each is a process start): one of each kind of wrapper
CLI_SAMPLE = [
    "EXPLAIN ANALYZE DELETE FROM runs",
    "EXPLAIN ANALYZE UPDATE positions SET next_offset = next_offset + 1000000",
    "EXPLAIN ANALYZE COPY (SELECT * FROM runs) TO '{out}/copy.csv'",
    "COPY runs TO 'relative.csv'",
    "EXPORT DATABASE '{out}/export'",
    "ATTACH '{out}/other.duckdb' AS other",
    "SET enable_external_access = true",
    "SELECT 1; DELETE FROM runs",
    "WITH gone AS (DELETE FROM runs RETURNING uid) SELECT * FROM gone",
    "SELECT * FROM read_text('/etc/hostname')",
]

CATALOG = """
SELECT 'table' AS kind, database_name, schema_name, table_name AS name FROM duckdb_tables()
UNION ALL SELECT 'view', database_name, schema_name, view_name FROM duckdb_views() WHERE NOT internal
UNION ALL SELECT 'sequence', database_name, schema_name, sequence_name FROM duckdb_sequences()
UNION ALL SELECT 'schema', database_name, schema_name, '' FROM duckdb_schemas() WHERE NOT internal
UNION ALL SELECT 'macro', database_name, schema_name, function_name FROM duckdb_functions()
    WHERE function_type LIKE '%macro%' AND NOT internal
UNION ALL SELECT 'database', database_name, '', '' FROM duckdb_databases() WHERE NOT internal
ORDER BY ALL"""

Sql = Callable[[str], pd.DataFrame]


def fingerprint(sql: Sql) -> dict[str, object]:
    """Everything a statement could have changed, read through the surface itself: the catalog,
    each table's rows (count and a digest of every row), and every setting."""
    catalog = sql(CATALOG)
    state: dict[str, object] = {"catalog": catalog.to_json(orient="values")}
    for row in catalog[catalog.kind == "table"].itertuples():
        name = f'"{row.database_name}"."{row.schema_name}"."{row.name}"'
        digest = sql(f"SELECT count(*) AS n, coalesce(md5(string_agg(md5(t::VARCHAR), ',' "
                     f"ORDER BY md5(t::VARCHAR))), '') AS digest FROM {name} t")
        state[name] = (int(digest.n[0]), str(digest.digest[0]))
    state["settings"] = sql("SELECT name, value FROM duckdb_settings() ORDER BY name").to_json(orient="values")
    return state


@dataclass
class Arena:
    out: Path   # the directory every statement aims its files at
    cwd: Path   # where relative paths land

    def statement(self, template: str) -> str:
        return template.replace(OUT, str(self.out))

    def written(self) -> list[str]:
        return sorted(str(p) for p in (*self.out.rglob("*"), *self.cwd.rglob("*")))


@pytest.fixture
def arena(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Arena:
    """Two runs (one with a label) on the embedded bus; the working directory is an empty one."""
    for p1 in (1, 2):
        new_function().run(NewRun(handler=seed_like, name=f"seed{p1}", params={"p1": p1}).set_label("k", "v"))
    (tmp_path / "secret.csv").write_text("a,b\n1,2\n")
    arena = Arena(tmp_path / "out", tmp_path / "cwd")
    arena.out.mkdir()
    arena.cwd.mkdir()
    monkeypatch.chdir(arena.cwd)
    return arena


def assert_one_line(message: str, statement: str) -> None:
    assert message.strip(), f"{statement!r}: empty error"
    assert "\n" not in message.strip(), f"{statement!r}: error is not one line: {message!r}"
    assert "Traceback" not in message


def attempt(run: Callable[[], object], statement: str, refused: bool) -> None:
    try:
        run()
    except (ValueError, duckdb.Error) as exc:  # ReadOnlyError, or DuckDB's own error class
        assert_one_line(str(exc), statement)
    else:
        assert not refused, f"{statement!r} was accepted"


def test_get_run_db_sql_changes_nothing_whatever_the_wrapper(arena: Arena,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # the projection stays open between calls (a refused call closes it), so a statement that
    # answers is followed by a fingerprint of the same open database: its settings included
    monkeypatch.setattr(database, "_linger_s", 600.0)
    db = get_run_db()
    before = fingerprint(db.sql)
    for template, refused in [(s, True) for s in REFUSED] + [(s, False) for s in HARMLESS]:
        statement = arena.statement(template)
        attempt(lambda sql=statement: db.sql(sql), statement, refused)
        assert fingerprint(db.sql) == before, f"{statement!r} changed the projection"
        assert arena.written() == [], f"{statement!r} wrote {arena.written()}"
    assert set(db.list_runs().name) == {"seed1", "seed2"}


def test_refusals_are_read_only_errors_naming_the_statement(arena: Arena) -> None:
    db = get_run_db()
    for statement in ("EXPLAIN ANALYZE DELETE FROM runs", f"EXPLAIN ANALYZE COPY runs TO '{arena.out}/x.csv'",
                      "EXPLAIN ANALYZE PRAGMA threads = 1", "SELECT 1; SELECT 2"):
        with pytest.raises(ReadOnlyError, match="read-only") as refused:
            db.sql(statement)
        assert statement[:30] in str(refused.value) or "one statement at a time" in str(refused.value)


def test_as_of_queries_change_nothing(arena: Arena) -> None:
    db = get_run_db()
    position = int(db.sql("SELECT max(position) AS p FROM events").p[0])
    past = get_run_db(as_of=position)
    before = fingerprint(db.sql)
    for template in REFUSED:
        statement = arena.statement(template)
        attempt(lambda sql=statement: past.sql(sql), statement, refused=True)
        assert arena.written() == [], f"{statement!r} wrote {arena.written()}"
    assert fingerprint(db.sql) == before
    assert len(past.sql("SELECT uid FROM runs")) == 2


# statements that end (or try to end) the transaction they run in: an EXPLAIN ANALYZE runs what it wraps
TRANSACTION_ENDERS = ["EXPLAIN ANALYZE COMMIT", "EXPLAIN ANALYZE ROLLBACK", "EXPLAIN ANALYZE ABORT",
                      "EXPLAIN COMMIT", "EXPLAIN ANALYZE BEGIN TRANSACTION"]
SESSION_WRITES = ["EXPLAIN ANALYZE DELETE FROM runs", "EXPLAIN ANALYZE CREATE TABLE evil AS SELECT 42 AS x",
                  "EXPLAIN ANALYZE UPDATE positions SET next_offset = next_offset + 1000000",
                  "WITH gone AS (DELETE FROM runs RETURNING uid) SELECT * FROM gone"]


@pytest.mark.parametrize("past", [False, True], ids=["live", "as_of"])
def test_a_statement_ending_its_transaction_leaves_the_session_read_only(arena: Arena, past: bool) -> None:
    """EXPLAIN ANALYZE COMMIT committed a session's READ ONLY transaction: its next statements ran
    outside any and wrote (runs deleted for every later reader). A session's statements other than
    SELECT now run apart, so what they end is theirs."""
    db = get_run_db()
    surface = get_run_db(as_of=int(db.sql("SELECT max(position) AS p FROM events").p[0])) if past else db
    before, live_before = fingerprint(surface.sql), fingerprint(db.sql)
    with surface.reader() as fetch:
        for ender in TRANSACTION_ENDERS:
            attempt(lambda sql=ender: fetch(sql), ender, refused=False)
            for statement in SESSION_WRITES:
                attempt(lambda sql=statement: fetch(sql), statement, refused=True)
            assert fetch("SELECT count(*) AS n FROM runs").n[0] == 2
    assert fingerprint(surface.sql) == before and fingerprint(db.sql) == live_before
    assert set(db.list_runs().name) == {"seed1", "seed2"}


def test_runbus_sql_refuses_on_one_line_and_changes_nothing(arena: Arena) -> None:
    db = get_run_db()
    before = fingerprint(db.sql)
    env = {**os.environ}
    for template in CLI_SAMPLE:
        statement = arena.statement(template)
        done = subprocess.run([RUNBUS, "sql", statement], cwd=arena.cwd, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode != 0, f"{statement!r} was accepted: {done.stdout}"
        assert done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert arena.written() == [], f"{statement!r} wrote {arena.written()}"
    assert fingerprint(db.sql) == before


@dataclass
class Served:
    url: str
    token: str

    def post(self, route: str, body: bytes, content_type: str, bearer: bool = True) -> tuple[int, str]:
        headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {self.token}"} if bearer else {})}
        request = urllib.request.Request(self.url + route, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def sql(self, statement: str) -> pd.DataFrame:
        status, text = self.post("/api/sql", json.dumps({"sql": statement}).encode(), "application/json")
        assert status == 200, text
        payload = json.loads(text)
        return pd.DataFrame(payload["rows"], columns=payload["columns"])


@pytest.fixture
def served(arena: Arena, home: Path, tmp_path: Path) -> Iterator[Served]:
    close_session()  # the UI process takes the projection; this one only routes to it
    process, url = start_ui(home, {**os.environ, "RUNBUS_DB_TIMEOUT": "10"}, tmp_path / "ui.log")
    try:
        yield Served(url, (home / "ui.token").read_text())
    finally:
        stop(process)


def test_the_ui_and_the_routed_run_db_change_nothing(arena: Arena, served: Served) -> None:
    before = fingerprint(served.sql)
    routed = get_run_db()
    for template, refused in [(s, True) for s in REFUSED] + [(s, False) for s in HARMLESS]:
        statement = arena.statement(template)
        status, text = served.post("/api/sql", json.dumps({"sql": statement}).encode(), "application/json")
        if refused:
            assert status == 400, f"{statement!r} was accepted by /api/sql: {text[:200]}"
            assert_one_line(json.loads(text)["error"], statement)
        status, page = served.post("/sql", urlencode({"q": statement}).encode(), "application/x-www-form-urlencoded")
        assert status == 200 and ('id="sql-error"' in page or not refused), f"{statement!r} on the SQL page"
        attempt(lambda sql=statement: routed.sql(sql), statement, refused)
        assert fingerprint(served.sql) == before, f"{statement!r} changed the projection"
        assert arena.written() == [], f"{statement!r} wrote {arena.written()}"
    assert len(served.sql("SELECT uid FROM runs")) == 2


def test_ui_reads_files_only_under_a_directory_the_user_opted_in_and_writes_none(arena: Arena, home: Path,
                                                                                  tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data.csv").write_text("a,b\n1,2\n")
    (shared / "link.csv").symlink_to(tmp_path / "secret.csv")  # links lead out of the opted-in directory
    (shared / "sub").symlink_to(tmp_path)
    close_session()
    process, url = start_ui(home, {**os.environ, "RUNBUS_DB_TIMEOUT": "10"}, tmp_path / "ui.log",
                            "--sql-read-dir", str(shared))
    try:
        served = Served(url, (home / "ui.token").read_text())
        before = fingerprint(served.sql)
        assert served.sql(f"SELECT a + b AS s FROM read_csv('readonly://{shared}/data.csv')").s.tolist() == [3]
        for refused in (f"SELECT * FROM read_csv('{shared}/data.csv')",  # the plain path stays closed
                        f"SELECT * FROM read_csv('readonly://{tmp_path}/secret.csv')",
                        f"SELECT * FROM read_csv('readonly://{shared}/../secret.csv')",
                        "SELECT * FROM read_text('readonly:///etc/hostname')",
                        f"COPY runs TO 'readonly://{shared}/data.csv'", f"COPY runs TO 'readonly://{shared}/new.csv'",
                        f"EXPLAIN ANALYZE COPY runs TO '{shared}/new.csv'",
                        f"COPY runs TO 'readonly://{shared}/new.parquet' (FORMAT parquet)",
                        f"EXPORT DATABASE 'readonly://{shared}/export'",
                        f"ATTACH 'readonly://{shared}/other.duckdb' AS other"):
            status, text = served.post("/api/sql", json.dumps({"sql": refused}).encode(), "application/json")
            assert status == 400, refused
            message = json.loads(text)["error"]
            assert "read-only" in message and "\n" not in message, (refused, message)
        for escape in (f"SELECT * FROM read_csv('readonly://{shared}/link.csv')",
                       f"SELECT * FROM read_csv('readonly://{shared}/sub/secret.csv')",
                       f"SELECT * FROM glob('readonly://{shared}/sub/*')"):
            status, text = served.post("/api/sql", json.dumps({"sql": escape}).encode(), "application/json")
            assert status == 400 and "\n" not in json.loads(text)["error"], (escape, text)
        assert sorted(p.name for p in shared.iterdir()) == ["data.csv", "link.csv", "sub"]
        assert (shared / "data.csv").read_text() == "a,b\n1,2\n"
        assert fingerprint(served.sql) == before
    finally:
        stop(process)
    assert "SQL may read (never write)" in (tmp_path / "ui.log").read_text()


def test_no_statement_writes_into_duckdbs_temp_directories(arena: Arena, home: Path) -> None:
    """DuckDB allows its temp directory (`.tmp` beside a memory database, `<file>.tmp` beside the
    projection) to be written when external access is off: the sealed databases have none."""
    for folder in (arena.cwd / ".tmp", home / "runbus.duckdb.tmp"):
        folder.mkdir()
    db = get_run_db()
    position = int(db.sql("SELECT max(position) AS p FROM events").p[0])
    for surface in (db, get_run_db(as_of=position)):
        for target in (".tmp/x.csv", f"{home}/runbus.duckdb.tmp/x.csv"):
            statement = f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{target}'"
            with pytest.raises(ReadOnlyError):
                surface.sql(statement)
    assert list((arena.cwd / ".tmp").iterdir()) == [] and list((home / "runbus.duckdb.tmp").iterdir()) == []


def test_a_query_that_runs_too_long_is_stopped_and_the_projection_answers_again(arena: Arena) -> None:
    from projections.query import QueryTimeout, read_only_query

    con = duckdb.connect(":memory:")
    endless = "SELECT sum(hash(a.range * b.range)) FROM range(1000000) a, range(1000000) b"
    with pytest.raises(QueryTimeout, match=r"longer than 0\.5s"):
        read_only_query(con, endless, timeout_s=0.5)
    assert read_only_query(con, "SELECT 42 AS x").x.tolist() == [42]


def test_an_error_a_user_statement_raises_never_counts_as_a_damaged_file(arena: Arena, home: Path) -> None:
    """The message of a user's error is the user's to choose: it must not move the projection aside."""
    db = get_run_db()
    for statement in ("SELECT error('Corrupt database file')", "SELECT error('not a valid DuckDB database file')",
                      "SELECT CAST('Could not read enough bytes' AS INTEGER)"):
        with pytest.raises(duckdb.Error):
            db.sql(statement)
    assert sorted(p.name for p in home.glob("runbus.duckdb.corrupt-*")) == []
    assert set(db.list_runs().name) == {"seed1", "seed2"}
