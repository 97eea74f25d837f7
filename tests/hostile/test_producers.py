"""Hostile input at the producer: every emitted event is in the log, or the caller got an exception
at the call naming the key; waits are bounded; a bus that refuses for good loses nothing.

Each refused call is made inside a running handler, which then logs once more: the run completes,
and the projection holds what was logged before and after the refusal.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import close_session, session
from producers.bus.embedded import EmbeddedBus
from producers.context import RunContext, RunFinishedError
from producers.values import MAX_KEY_CHARS, MAX_LABEL_CHARS
from producers.writer import BackgroundWriter, EventsNotWritten

LONE = "\udc80"  # what os.fsdecode gives for the byte 0x80 (surrogateescape)


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"d": value}
    return value


# (case id, the hostile call on the context, the key the error must name)
HOSTILE_CALLS: list[tuple[str, Callable[[RunContext], Any], str]] = [
    ("result-value-lone-surrogate", lambda c: c.log_result("file", f"data{LONE}.csv"), "file"),
    ("result-nested-lone-surrogate", lambda c: c.log_result("files", {"list": [f"a{LONE}"]}), "files"),
    ("result-dict-key-lone-surrogate", lambda c: c.log_result("by_name", {f"k{LONE}": 1}), "by_name"),
    ("result-key-lone-surrogate", lambda c: c.log_result(f"r{LONE}", 1), repr(f"r{LONE}")),
    ("result-1000-deep-dict", lambda c: c.log_result("deep", _deep(1000)), "deep"),
    ("result-too-large", lambda c: c.log_result("huge", "x" * (600 * 1024)), "huge"),
    ("results-one-bad-of-two", lambda c: c.log_results({"fine": 1, "bad": LONE}), "bad"),
    ("label-value-lone-surrogate", lambda c: c.set_label("owner", f"me{LONE}"), "owner"),
    ("label-key-lone-surrogate", lambda c: c.set_label(f"o{LONE}", "me"), repr(f"o{LONE}")),
    ("param-key-lone-surrogate", lambda c: c.get_param(f"p{LONE}", 1), repr(f"p{LONE}")),
    ("param-value-lone-surrogate", lambda c: c.get_param("path", f"/tmp/{LONE}"), "path"),
    ("metric-key-lone-surrogate", lambda c: c.log_metric(f"m{LONE}", 1.0), repr(f"m{LONE}")),
    ("metric-timestamp-time_ns", lambda c: c.log_metric("loss", 1.0, timestamp=time.time_ns()), "loss"),
    ("metric-timestamp-milliseconds", lambda c: c.log_metric("loss", 1.0, timestamp=time.time() * 1000), "loss"),
    ("metric-timestamp-nan", lambda c: c.log_metric("loss", 1.0, timestamp=math.nan), "loss"),
    ("metric-timestamp-inf", lambda c: c.log_metric("loss", 1.0, timestamp=math.inf), "loss"),
    ("metric-timestamp--inf", lambda c: c.log_metric("loss", 1.0, timestamp=-math.inf), "loss"),
    ("metric-timestamp-1e20", lambda c: c.log_metric("loss", 1.0, timestamp=1e20), "loss"),
    ("metric-timestamp-negative", lambda c: c.log_metric("loss", 1.0, timestamp=-1.0), "loss"),
    ("metric-timestamp-text", lambda c: c.log_metric("loss", 1.0, timestamp="now"), "loss"),
    ("metric-step-2**70", lambda c: c.log_metric("loss", 1.0, step=2**70), "loss"),
    ("metric-step--2**64", lambda c: c.log_metric("loss", 1.0, step=-(2**64)), "loss"),
    ("metric-step-fraction", lambda c: c.log_metric("loss", 1.0, step=1.5), "loss"),
    ("metric-step-text", lambda c: c.log_metric("loss", 1.0, step="one"), "loss"),
    ("metric-value-huge-int", lambda c: c.log_metric("loss", 10**400), "loss"),
    ("metrics-one-bad-of-two", lambda c: c.log_metrics({"fine": 1.0, f"b{LONE}": 2.0}), repr(f"b{LONE}")),
    ("artifact-label-lone-surrogate", lambda c: c.log_artifact("a.txt", body=b"x", labels={"l": LONE}), "a.txt"),
    ("artifact-meta-lone-surrogate", lambda c: c.log_artifact("b.txt", body=b"x", source=LONE), "b.txt"),
    ("artifact-meta-1000-deep", lambda c: c.log_artifact("c.txt", body=b"x", tree=_deep(1000)), "c.txt"),
    ("artifact-format-lone-surrogate", lambda c: c.log_artifact("d.txt", body=b"x", format=LONE), "d.txt"),
    # a key or a label of 5 MB was accepted, and every runs page then repeated it (270 MB)
    ("result-key-5-mb", lambda c: c.log_result("k" * 5_000_000, 1), "k" * 40),
    ("metric-key-over-the-bound", lambda c: c.log_metric("m" * (MAX_KEY_CHARS + 1), 1.0), "m" * 40),
    ("param-key-over-the-bound", lambda c: c.get_param("p" * (MAX_KEY_CHARS + 1), 1), "p" * 40),
    ("label-key-over-the-bound", lambda c: c.set_label("l" * (MAX_KEY_CHARS + 1), "v"), "l" * 40),
    ("label-value-5-mb", lambda c: c.set_label("big", "v" * 5_000_000), "big"),
    ("label-value-over-the-bound", lambda c: c.set_label("big", "v" * (MAX_LABEL_CHARS + 1)), "big"),
    ("artifact-label-over-the-bound", lambda c: c.log_artifact("e.txt", body=b"x",
                                                               labels={"l": "v" * (MAX_LABEL_CHARS + 1)}), "e.txt"),
    ("artifact-key-over-the-bound", lambda c: c.log_artifact("a" * (MAX_KEY_CHARS + 1), body=b"x"), "a" * 40),
]


def _events(uid: str) -> Any:
    return get_run_db().sql("SELECT seq, stream, type, payload FROM events WHERE run_uid = ? ORDER BY position", [uid])


@pytest.mark.parametrize(("call", "key"), [pytest.param(call, key, id=case) for case, call, key in HOSTILE_CALLS])
def test_a_hostile_value_is_refused_at_the_call_naming_the_key_and_nothing_else_is_lost(
        bus_home: Path, call: Callable[[RunContext], Any], key: str) -> None:
    refusals: list[BaseException] = []

    def job(context: RunContext) -> None:
        context.log_result("before", 1)
        context.log_metric("steady", 0.5, step=1)
        context.set_label("phase", "before")
        try:
            call(context)
        except TypeError as exc:
            refusals.append(exc)
        context.log_result("after", 2)

    run = new_function().run(NewRun(handler=job, name="hostile"))

    assert len(refusals) == 1, "the hostile call was accepted"
    assert key in str(refusals[0]) and "\n" not in str(refusals[0])
    assert run.state == "completed", run.error
    row = get_run_db().read_run(run.uid)
    assert row["state"] == "completed"
    assert {"before": 1, "after": 2}.items() <= row["results"].items()
    assert row["metrics"]["steady"] == 0.5 and row["labels"]["phase"] == "before"
    events = _events(run.uid)
    own = events[events.type != "heartbeat"]
    assert list(own.seq) == list(range(len(own)))  # nothing dropped between what was accepted
    assert get_run_db().sql("SELECT count(*) AS n FROM dead_letters").n[0] == 0


@pytest.mark.parametrize(("task", "key"), [
    pytest.param(lambda: NewRun(name="x", labels={"team": f"a{LONE}"}), "team", id="label-value"),
    pytest.param(lambda: NewRun(name="x", params={"path": f"/d/{LONE}"}), "path", id="param-value"),
    pytest.param(lambda: NewRun(name="x", params={"deep": _deep(1000)}), "deep", id="param-1000-deep"),
    pytest.param(lambda: NewRun(name=f"n{LONE}"), "name", id="run-name"),
    pytest.param(lambda: NewRun(name="x", labels={"team": "t" * (MAX_LABEL_CHARS + 1)}), "team",
                 id="label-value-over-the-bound"),
    pytest.param(lambda: NewRun(name="x", params={"p" * (MAX_KEY_CHARS + 1): 1}), "p" * 40,
                 id="param-key-over-the-bound"),
])
def test_a_hostile_run_definition_is_refused_before_anything_is_logged(
        bus_home: Path, task: Callable[[], Any], key: str) -> None:
    ran: list[bool] = []
    with pytest.raises(TypeError, match=re.escape(key)):
        new_function().run(task(), handler=lambda: ran.append(True))
    assert not ran
    assert get_run_db().sql("SELECT count(*) AS n FROM events").n[0] == 0


def test_run_started_holds_the_labels_as_they_were_at_the_start(bus_home: Path) -> None:
    def job(context: RunContext) -> None:
        context.set_label("later", "yes")
        context.labels["sneaky"] = "mutated"

    run = new_function().run(NewRun(handler=job, labels={"team": "a"}))

    events = _events(run.uid)
    started = json.loads(events[events.type == "run_started"].payload.iloc[0])
    assert started["labels"] == {"team": "a"}
    assert get_run_db().read_run(run.uid)["labels"] == {"team": "a", "later": "yes"}


def test_logging_after_the_run_finished_is_an_error_at_the_call(bus_home: Path) -> None:
    kept: list[RunContext] = []

    def job(context: RunContext) -> None:
        kept.append(context)
        context.log_result("inside", 1)

    run = new_function().run(NewRun(handler=job))
    context = kept[0]

    for late in (lambda: context.log_result("late", 2), lambda: context.log_metric("late", 2.0),
                 lambda: context.set_label("late", "x"), lambda: context.get_param("late", 3),
                 lambda: context.finish()):
        with pytest.raises(RunFinishedError, match=run.uid):
            late()
    with pytest.raises(RunFinishedError, match="'late'"):
        context.log_result("late", 2)
    row = get_run_db().read_run(run.uid)
    assert row["state"] == "completed" and row["results"] == {"inside": 1}
    assert "late" not in row["params"] and "late" not in row["labels"]


@pytest.mark.parametrize(("exit_with", "state", "error"), [
    (0, "completed", None), (None, "completed", None), (3, "error", "SystemExit: 3"),
    ("bad input", "error", "SystemExit: bad input"),
])
def test_sys_exit_in_a_handler_is_recorded_by_its_exit_code(
        bus_home: Path, exit_with: Any, state: str, error: str | None) -> None:
    def job(context: RunContext) -> None:
        context.log_result("before", 1)
        sys.exit(exit_with)

    run = new_function().run(NewRun(handler=job))

    row = get_run_db().read_run(run.uid)
    assert (run.state, row["state"]) == (state, state)
    assert row["error"] == error and row["results"] == {"before": 1}


def test_ctrl_c_in_a_handler_is_recorded_aborted_and_let_through(bus_home: Path) -> None:
    uids: list[str] = []

    def job(context: RunContext) -> None:
        uids.append(context.uid)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        new_function().run(NewRun(handler=job))
    assert get_run_db().read_run(uids[0])["state"] == "aborted"


# -- the writer: no deadlock, heartbeats through a backlog -------------------------------------------


@pytest.mark.timeout(120)
def test_a_full_writer_queue_with_heartbeats_on_does_not_deadlock(bus_home: Path) -> None:
    svc = session().services
    # a queue of 50 events and a heartbeat due at every turn of the writer: the job waits for room
    # while the writer's heartbeat wants the run's emit lock
    writer = BackgroundWriter(svc.bus, svc.codec, flush_interval_s=0.001, max_pending=50,
                              heartbeat_interval_s=0.001)
    try:
        context = RunContext(writer, svc.artifact_store, uid="deadlock0", name="busy")
        context.start()
        for step in range(20_000):
            context.log_metric("m", float(step), step=step)
        context.finish()
    finally:
        writer.close(timeout_s=30)

    row = get_run_db().read_run("deadlock0")
    assert row["state"] == "completed"
    assert get_run_db().sql("SELECT count(*) AS n FROM metrics WHERE uid = 'deadlock0'").n[0] == 20_000
    assert get_run_db().sql("SELECT count(*) AS n FROM events WHERE run_uid = 'deadlock0' "
                            "AND type = 'heartbeat'").n[0] > 0


class SlowEmbeddedBus(EmbeddedBus):
    """The embedded log, with every append taking `delay_s` longer (a slow disk or broker)."""

    delay_s = 0.05

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        time.sleep(self.delay_s)
        super().append(records)


@contextlib.contextmanager
def _run_behind_a_backlog(uid: str, metrics: int) -> Iterator[tuple[RunContext, BackgroundWriter]]:
    """A started run on a slow bus (appends of 100 events, each >= 50 ms) with `metrics` metrics queued,
    heartbeats every 50 ms; yields the run and its writer, both closed after the block."""
    svc = session().services
    bus = SlowEmbeddedBus(svc.settings.log_path)
    writer = BackgroundWriter(bus, svc.codec, flush_interval_s=0.01, max_batch=100, heartbeat_interval_s=0.05)
    try:
        context = RunContext(writer, svc.artifact_store, uid=uid, name=uid)
        context.start()
        for step in range(metrics):
            context.log_metric("m", float(step), step=step)
        yield context, writer
    finally:
        writer.close(timeout_s=60)
        bus.close()


@pytest.mark.timeout(120)
def test_heartbeats_reach_the_bus_while_a_backlog_drains(home: Path) -> None:
    with _run_behind_a_backlog("backlog0", 4000) as (context, writer):  # a backlog of 2 s or more
        assert writer.flush(60)  # the job lives on while the backlog drains
        context.finish()

    events = get_run_db().sql("SELECT type, position FROM events WHERE run_uid = 'backlog0' ORDER BY position")
    last_metric = events[events.type == "metric"].position.max()
    beats_in_backlog = events[(events.type == "heartbeat") & (events.position < last_metric)]
    assert len(beats_in_backlog) >= 5
    assert get_run_db().read_run("backlog0")["state"] == "completed"


# -- a bus that refuses for good, or stays away -----------------------------------------------------


class PermissionDeniedBus(EmbeddedBus):
    """The embedded log, where appends fail as on a file the process may not write."""

    def _append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        raise PermissionError(13, "Permission denied", str(self.path))


class UnreachableBus(EmbeddedBus):
    """The embedded log, where appends fail as with a broker that is away."""

    def _append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        raise ConnectionError("broker away")


def _spill_files(home: Path) -> list[Path]:
    return sorted((home / "spill").glob("*.spill")) if (home / "spill").is_dir() else []


def _job(context: RunContext) -> str:
    context.log_result("accuracy", 0.9)
    context.log_result("payload", os.urandom(3000).hex())  # larger than a small Kafka topic allows
    for step in range(50):
        context.log_metric("loss", 1.0 / (step + 1), step=step)
    return "done"


def _assert_everything_logged(uid: str) -> None:
    row = get_run_db().read_run(uid)
    assert row["state"] == "completed"
    assert row["results"]["accuracy"] == 0.9 and row["results"]["return"] == "done"
    assert get_run_db().sql("SELECT count(*) AS n FROM metrics WHERE uid = ?", [uid]).n[0] == 50


@contextlib.contextmanager
def _bus_class(cls: type[EmbeddedBus]) -> Iterator[None]:
    """Services built meanwhile write through `cls` (on the same log file)."""
    import engine.bootstrap

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.bootstrap, "make_bus", lambda url, settings: cls(settings.log_path))
        close_session()
        try:
            yield
        finally:
            close_session()


def _delivered_at_next_start(home: Path, uid: str) -> None:
    """A new writer on the home delivers the spill: everything is there, once, and the file is gone."""
    close_session()
    session().services.writer.flush(60)
    _assert_everything_logged(uid)
    assert _spill_files(home) == []


@pytest.mark.timeout(120)
def test_a_bus_refusing_for_good_ends_the_run_with_the_cause_and_the_next_start_delivers(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uids: list[str] = []

    def job(context: RunContext) -> str:
        uids.append(context.uid)
        return _job(context)

    with _bus_class(PermissionDeniedBus):
        with pytest.raises(EventsNotWritten, match="Permission denied") as refused:
            new_function().run(NewRun(handler=job))
        assert str(home / "spill") in str(refused.value)
        (spill,) = _spill_files(home)
        assert stat.S_IMODE(spill.stat().st_mode) == 0o600
        assert stat.S_IMODE(spill.parent.stat().st_mode) == 0o700
        assert get_run_db().sql("SELECT count(*) AS n FROM events").n[0] == 0

    kept = spill.read_bytes()
    _delivered_at_next_start(home, uids[0])
    # delivered again (a crash between append and delete): the same event ids, nothing doubled
    spill.write_bytes(kept)
    spill.chmod(0o600)
    assert session().services.deliver_spill().records > 0
    events = _events(uids[0])
    assert get_run_db().sql("SELECT count(*) AS n FROM metrics WHERE uid = ?", [uids[0]]).n[0] == 50
    assert len(events) == len(events.drop_duplicates(["stream", "seq"]))


def _chattr(flag: str, path: Path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_an_immutable_log_file_ends_the_run_with_the_cause_and_the_next_start_delivers(home: Path) -> None:
    session()  # creates the log
    log_file = home / "log.sqlite"
    close_session()
    if not _chattr("+i", log_file):
        pytest.skip("chattr +i is not permitted here (needs CAP_LINUX_IMMUTABLE)")
    uids: list[str] = []

    def job(context: RunContext) -> str:
        uids.append(context.uid)
        return _job(context)

    try:
        with pytest.raises(EventsNotWritten, match=r"readonly|read-only|Permission|Operation not permitted"):
            new_function().run(NewRun(handler=job))
        assert len(_spill_files(home)) == 1
        close_session()
    finally:
        _chattr("-i", log_file)
    _delivered_at_next_start(home, uids[0])


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_a_kafka_topic_refusing_large_records_ends_the_run_and_the_next_start_delivers(
        home: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    from tests.kafka_support import use_fresh_topic

    use_fresh_topic(monkeypatch, kafka_bootstrap)
    topic = os.environ["RUNBUS_KAFKA_TOPIC"]
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap.split(","))
    try:
        admin.create_topics({topic: {"num_partitions": 3, "replication_factor": 1,
                                     "configs": {"max.message.bytes": "1024"}}})
        uids: list[str] = []

        def job(context: RunContext) -> str:
            uids.append(context.uid)
            return _job(context)

        with pytest.raises(EventsNotWritten, match=r"MessageSizeTooLarge|MESSAGE_TOO_LARGE"):
            new_function().run(NewRun(handler=job))
        assert len(_spill_files(home)) == 1
        close_session()
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                            configs={"max.message.bytes": "8388608"})])
        _delivered_at_next_start(home, uids[0])
    finally:
        admin.close()


@pytest.mark.timeout(120)
def test_a_bus_that_stays_away_bounds_the_wait_and_keeps_the_events_at_exit(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_FLUSH_TIMEOUT", "1")
    uids: list[str] = []

    def job(context: RunContext) -> str:
        uids.append(context.uid)
        return _job(context)

    with _bus_class(UnreachableBus):
        with pytest.raises(EventsNotWritten, match="ConnectionError: broker away"):  # bounded: pytest-timeout
            new_function().run(NewRun(handler=job))
        close_session()  # the process ends: what is still queued goes to the spill file
        assert len(_spill_files(home)) == 1
    _delivered_at_next_start(home, uids[0])


def test_a_writer_never_drops_an_event_that_does_not_encode(home: Path) -> None:
    svc = session().services
    # what no call lets through (the calls validate), handed to the writer directly: a bug
    svc.writer.emit("bug0", 0, "label", {"key": "k", "value": LONE})
    svc.writer.emit("bug0", 1, "label", {"key": "k", "value": "fine"})
    with pytest.raises(EventsNotWritten, match="label #0 of run bug0 does not fit its schema"):
        svc.writer.flush(30)
    (kept,) = (home / "spill").glob("unencodable-*.jsonl")
    assert json.loads(kept.read_text())["event"]["run_uid"] == "bug0"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert list(get_run_db().sql("SELECT seq FROM events WHERE run_uid = 'bug0'").seq) == [1]


def test_the_writer_thread_keeps_no_lock_of_a_run_while_a_job_waits(bus_home: Path) -> None:
    """Heartbeats do not take the run's emit lock: a job thread holding it cannot stop them."""
    svc = session().services
    writer = BackgroundWriter(svc.bus, svc.codec, flush_interval_s=0.01, heartbeat_interval_s=0.01)
    try:
        context = RunContext(writer, svc.artifact_store, uid="lock0", name="lock")
        context.start()
        with context._emit_lock:
            seen = threading.Event()

            def beats_written() -> None:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    writer.flush(5)
                    if get_run_db().sql("SELECT count(*) AS n FROM events WHERE run_uid = 'lock0' "
                                        "AND type = 'heartbeat'").n[0] >= 3:
                        seen.set()
                        return
                    time.sleep(0.05)

            watcher = threading.Thread(target=beats_written)
            watcher.start()
            watcher.join(60)
            assert seen.is_set()
        context.finish()
    finally:
        writer.close(timeout_s=30)


