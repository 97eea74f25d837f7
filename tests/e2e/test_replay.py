"""Replay from the log: time travel, history, rerun, export/import, user projections, tail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import fastavro
import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import close_session, session
from engine.loader import load_handler
from producers.bus.embedded import EmbeddedBus
from projections import Projector, open_projection
from projections.database import close_all
from tests.support import handlers
from tests.support.crash import kill_projector_mid_stream
from tests.support.foreign import append, envelope, finished, started
from tests.support.polling import line_within
from tests.support.tables import WHERE_IT_SITS, snapshot

ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")
LEADERBOARD = "projections.examples.leaderboard:Leaderboard"


def _evolving(context, rounds=3):
    for r in range(rounds):
        context.log_result("accuracy", 0.5 + r / 10)
        context.log_metric("loss", 1.0 / (r + 1), step=r)
        context.set_label("round", r)
    return rounds


def _record(count: int = 3) -> list[str]:
    return [new_function().run(NewRun(handler=_evolving, name=f"r{i % 2}", params={"rounds": 2 + i})).uid
            for i in range(count)]


@pytest.mark.projection("inprocess")  # reads the tables through this process's own connection
def test_as_of_positions_equal_tables_of_a_truncated_log(bus_home: Path, tmp_path: Path) -> None:
    _record(5)
    db = get_run_db()
    order = db.sql('SELECT position, partition, "offset" FROM events ORDER BY position')
    records = order.groupby(["partition", "offset"]).position.max()  # a record may hold several events
    bus = session().services.bus
    raw = {(r.partition, r.offset): (r.key, r.value) for r in bus.read({}, 100_000, 1.0)}
    while len(raw) < len(records):  # Kafka hands out partitions a batch at a time
        positions = {}
        for (part, off) in raw:
            positions[part] = max(positions.get(part, 0), off + 1)
        raw.update({(r.partition, r.offset): (r.key, r.value) for r in bus.read(positions, 100_000, 1.0)})
    with open_projection(session().services.settings.db_path) as con:
        live_before = snapshot(con)

    ends = sorted(records)  # positions at which a truncated log ends: the last event of a record
    assert len(ends) >= 5
    for cutoff in ends:
        truncated = EmbeddedBus(tmp_path / f"cut{cutoff}.sqlite")
        truncated.append([raw[(row.partition, row.offset)] for row in order.itertuples() if row.position <= cutoff])
        with duckdb.connect(":memory:") as con:
            Projector(truncated, con).catch_up()
            expected = snapshot(con, WHERE_IT_SITS)
        with get_run_db(as_of=cutoff).connection() as con:
            assert snapshot(con, WHERE_IT_SITS) == expected, f"as_of={cutoff}"

    with open_projection(session().services.settings.db_path) as con:
        assert snapshot(con) == live_before  # the live projection was only read


def test_positions_are_where_events_sit_on_the_bus_so_a_rebuild_gives_the_same(bus_home: Path) -> None:
    for uid in _record(4):  # folded a run at a time, as a live projector does
        get_run_db().read_run(uid)
    positions = "SELECT event_id, position FROM events ORDER BY event_id"
    live = get_run_db().sql(positions)
    with duckdb.connect(":memory:") as con:  # every record already there: read in another order on Kafka
        Projector(session().services.bus, con).catch_up()
        rebuilt = con.execute(positions).fetchdf()
    assert len(live) > 20 and live.equals(rebuilt)
    placed = get_run_db().sql('SELECT count(*) AS n FROM events '
                              'WHERE position >> 24 <> "offset" OR (position >> 16) & 255 <> partition')
    assert placed.n[0] == 0


def test_as_of_a_time_shows_a_result_before_it_was_overwritten(bus_home: Path) -> None:
    def two_values(context):
        context.log_result("accuracy", 0.1)
        time.sleep(0.3)
        context.log_result("accuracy", 0.9)

    run = new_function().run(NewRun(handler=two_values))
    db = get_run_db()
    history = db.sql("SELECT value_num, ts FROM result_history WHERE uid = ? AND key = 'accuracy' "
                     "ORDER BY position", [run.uid])
    assert list(history.value_num) == [0.1, 0.9]
    between = history.ts[0] + (history.ts[1] - history.ts[0]) / 2
    past = get_run_db(as_of=between.isoformat()).read_run(run.uid)
    assert past["results"] == {"accuracy": 0.1} and past["state"] == "running"
    assert db.read_run(run.uid)["results"]["accuracy"] == 0.9


def test_rerun_of_the_seed_run_gives_the_same_results_and_links_it(bus_home: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    handler = load_handler(f"{ROOT}/examples/quickstart.py:handler")
    secrets = tmp_path / "secrets.txt"
    secrets.write_text("PASSWORD=1234\n")
    first = new_function().run(NewRun(handler=handler, name="demo", params={"p1": 5})
                               .with_secrets("file", str(secrets)).set_label("type", "demo"))
    monkeypatch.setenv("PASSWORD", "1234")  # the current secret source for the rerun

    again = get_run_db().rerun(first.uid)

    assert again.uid != first.uid and again.state == "completed"
    assert again.results == first.results
    record = get_run_db().read_run(again.uid)
    assert record["extra"]["rerun_of"] == first.uid
    assert record["labels"] == {"type": "demo", "category": "tests"}
    assert record["params"] == {"p1": 5}
    assert get_run_db().rerun(first.uid, params={"p1": 2}).results["loss"] == 6


def test_rerun_warns_or_fails_when_an_input_changed(home: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("x\n1\n2\n")
    run = new_function().run(NewRun(handler=handlers.count_rows).with_input("data", str(data)))
    data.write_text("x\n1\n2\n3\n")
    with pytest.warns(UserWarning, match="input 'data'.*changed"):
        assert get_run_db().rerun(run.uid).results == {"rows": 3}
    # the handler's module must load in the CLI's process too: rerun asks that before it reads inputs
    env = {**os.environ, "RUNBUS_HOME": str(home), "PYTHONPATH": str(ROOT)}
    warned = subprocess.run([RUNBUS, "rerun", run.uid], env=env, capture_output=True, text=True, timeout=60)
    assert warned.returncode == 0, warned.stderr
    said = [line for line in warned.stderr.splitlines() if "changed" in line]  # one line, not Python's warning
    assert len(said) == 1 and said[0].startswith("warning: input 'data'") and "UserWarning" not in warned.stderr
    failed = subprocess.run([RUNBUS, "rerun", run.uid, "--strict"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert failed.returncode == 1 and "changed since run" in failed.stderr


IMPORT_MARKED = {**WHERE_IT_SITS, "runs": ["extra"], "events": [*WHERE_IT_SITS["events"], "payload"]}


def _marked_columns(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, object]]:
    """The columns an import marks, parsed: runs.extra by uid and events.payload by event id."""
    return {"runs": {uid: json.loads(extra) for uid, extra in con.execute("SELECT uid, extra FROM runs").fetchall()},
            "events": {event_id: json.loads(payload) for event_id, payload
                       in con.execute("SELECT event_id, payload FROM events").fetchall()}}


def _as_imported(marked: dict[str, dict[str, object]], origin: str) -> dict[str, dict[str, object]]:
    """`_marked_columns` of a home as an import of it shows them: every run (and its run_started
    payload) records `imported_from`."""
    mark = {"imported_from": json.dumps(origin)}  # run_started's extra holds JSON text; runs.extra the values
    return {"runs": {uid: {**extra, "imported_from": origin} for uid, extra in marked["runs"].items()},
            "events": {event_id: {**payload, "extra": {**payload["extra"], **mark}} if "handler" in payload else payload
                       for event_id, payload in marked["events"].items()}}


def test_export_then_import_into_an_empty_home_gives_identical_tables(bus_home: Path, tmp_path: Path) -> None:
    """Identical but for the mark every imported run carries: extra.imported_from, the file's name."""
    handler = load_handler(f"{ROOT}/examples/quickstart.py:handler")
    new_function().run(NewRun(handler=handler, params={"p1": 5}))
    _record(2)
    env = {**os.environ}
    export = tmp_path / "events.avro"
    bodies = tmp_path / "bodies.tar.gz"
    done = subprocess.run([RUNBUS, "export", "-o", str(export), "--with-artifacts", str(bodies)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with open_projection(session().services.settings.db_path) as con:
        session().services.projector(con).catch_up()
        original, original_marked = snapshot(con, IMPORT_MARKED), _marked_columns(con)

    other = {**env, "RUNBUS_HOME": str(tmp_path / "other-home"), "RUNBUS_BUS": ""}
    for _ in range(2):  # the second import adds nothing
        imported = subprocess.run([RUNBUS, "import", str(export), "--artifacts", str(bodies)], env=other,
                                  capture_output=True, text=True, timeout=120)
        assert imported.returncode == 0, imported.stderr
    assert "imported 0 events" in imported.stdout
    close_session()
    os.environ.update(RUNBUS_HOME=other["RUNBUS_HOME"], RUNBUS_BUS="")
    try:
        with get_run_db().connection() as con:
            assert snapshot(con, IMPORT_MARKED) == original
            assert _marked_columns(con) == _as_imported(original_marked, "events.avro")
        seed = get_run_db().list_runs(name="handler")
        from engine.run import RunObject
        run = RunObject.from_record(get_run_db().read_run(seed.uid[0]), str(session().services.artifact_store.root))
        assert run.artifact("model.txt").get() == b"abc is 123"
    finally:
        close_session()


def test_a_user_projection_survives_a_projector_sigkill_and_equals_its_rebuild(
        bus_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_PROJECTIONS", LEADERBOARD)
    close_session()
    for i in range(30):
        new_function().run(NewRun(handler=_evolving, name=f"model{i % 3}", params={"rounds": 40}))
    session().services.writer.flush()
    db_path = tmp_path / "killed.duckdb"
    kill_projector_mid_stream(db_path, batch_size=2, batches=3)

    with duckdb.connect(str(db_path)) as con:
        projector = session().services.projector(con)
        projector.catch_up()
        board = con.execute("SELECT * FROM leaderboard ORDER BY ALL").fetchall()
        projector.rebuild()
        assert con.execute("SELECT * FROM leaderboard ORDER BY ALL").fetchall() == board
    accuracy = {row[0]: row[2] for row in board if row[1] == "accuracy"}
    assert accuracy == pytest.approx({"model0": 0.5 + 39 / 10, "model1": 0.5 + 39 / 10, "model2": 0.5 + 39 / 10})
    assert {row[5] for row in board if row[1] == "accuracy"} == {10 * 40}  # values seen per name


def test_a_projection_of_another_version_is_rebuilt_on_open(home: Path) -> None:
    _record(1)
    path = session().services.settings.db_path
    with get_run_db().connection():
        pass
    close_all()  # as when the process that built it ended
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE projection_meta SET value = '0' WHERE key = 'version'")
        con.execute("ALTER TABLE runs ADD COLUMN stale_column INTEGER")
    db = get_run_db()
    assert "stale_column" not in db.sql("SELECT * FROM runs").columns
    assert len(db.sql("SELECT * FROM runs")) == 1


def test_tail_shows_events_of_a_run_that_is_still_going(bus_home: Path, tmp_path: Path) -> None:
    session()  # the Kafka topic exists before tail starts
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tail = subprocess.Popen([RUNBUS, "tail", "--type", "result"], env=env, stdout=subprocess.PIPE, text=True)
    script = ("import os, time\nfrom engine import NewRun, new_function\n"
              "def until_stopped(context):\n"
              "    deadline, i = time.monotonic() + 120, 0\n"
              "    while not os.path.exists('stop') and time.monotonic() < deadline:\n"
              "        context.log_result('i', i)\n"
              "        i += 1\n"
              "        time.sleep(0.05)\n"
              "new_function().run(NewRun(handler=until_stopped, name='slow'))\n")
    # the job logs until the test says stop: a tail that starts late still sees it going
    job = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path)
    try:
        line = line_within(tail.stdout, "the tail printed a result")
        assert "result" in line and '"key": "i"' in line
        assert job.poll() is None
        (tmp_path / "stop").touch()
        assert job.wait(60) == 0
    finally:
        job.kill()
        tail.terminate()
        tail.wait(10)



def test_export_of_a_run_takes_a_unique_uid_prefix_or_says_why_not(home: Path, tmp_path: Path) -> None:
    """`--run` matched every run whose uid began with it: `--run 1` exported runs nobody named, and a
    prefix of no run exported nothing and said nothing. It takes a run as `show` does."""
    first, second, child = "abc1" + "0" * 28, "abc2" + "0" * 28, "def1" + "0" * 28
    bus = session().services.bus
    for uid, parent in ((first, None), (second, None), (child, first)):
        append(bus, uid, [envelope(uid, 0, "run_started", started(name=uid[:4], parent_uid=parent)),
                          envelope(uid, 1, "run_finished", finished())])

    def export(prefix: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RUNBUS, "export", "-o", str(tmp_path / "one.avro"), "--run", prefix],
                              env={**os.environ}, capture_output=True, text=True, timeout=120)

    for deleted in (False, True):  # a deleted run can be exported (before a purge removes it)
        if deleted:
            get_run_db().delete_runs([first])
        done = export("abc1")
        assert done.returncode == 0, done.stderr
        with (tmp_path / "one.avro").open("rb") as source:
            assert {record["run_uid"] for record in fastavro.reader(source)} == {first, child}  # with its iteration
    for prefix, said in (("abc", "matches more than one run"), ("ffff", "no run with uid 'ffff'")):
        refused = export(prefix)
        assert refused.returncode != 0 and said in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
