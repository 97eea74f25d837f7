"""Hostile input to the projector: foreign records written straight to the bus (which is untrusted),
duplicates and conflicts, lost runs that speak again, and a damaged projection file.

Issue 10 findings 4 (projector side), 6 (projector and reaper side), 11 and 13 (a killed job).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import session
from engine.reaper import mark_lost, reap
from producers.console import EVENT_MAX_CHARS, EVENT_MAX_LINES, LINE_MAX_CHARS
from producers.values import MAX_DEPTH
from projections.database import close_all
from projections.service import ServiceAddress
from tests.support import foreign
from tests.support.foreign import PLACEHOLDER, append, envelope, finished, metric, result, started
from tests.support.projection_services import stop_projection_services

ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")


def _poll(check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    """The first truthy value of `check()` before the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _uid() -> str:
    return uuid.uuid4().hex


# Each poison: the event put at seq 2 of a foreign run, between well-formed ones.
POISONS: dict[str, Callable[[str], dict[str, Any]]] = {
    "result value with a lone surrogate": lambda uid: envelope(uid, 2, "result", result("f", '"\\udc80"')),
    "param value with a lone surrogate": lambda uid: envelope(uid, 2, "param", {"key": "p", "value": '"\\ud800x"'}),
    "result value that is not JSON": lambda uid: envelope(uid, 2, "result", result("r", "not json")),
    "metric timestamp in nanoseconds": lambda uid: envelope(uid, 2, "metric", metric("m", 1.0, time.time_ns())),
    "metric timestamp NaN": lambda uid: envelope(uid, 2, "metric", metric("m", 1.0, math.nan)),
    "metric timestamp inf": lambda uid: envelope(uid, 2, "metric", metric("m", 1.0, math.inf)),
    "metric timestamp -inf": lambda uid: envelope(uid, 2, "metric", metric("m", 1.0, -math.inf)),
    "metric timestamp 1e20": lambda uid: envelope(uid, 2, "metric", metric("m", 1.0, 1e20)),
    "metric timestamp in milliseconds": lambda uid: envelope(uid, 2, "metric", metric("m", 1.0, time.time() * 1e3)),
    "event time NaN": lambda uid: envelope(uid, 2, "result", result("r", "1"), ts=math.nan),
    "event time 1e20": lambda uid: envelope(uid, 2, "heartbeat", {"interval_s": 1.0}, ts=1e20),
    "artifact meta that is not JSON": lambda uid: envelope(uid, 2, "artifact", {
        "key": "a", "kind": "artifact", "uri": "file:///x", "sha256": "0" * 64, "size": 1, "format": None,
        "labels": {}, "meta": "{"}),
    "result value that is empty": lambda uid: envelope(uid, 2, "result", result("r", "")),
    "result value nested deeper than the SDK writes": lambda uid: envelope(
        uid, 2, "result", result("deep", "[" * 5000 + "1" + "]" * 5000)),
    "artifact meta nested deeper than the SDK writes": lambda uid: envelope(uid, 2, "artifact", {
        "key": "a", "kind": "artifact", "uri": "file:///x", "sha256": "0" * 64, "size": 1, "format": None,
        "labels": {}, "meta": '{"a":' * 3000 + "1" + "}" * 3000}),
    "run state that does not exist": lambda uid: envelope(uid, 2, "run_finished", finished(state="pwned")),
    "log line of 4 MB": lambda uid: envelope(uid, 2, "log", _log("x" * 4_000_000)),
    "log line one character over the bound": lambda uid: envelope(uid, 2, "log", _log("y" * (LINE_MAX_CHARS + 1))),
    "log line over the bound among short ones": lambda uid: envelope(
        uid, 2, "log", _log("a\n" + "y" * (LINE_MAX_CHARS + 1) + "\nb")),
    "log event with more lines than the bound": lambda uid: envelope(uid, 2, "log", _log("\n" * EVENT_MAX_LINES)),
    "log event with more chunks than the bound": lambda uid: envelope(
        uid, 2, "log", {"chunks": _log("z")["chunks"] * (EVENT_MAX_LINES + 1)}),
    "log event with more text than the bound": lambda uid: envelope(
        uid, 2, "log", {"chunks": _log("w" * LINE_MAX_CHARS)["chunks"] * (EVENT_MAX_CHARS // LINE_MAX_CHARS + 1)}),
    "log chunk from a stream that does not exist": lambda uid: envelope(uid, 2, "log", _log("a", stream="<b>x</b>")),
    "log chunk time NaN": lambda uid: envelope(uid, 2, "log", _log("a", ts=math.nan)),
    "log chunk time in nanoseconds": lambda uid: envelope(uid, 2, "log", _log("a", ts=time.time_ns())),
}


def _log(text: str, stream: str = "stdout", ts: float | None = None) -> dict[str, Any]:
    """A log payload of one chunk (lines joined by "\\n")."""
    return {"chunks": [{"ts": time.time() if ts is None else ts, "stream": stream, "text": text}]}


def _foreign_run(uid: str, poison: dict[str, Any]) -> list[dict[str, Any]]:
    return [envelope(uid, 0, "run_started", started()), envelope(uid, 1, "result", result("ok", "1")),
            poison, envelope(uid, 3, "metric", metric("loss", 0.5, step=1)),
            envelope(uid, 4, "run_finished", finished())]


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_poison_event_is_quarantined_and_the_rest_of_its_record_applied(bus_home: Path, poison: str) -> None:
    new_function().run(NewRun(handler=lambda context: context.log_result("x", 1), name="before"))
    uid = _uid()
    bad = POISONS[poison](uid)
    record = append(session().services.bus, uid, _foreign_run(uid, bad))
    new_function().run(NewRun(handler=lambda context: context.log_result("x", 2), name="after"))

    db = get_run_db()
    dead = db.sql("SELECT partition, \"offset\", event_id, run_uid, stream, seq, type, error FROM dead_letters")
    assert len(dead) == 1, dead
    row = dead.iloc[0]
    assert (row.partition, row.offset) == (record.partition, record.offset)
    assert (row.event_id, row.run_uid, row.stream, row.seq, row.type) == (bad["event_id"], uid, "own", 2, bad["type"])
    assert row.error
    assert db.sql("SELECT seq FROM events WHERE run_uid = ? ORDER BY seq", [uid]).seq.tolist() == [0, 1, 3, 4]
    runs = db.sql("SELECT name, state FROM runs ORDER BY started_at")
    assert runs.values.tolist() == [["before", "completed"], ["foreign", "completed"], ["after", "completed"]]
    assert db.sql("SELECT value FROM results WHERE uid = ? AND key = 'ok'", [uid]).value.tolist() == ["1"]


def test_a_run_started_that_cannot_be_folded_is_quarantined_with_its_identity(bus_home: Path) -> None:
    uid = _uid()
    bad = envelope(uid, 0, "run_started", started(extra={"spec": "{not json"}))
    append(session().services.bus, uid, [bad, envelope(uid, 1, "result", result("ok", "1"))])
    db = get_run_db()
    dead = db.sql("SELECT event_id, seq, error FROM dead_letters")
    assert dead.event_id.tolist() == [bad["event_id"]] and "extra 'spec'" in dead.error[0]
    assert db.sql("SELECT count(*) AS n FROM runs").n[0] == 0
    assert db.sql("SELECT key FROM results WHERE uid = ?", [uid]).key.tolist() == ["ok"]


def test_a_run_started_with_a_param_nested_deeper_than_the_sdk_writes_is_quarantined(bus_home: Path) -> None:
    """Stored, it failed every reader that parses a run's values with Python's json (read_run, the
    UI's runs page for everyone): its recursion gives out thousands of levels down."""
    new_function().run(NewRun(handler=lambda context: context.log_result("x", 1), name="before"))
    uid = _uid()
    bad = envelope(uid, 0, "run_started", started(params={"p": "[" * 5000 + "1" + "]" * 5000}))
    append(session().services.bus, uid, [bad, envelope(uid, 1, "run_finished", finished())])
    db = get_run_db()
    dead = db.sql("SELECT event_id, error FROM dead_letters")
    assert dead.event_id.tolist() == [bad["event_id"]]
    assert "params 'p'" in dead.error[0] and f"nested at most {MAX_DEPTH} deep" in dead.error[0]
    assert db.list_runs().name.tolist() == ["before"]
    assert db.read_run(db.list_runs().uid[0])["results"] == {"x": 1}


def _append_undecodable(bus: Any, uid: str) -> list[Any]:
    """Three records that do not decode: a lone surrogate as UTF-8 in a label, nothing, an unknown schema."""
    label = envelope(uid, 1, "label", {"key": "file", "value": PLACEHOLDER})
    records = [envelope(uid, 0, "run_started", started()), label]
    return [append(bus, uid, foreign.with_bytes(records, b"\xed\xb2\x80")), append(bus, uid, b""),
            append(bus, uid, b"\xc3\x01" + b"\x00" * 8)]


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RUNBUS, *args], env={**os.environ}, capture_output=True, text=True, timeout=120)


def test_runs_sql_rebuild_and_a_restart_keep_working_after_every_poison(bus_home: Path) -> None:
    bus = session().services.bus
    undecodable = _append_undecodable(bus, _uid())
    for make in POISONS.values():
        uid = _uid()
        append(bus, uid, _foreign_run(uid, make(uid)))
    dead = len(POISONS) + len(undecodable)
    for attempt in range(2):  # as found, then after a rebuild and a restart
        listed = _run_cli("runs", "--format", "csv")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("completed") == len(POISONS)
        counted = _run_cli("sql", "SELECT count(*) AS n FROM dead_letters", "--format", "csv")
        assert counted.returncode == 0, counted.stderr
        assert counted.stdout.split() == ["n", str(dead)]
        if attempt == 0:
            rebuilt = _run_cli("project", "--rebuild")
            assert rebuilt.returncode == 0, rebuilt.stderr
    close_all()
    records = get_run_db().sql("SELECT partition, \"offset\", raw FROM dead_letters WHERE event_id IS NULL")
    assert sorted(zip(records.partition, records.offset, map(bytes, records.raw), strict=True)) == sorted(
        (r.partition, r.offset, r.value) for r in undecodable)
    assert get_run_db().sql("SELECT count(*) AS n FROM dead_letters").n[0] == dead


def test_foreign_log_lines_are_numbered_per_run_across_records_streams_and_batches(bus_home: Path) -> None:
    uid = _uid()
    bus = session().services.bus
    append(bus, uid, [envelope(uid, 0, "run_started", started()), envelope(uid, 1, "log", {"chunks": [
        {"ts": 1.0e9, "stream": "stdout", "text": "one"}, {"ts": 1.0e9, "stream": "stderr", "text": "two"}]})])
    append(bus, uid, [envelope(uid, 0, "log", _log("three", stream="logger"), stream="other")])
    assert get_run_db().get_log(uid) == ("running", "one\ntwo\nthree\n")
    append(bus, uid, [envelope(uid, 2, "log", _log("four <script>\n\nsix")),
                      envelope(uid, 3, "run_finished", finished())])
    assert get_run_db().get_log(uid[:12], offset=len("one\ntwo\nth")) == ("completed", "ree\nfour <script>\n\nsix\n")
    lines = get_run_db().sql("SELECT line_no, stream, text FROM logs WHERE uid = ? ORDER BY line_no", [uid])
    assert lines.values.tolist() == [[1, "stdout", "one"], [2, "stderr", "two"], [3, "logger", "three"],
                                     [4, "stdout", "four <script>"], [5, "stdout", ""], [6, "stdout", "six"]]


def test_an_exact_duplicate_is_skipped_and_recorded(bus_home: Path) -> None:
    uid = _uid()
    events = _foreign_run(uid, envelope(uid, 2, "result", result("acc", "0.9")))
    bus = session().services.bus
    append(bus, uid, events)
    assert get_run_db().sql("SELECT count(*) AS n FROM events").n[0] == 5  # the first copy is applied
    again = append(bus, uid, events)
    append(bus, uid, events[2:3])
    db = get_run_db()
    assert db.sql("SELECT count(*) AS n FROM events").n[0] == 5
    assert db.sql("SELECT count(*) AS n FROM metrics").n[0] == 1
    duplicates = db.sql("SELECT partition, \"offset\", event_id FROM duplicates")
    assert len(duplicates) == 6
    assert set(duplicates.event_id) == {e["event_id"] for e in events}
    assert (again.partition, again.offset) in set(zip(duplicates.partition, duplicates.offset, strict=True))


def test_a_different_event_at_an_applied_place_is_a_conflict_with_its_reason(bus_home: Path) -> None:
    uid = _uid()
    bus = session().services.bus
    append(bus, uid, _foreign_run(uid, envelope(uid, 2, "result", result("acc", "0.9"))))
    get_run_db().catch_up()
    usurper = envelope(uid, 2, "result", result("acc", "0.1"))  # same run, stream and seq
    second_start = envelope(uid, 0, "run_started", started(name="impostor"), stream="other")
    append(bus, uid, [usurper])
    append(bus, uid, [second_start])
    append(bus, uid, [usurper])  # the conflicting event again: now a duplicate
    db = get_run_db()
    conflicts = db.sql("SELECT event_id, seq, reason FROM conflicts ORDER BY \"offset\"")
    assert conflicts.event_id.tolist() == [usurper["event_id"], second_start["event_id"]]
    assert "already holds event" in conflicts.reason[0] and "already started" in conflicts.reason[1]
    assert db.sql("SELECT event_id FROM duplicates").event_id.tolist() == [usurper["event_id"]]
    assert db.sql("SELECT value FROM results WHERE key = 'acc'").value.tolist() == ["0.9"]
    assert db.sql("SELECT name FROM runs").name.tolist() == ["foreign"]


def _state(uid: str) -> str:
    return get_run_db().sql("SELECT state FROM runs WHERE uid = ?", [uid]).state[0]


def test_a_run_marked_lost_that_speaks_again_ends_in_the_state_of_its_own_last_event(bus_home: Path) -> None:
    uid = _uid()
    bus = session().services.bus
    append(bus, uid, [envelope(uid, 0, "run_started", started(interval_s=60.0))])
    append(bus, uid, [envelope(uid, 0, "run_finished", finished("lost"), stream="reaper-1")])
    assert _state(uid) == "lost"
    append(bus, uid, [envelope(uid, 1, "heartbeat", {"interval_s": 60.0})])
    row = get_run_db().sql("SELECT state, finished_at, error FROM runs WHERE uid = ?", [uid]).iloc[0]
    assert row.state == "running" and row.isna().finished_at and row.error is None
    append(bus, uid, [envelope(uid, 0, "run_finished", finished("lost"), stream="reaper-2")])
    append(bus, uid, [envelope(uid, 2, "metric", metric("loss", 0.1)), envelope(uid, 3, "result", result("acc", "1")),
                      envelope(uid, 4, "run_finished", finished("completed"))])
    assert _state(uid) == "completed"
    append(bus, uid, [envelope(uid, 0, "run_finished", finished("lost"), stream="reaper-3")])
    assert _state(uid) == "completed"  # a verdict after the run's own end does not overwrite it
    assert get_run_db().sql("SELECT value FROM results WHERE uid = ?", [uid]).value.tolist() == ["1"]


@pytest.mark.parametrize("own_end, foreign_end", [("completed", "error"), ("error", "completed")])
def test_a_run_finished_from_another_stream_never_overwrites_the_runs_own_end(bus_home: Path, own_end: str,
                                                                              foreign_end: str) -> None:
    """Anyone who reaches the bus can write a run_finished about any run; only the run's own stream
    ends it, another stream's end is a verdict that counts only while the run is running."""
    uid = _uid()
    bus = session().services.bus
    append(bus, uid, [envelope(uid, 0, "run_started", started(interval_s=60.0)),
                      envelope(uid, 1, "run_finished", finished(own_end))])
    append(bus, uid, [envelope(uid, 0, "run_finished", finished(foreign_end), stream="stranger", ts=0.0)])
    assert _state(uid) == own_end
    assert get_run_db().sql("SELECT count(*) AS n FROM events WHERE run_uid = ?", [uid]).n[0] == 3


def test_a_live_job_marked_lost_keeps_everything_it_logs_and_ends_completed(
        bus_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_HEARTBEAT_INTERVAL", "0.5")  # judged lost after 1.5 s of silence
    from engine.api import close_session

    close_session()
    release = threading.Event()
    started_uid: list[str] = []

    def job(context: Any) -> None:
        started_uid.append(context.uid)
        release.wait(60)
        context.log_result("accuracy", 0.93)

    worker = threading.Thread(target=lambda: new_function().run(NewRun(handler=job, name="live")))
    worker.start()
    try:
        _poll(lambda: started_uid, "the job to start")
        uid = started_uid[0]
        _poll(lambda: len(get_run_db().sql("SELECT uid FROM runs WHERE uid = ?", [uid])), "the run to show")
        mark_lost(session().services, uid, "judged dead by mistake")
        session().services.writer.flush()
        revived = ("SELECT count(*) AS n FROM events h, events l WHERE h.run_uid = ? AND l.run_uid = h.run_uid "
                   "AND l.type = 'run_finished' AND h.type = 'heartbeat' AND h.position > l.position")
        _poll(lambda: get_run_db().sql(revived, [uid]).n[0] > 0, "a heartbeat after the verdict")
        assert _state(uid) == "running"
    finally:
        release.set()
        worker.join(60)
    db = get_run_db()
    assert db.sql("SELECT state FROM runs WHERE uid = ?", [uid]).state[0] == "completed"
    assert db.sql("SELECT value FROM results WHERE uid = ? AND key = 'accuracy'", [uid]).value.tolist() == ["0.93"]
    assert db.sql("SELECT count(*) AS n FROM conflicts").n[0] == 0


def test_lost_is_judged_by_the_runs_own_heartbeat_interval(bus_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_HEARTBEAT_INTERVAL", "0.1")
    from engine.api import close_session

    close_session()
    bus = session().services.bus
    slow, fast, from_heartbeat = _uid(), _uid(), _uid()
    long_ago = time.time() - 100
    append(bus, slow, [envelope(slow, 0, "run_started", started("slow", interval_s=1000.0), ts=long_ago)])
    append(bus, fast, [envelope(fast, 0, "run_started", started("fast", interval_s=1.0), ts=long_ago)])
    append(bus, from_heartbeat, [envelope(from_heartbeat, 0, "run_started", started("beating"), ts=long_ago),
                                 envelope(from_heartbeat, 1, "heartbeat", {"interval_s": 1000.0}, ts=long_ago)])
    states = dict(get_run_db().sql("SELECT name, state FROM runs").values.tolist())
    assert states == {"slow": "running", "fast": "lost", "beating": "running"}  # no reap ran
    assert reap(session().services) == [fast]
    row = get_run_db().sql("SELECT state, error FROM runs WHERE uid = ?", [fast]).iloc[0]
    assert row.state == "lost" and "no heartbeat" in row.error


KILLED_JOB = """
import os, signal
from engine import NewRun, new_function
def doomed(context):
    context.log_result('step', 1)
    context._writer.flush()
    os.kill(os.getpid(), signal.SIGKILL)
new_function().run(NewRun(handler=doomed, name='doomed'))
"""


def test_a_killed_job_shows_lost_without_anyone_reaping(bus_home: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_HEARTBEAT_INTERVAL", "0.2")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KILLED_JOB], env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == -signal.SIGKILL
    db = get_run_db()
    _poll(lambda: db.sql("SELECT state FROM runs").state.tolist() == ["lost"], "the killed job to show lost")
    row = db.sql("SELECT finished_at, error FROM runs").iloc[0]
    assert row.isna().finished_at and row.error is None  # judged, not recorded: nothing wrote a verdict
    assert db.sql("SELECT count(*) AS n FROM events WHERE type = 'run_finished'").n[0] == 0


def _damage_truncate(path: Path) -> None:
    os.truncate(path, 5000)


def _damage_empty(path: Path) -> None:
    os.truncate(path, 0)


def _damage_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(300_000))


def _damage_header(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(os.urandom(8192))


DAMAGE = {"truncated": _damage_truncate, "empty": _damage_empty, "garbage": _damage_garbage,
          "broken header": _damage_header}


@pytest.mark.projection("inprocess")  # damages the file between two opens of this process's own
@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", [("runs",), ("project", "--rebuild")])
def test_a_damaged_projection_is_moved_aside_and_rebuilt_from_the_log(home: Path, damage: str,
                                                                      command: tuple[str, ...]) -> None:
    for i in range(3):
        new_function().run(NewRun(handler=lambda context: context.log_metric("m", 1.0), name=f"r{i}"))
    db_path = session().services.settings.db_path
    get_run_db().catch_up()
    close_all()
    DAMAGE[damage](db_path)
    wal = db_path.with_name(db_path.name + ".wal")
    wal.write_bytes(os.urandom(2000))
    done = _run_cli(*command)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "moved it to" in line]
    assert len(warnings) == 1 and str(db_path) in warnings[0]
    aside = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name + ".corrupt-")]
    assert len(aside) == 2  # the file and its .wal
    listed = _run_cli("runs", "--format", "csv")
    assert listed.returncode == 0 and listed.stdout.count("completed") == 3
    assert "moved it to" not in listed.stderr


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_projection_found_by_the_projection_service_is_moved_aside_and_rebuilt(
        home: Path, tmp_path: Path, damage: str) -> None:
    """The default read path: the service that opens a damaged file moves it aside (saying so in
    its log) and folds the log again; the reader that started it gets every run."""
    for i in range(3):
        new_function().run(NewRun(handler=lambda context: context.log_metric("m", 1.0), name=f"r{i}"))
    assert _run_cli("runs", "--format", "csv").stdout.count("completed") == 3
    stop_projection_services(home, tmp_path)  # the service releases the file
    db_path = session().services.settings.db_path
    DAMAGE[damage](db_path)
    db_path.with_name(db_path.name + ".wal").write_bytes(os.urandom(2000))
    listed = _run_cli("runs", "--format", "csv")
    assert listed.returncode == 0 and listed.stdout.count("completed") == 3, listed.stderr
    aside = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name + ".corrupt-")]
    assert len(aside) == 2  # the file and its .wal
    log = ServiceAddress.of(home).log.read_text()
    assert sum("moved it to" in line and str(db_path) in line for line in log.splitlines()) == 1


@pytest.mark.kafka
def test_a_kafka_record_whose_key_is_not_utf8_is_a_dead_letter_and_reading_goes_on(
        home: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone who reaches the broker chooses a record's key bytes: one that is not UTF-8 must not
    stop every reader of the topic."""
    from kafka import KafkaProducer

    from tests.kafka_support import use_fresh_topic

    use_fresh_topic(monkeypatch, kafka_bootstrap)
    new_function().run(NewRun(handler=lambda context: context.log_result("x", 1), name="before"))
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(os.environ["RUNBUS_KAFKA_TOPIC"], key=b"\xff\xfe-not-utf8", value=b"\xc3\x01garbage")
    producer.flush(30)
    producer.close()
    new_function().run(NewRun(handler=lambda context: context.log_result("x", 2), name="after"))

    db = get_run_db()
    assert sorted(db.sql("SELECT name FROM runs").name) == ["after", "before"]
    assert len(db.sql("SELECT error FROM dead_letters")) == 1
