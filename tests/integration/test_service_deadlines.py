"""The projection service and its clients never wait forever on each other: a client that stalls
its handshake does not keep other readers out, and a service that stops answering (SIGSTOP, a hang)
makes readers fail with ProjectionBusy instead of hanging."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import get_run_db
from engine.api import close_session, session
from engine.bootstrap import make_bus
from engine.projection_service import LOCK_WAIT_S, build_service, service_client
from engine.ui.app import create_app
from engine.ui.store import ServedRunDB
from projections.client import ServiceClient
from projections.database import ProjectionBusy
from projections.query import RunDB
from projections.replay import stored_events
from projections.service import ProjectionService, ServiceAddress, serving_in_thread
from tests.support.foreign import append, envelope, finished, started
from tests.support.polling import wait_until
from tests.support.serving import served_in_thread


@pytest.fixture
def served(home: Path) -> Iterator[tuple[ProjectionService, ServiceClient]]:
    """A projection service of `home` on a thread of this process, and a client of it."""
    svc = session().services
    bus = make_bus(svc.settings.bus_url, svc.settings)
    service = build_service(svc.settings, bus)
    with serving_in_thread(service):
        yield service, ServiceClient(service.address, svc.bus, start=None, timeout_s=30)
    bus.close()


def _answer_in_thread(client: ServiceClient) -> list[object]:
    """Start a reader on a thread; the list receives its answer (or what it raised)."""
    answers: list[object] = []

    def read() -> None:
        try:
            answers.append(int(client.answer([("SELECT 42 AS x", None)])[0].x[0]))
        except Exception as exc:
            answers.append(exc)

    threading.Thread(target=read, daemon=True).start()
    return answers


def test_a_client_that_connects_and_says_nothing_keeps_no_reader_out(
        served: tuple[ProjectionService, ServiceClient], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    service, client = served
    monkeypatch.setattr("projections.service.HANDSHAKE_S", 1.0)
    with socket.socket(socket.AF_UNIX) as silent, caplog.at_level(logging.WARNING, "runbus.projection"):
        silent.settimeout(60)  # the test's own deadline
        silent.connect(str(service.address.socket))  # and never answers the challenge
        answers = _answer_in_thread(client)
        assert wait_until(lambda: answers, "a second reader answers while the first one is silent",
                          timeout_s=30) == [42]
        assert silent.recv(1024)  # the challenge it never answers
        assert silent.recv(1024) == b"", "the silent client is dropped once its handshake's deadline passed"
    dropped = [r for r in caplog.records if "dropped during its handshake" in r.getMessage()]
    assert len(dropped) == 1, [r.getMessage() for r in caplog.records]


def _read_in_thread(read: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """`read()` on a thread; the list receives its answer or what it raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(read())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (this process started the service and has not reaped it) is gone for this purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_reader_of_a_stopped_service_fails_instead_of_hanging(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_PROJECTION", "service")
    close_session()
    pid = int(service_client(session().services.settings, session().services.bus).ping()["pid"])  # started
    address = ServiceAddress.of(session().services.settings.home)
    monkeypatch.setenv("RUNBUS_DB_TIMEOUT", "3")  # the readers' (the running service read its own)
    close_session()
    pooled = get_run_db()
    assert pooled.sql("SELECT 1 AS x").x.tolist() == [1]  # its connection is kept for the next query
    os.kill(pid, signal.SIGSTOP)
    ui = create_app(ServedRunDB(session().services, service_client(session().services.settings,
                                                                   session().services.bus)))
    try:
        with served_in_thread(ui) as url:  # a page whose reads the stopped service does not answer
            thread, outcome = _read_in_thread(lambda: urllib.request.urlopen(f"{url}/runs", timeout=60))
            thread.join(60)
            [error] = outcome
            assert isinstance(error, urllib.error.HTTPError) and error.code == 503, error
            assert f"pid {pid}" in error.read().decode()
        for what, db in (("a kept connection", pooled), ("a new connection", RunDB(
                session().services.bus, "", source=service_client(session().services.settings,
                                                                  session().services.bus)))):
            thread, outcome = _read_in_thread(lambda db=db: db.sql("SELECT 2 AS x"))
            thread.join(60)  # the test's own deadline: a reader that hangs fails here
            assert not thread.is_alive(), f"a reader on {what} still waits for the stopped service after 60s"
            [error] = outcome
            assert isinstance(error, ProjectionBusy), (what, error)
            assert f"pid {pid}" in str(error) and str(address.log) in str(error), str(error)
            assert "RUNBUS_DB_TIMEOUT" in str(error), str(error)
    finally:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), "the killed service is gone")


def test_a_catch_up_the_fold_cannot_finish_in_time_says_how_far_behind(
        served: tuple[ProjectionService, ServiceClient]) -> None:
    service, client = served
    service.pause_folding()
    session().services.bus.append([("behind", b"not an event")])  # a dead letter, once folded
    hurried = ServiceClient(service.address, session().services.bus, start=None, timeout_s=0.5)
    with pytest.raises(ProjectionBusy, match=r"1 records behind the bus after 0.5s"):
        hurried.catch_up()
    service.fold_gate.set()
    assert client.catch_up() == 1  # the waiting client's own, longer wait sees it folded