@pytest.mark.timeout(120)
def test_runbus_push_spill_delivers_a_kept_spill_file_once(home: Path) -> None:
    """`runbus push --spill` delivers what the writers kept; delivering again doubles nothing."""
    uids: list[str] = []

    def job(context: RunContext) -> str:
        uids.append(context.uid)
        return _job(context)

    with _bus_class(PermissionDeniedBus), pytest.raises(EventsNotWritten):
        new_function().run(NewRun(handler=job))
    (spill,) = _spill_files(home)
    kept = spill.read_bytes()
    runbus = [str(Path(sys.executable).parent / "runbus"), "push", "--spill"]
    env = {**os.environ, "RUNBUS_HOME": str(home)}
    for _ in range(2):  # the second time, from a copy of the file: the same event ids
        spill.write_bytes(kept)
        spill.chmod(0o600)
        done = subprocess.run(runbus, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert _spill_files(home) == []
    close_session()
    _assert_everything_logged(uids[0])
    events = _events(uids[0])
    assert len(events) == len(events.drop_duplicates(["stream", "seq"]))


class _HandOverLock:
    """A lock that, once released, runs `then` (to let a waiting thread in before the releaser goes on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.then: Callable[[], None] | None = None

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        then, self.then = self.then, None
        if then is not None:
            then()


def test_a_call_racing_with_finish_is_logged_before_run_finished_or_refused(home: Path) -> None:
    svc = session().services
    context = RunContext(svc.writer, svc.artifact_store, uid="race0", name="race")
    lock = context._emit_lock = _HandOverLock()  # type: ignore[assignment]
    outcome: list[str] = []

    def late() -> None:
        try:
            context.log_metric("late", 1.0)
            outcome.append("logged")
        except RunFinishedError:
            outcome.append("refused")

    class Writer:  # the shared writer, starting a racing call as run_finished is emitted
        def __getattr__(self, name: str) -> Any:
            return getattr(svc.writer, name)

        def emit(self, *args: Any, **kwargs: Any) -> None:
            svc.writer.emit(*args, **kwargs)
            if args[2] == "run_finished":
                racer = threading.Thread(target=late)
                racer.start()
                lock.then = lambda: racer.join(10)

    context._writer = Writer()  # type: ignore[assignment]
    context.start()
    context.finish()

    assert outcome == ["refused"]
    types = get_run_db().sql("SELECT type FROM events WHERE run_uid = 'race0' AND stream = ? ORDER BY seq",
                             [context.stream]).type.tolist()
    assert types == ["run_started", "run_finished"]


@pytest.mark.timeout(120)
def test_heartbeats_go_on_while_finish_waits_for_the_backlog(home: Path) -> None:
    with _run_behind_a_backlog("finishing0", 3000) as (context, _):  # finish() waits 1.5 s or more
        finishing = time.time()
        context.finish()
        finished = time.time()

    beats = get_run_db().sql("SELECT epoch(ts) AS ts FROM events WHERE run_uid = 'finishing0' AND type = 'heartbeat'")
    assert len(beats[(beats.ts > finishing) & (beats.ts < finished - 0.5)]) >= 5
    assert get_run_db().read_run("finishing0")["state"] == "completed"


class _ListBus:
    """Keeps what it is given."""

    url = "list://"

    def __init__(self) -> None:
        self.records: list[tuple[str | None, bytes]] = []

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        self.records.extend(records)


def test_a_damaged_spill_file_delivers_what_it_can_keeps_the_rest_and_blocks_no_other(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import struct

    from producers.spill import SpillFile, bus_target, deliver_spill

    bus = _ListBus()

    def spill(records: list[tuple[str | None, bytes]]) -> Path:
        kept = SpillFile(tmp_path, bus_target(bus))  # type: ignore[arg-type]
        kept.keep(records)
        assert kept.path is not None and kept._file is not None
        kept._file.close()
        return kept.path

    def damage(path: Path, at: int, data: bytes) -> None:  # `at`: from the start of the second frame
        raw = bytearray(path.read_bytes())
        second = raw.index(b"\n") + 1 + 8 + 1 + 1  # the first frame: a 1-byte key and a 1-byte value
        raw[second + at:second + at + len(data)] = data
        path.write_bytes(bytes(raw))

    bad_key = spill([("a", b"1"), ("b", b"2"), ("c", b"3")])
    damage(bad_key, 8, b"\xff")  # the second frame's key is not UTF-8
    bad_length = spill([("d", b"4"), ("e", b"5"), ("f", b"6")])
    damage(bad_length, 4, struct.pack(">I", 1 << 30))  # the second frame's value length: one flipped bit
    good = spill([("g", b"7")])

    with caplog.at_level(logging.ERROR, logger="runbus.spill"):
        done = deliver_spill(tmp_path, bus)  # type: ignore[arg-type]

    assert done.files == 3 and sorted(bus.records) == [("a", b"1"), ("c", b"3"), ("d", b"4"), ("g", b"7")]
    kept = {bad_key.with_suffix(".damaged"), bad_length.with_suffix(".damaged")}
    assert set(tmp_path.iterdir()) == kept and not good.exists()
    for path in kept:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and str(path) in caplog.text
    assert b"2" in bad_key.with_suffix(".damaged").read_bytes()
    assert bad_length.with_suffix(".damaged").read_bytes().endswith(b"f6")
    assert "1 frame(s) whose key is not UTF-8" in caplog.text


def test_a_writer_redelivering_its_own_spill_keeps_what_it_cannot_deliver(tmp_path: Path) -> None:
    from producers.spill import SpillFile, bus_target

    bus = _ListBus()
    spill = SpillFile(tmp_path, bus_target(bus))  # type: ignore[arg-type]
    spill.keep([("a", b"1"), ("b", b"2")])
    assert spill.path is not None
    raw = bytearray(spill.path.read_bytes())
    raw[raw.index(b"\n") + 1 + 8 + 1 + 1 + 8] = 0xFF  # the second frame's key is not UTF-8
    spill.path.write_bytes(bytes(raw))

    assert spill.redeliver(bus) == 1  # type: ignore[arg-type]
    spill.close()

    assert bus.records == [("a", b"1")]
    assert spill.path.with_suffix(".damaged").read_bytes().endswith(b"\xff2")
