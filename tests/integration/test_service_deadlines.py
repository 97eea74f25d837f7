"""The projection service and its clients never wait forever on each other: a client that stalls
its handshake does not keep other readers out, and a service that stops answering (SIGSTOP, a hang)
makes readers fail with ProjectionBusy instead of hanging."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.api import session
from engine.bootstrap import make_bus
from engine.projection_service import build_service
from projections.client import ServiceClient
from projections.service import ProjectionService, serving_in_thread
from tests.support.polling import wait_until


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