def test_a_rebuild_longer_than_the_handshake_bound_is_waited_for(
        served: tuple[ProjectionService, ServiceClient], monkeypatch: pytest.MonkeyPatch) -> None:
    service, client = served
    bus = session().services.bus
    bus.append([(f"r{i}", b"not an event") for i in range(3000)])  # dead letters: a rebuild of some length
    assert client.catch_up() == 3000
    # the connection's handshake bound stays on its socket; the rebuild's answer must outlast it
    hurried = ServiceClient(service.address, bus, start=None, timeout_s=0.05)
    monkeypatch.setattr(service, "rebuild", _slowed(service.rebuild, 0.5))
    assert hurried.rebuild() == 3000


def _slowed(call: Callable[[], int], seconds: float) -> Callable[[], int]:
    def slow() -> int:
        threading.Event().wait(seconds)  # the service's own work, made to outlast the bound
        return call()
    return slow


def _foreign_runs(count: int) -> None:
    bus = session().services.bus
    for i in range(count):
        append(bus, f"run{i}", [envelope(f"run{i}", 0, "run_started", started(name=f"run{i}")),
                                envelope(f"run{i}", 1, "run_finished", finished())])


def test_an_as_of_read_whose_past_is_still_being_built_is_told_so_by_the_service_in_its_own_time(
        served: tuple[ProjectionService, ServiceClient], monkeypatch: pytest.MonkeyPatch) -> None:
    service, client = served
    _foreign_runs(3)
    assert client.catch_up() > 0
    [[as_of]] = client.answer([("SELECT max(position) FROM events WHERE run_uid = 'run1'", None)])[0].values
    as_of = int(as_of)
    released = threading.Event()
    replaying = threading.Event()

    def held_replay(*args: Any, **kwargs: Any) -> Iterator[Any]:
        replaying.set()
        released.wait(60)  # the replay of a big log, held until the test lets it go on
        yield from stored_events(*args, **kwargs)

    monkeypatch.setattr("projections.service.stored_events", held_replay)
    bus = session().services.bus
    hurried = ServiceClient(service.address, bus, start=None, timeout_s=0.5)
    thread, outcome = _read_in_thread(lambda: RunDB(bus, "", as_of=as_of, source=hurried).sql(
        "SELECT count(*) AS n FROM runs"))
    thread.join(60)
    [error] = outcome
    # the service answers within the reader's own timeout (not the client's bound beyond it)
    assert isinstance(error, ProjectionBusy), error
    assert f"still building the projection as of {as_of}" in str(error), str(error)
    assert "RUNBUS_DB_TIMEOUT" in str(error), str(error)
    wait_until(replaying.is_set, "the build of the past projection goes on after its reader gave up")
    # while the build is held, readers of the present are answered
    assert client.answer([("SELECT count(*) AS n FROM runs", None)])[0].n.tolist() == [3]
    # and a reader of another cutoff is told at once to ask again: one replay held in memory at a time
    with pytest.raises(ProjectionBusy, match="one past projection at a time"):
        RunDB(bus, "", as_of=as_of - 1, source=client).sql("SELECT count(*) AS n FROM runs")
    released.set()  # the build goes on; a reader with time to wait gets its answer
    past = RunDB(bus, "", as_of=as_of, source=client).sql("SELECT name FROM runs ORDER BY name")
    assert past.name.tolist() == ["run0", "run1"]


class _StartedInThread:
    """What a client's `start` returns (a Popen's `poll`) for a service it started on a thread."""

    def poll(self) -> int | None:
        return None


@pytest.mark.parametrize("request_kind", ["catch_up", "answer"])
def test_a_reader_behind_the_fold_when_the_service_stops_is_answered_by_the_next_one(
        served: tuple[ProjectionService, ServiceClient], request_kind: str) -> None:
    service, _ = served
    svc = session().services
    started: list[tuple[Iterator[ProjectionService], Any]] = []

    def start() -> _StartedInThread:  # the next service, as a reader's client starts one
        bus = make_bus(svc.settings.bus_url, svc.settings)
        # it waits for the home as a started service does: the stopping one may still hold it
        serving = serving_in_thread(build_service(svc.settings, bus), lock_timeout_s=LOCK_WAIT_S)
        serving.__enter__()
        started.append((serving, bus))
        return _StartedInThread()

    client = ServiceClient(service.address, svc.bus, start=start, timeout_s=30)
    service.pause_folding()
    svc.bus.append([("behind", b"not an event")])  # the reader's offsets are past the paused fold
    thread, outcome = _read_in_thread(
        client.catch_up if request_kind == "catch_up"
        else lambda: int(client.answer([("SELECT 42 AS x", None)])[0].x[0]))
    try:
        wait_until(lambda: service.requests_under_way == 1, "the request is under way")
        service.shutdown()  # a follower's takeover asks this
        thread.join(60)
        assert not thread.is_alive(), "the reader still waits"
        [answer] = outcome
        # not "is stopping": the stopping service dropped the request and the client asked the next one
        assert not isinstance(answer, Exception), answer
        assert answer == 42 if request_kind == "answer" else isinstance(answer, int), answer
        assert len(started) == 1
    finally:
        for serving, bus in started:
            serving.__exit__(None, None, None)
            bus.close()
