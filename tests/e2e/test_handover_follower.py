"""`runbus project --follow` takes the home from the service a reader started, even when readers keep
asking while it starts: the follower marks the home before it asks that service to stop, so no
service a reader starts meanwhile takes the home from it, and the readers' queries go on being
answered throughout (by the old service, then the follower)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import close_session, session
from projections.client import ServiceClient
from projections.service import ServiceAddress, follower_waits
from tests.support.polling import line_within, wait_until

RUNBUS = str(Path(sys.executable).parent / "runbus")


@pytest.fixture
def service_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`home` read through its projection service, with readers that wait up to 30 s for one."""
    monkeypatch.setenv("RUNBUS_PROJECTION", "service")
    monkeypatch.setenv("RUNBUS_PROJECTION_IDLE", "60")
    monkeypatch.setenv("RUNBUS_DB_TIMEOUT", "30")
    close_session()
    yield home


def _say(context):
    context.log_result("word", "hi")


def _serving_pid() -> int | None:
    svc = session().services
    found = ServiceClient(ServiceAddress.of(svc.settings.home), svc.bus, start=None, timeout_s=30).running()
    return None if found is None else int(found["pid"])


class _Reader:
    """Queries the home's runs on a thread, one after another, until stopped; keeps every answer
    and every error. It starts a service when none answers, as every reader does."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        db = get_run_db()
        while not self.done.is_set():
            try:
                self.answers.append(int(db.sql("SELECT count(*) AS n FROM runs").n[0]))
            except Exception as exc:
                self.errors.append(exc)

    def answered_more(self, than: int) -> bool:
        return len(self.answers) > than

    def stop(self) -> None:
        self.done.set()
        self.thread.join(60)


def test_a_follower_takes_the_home_from_a_readers_service_while_a_reader_keeps_asking(service_home: Path) -> None:
    new_function().run(NewRun(handler=_say, name="before"))
    address = ServiceAddress.of(session().services.settings.home)
    reader = _Reader()
    follower: subprocess.Popen[str] | None = None
    try:
        wait_until(lambda: reader.answered_more(0) or reader.errors, "the reader has a service started")
        readers_service = _serving_pid()
        assert readers_service is not None
        follower = subprocess.Popen([RUNBUS, "project", "--follow"], env={**os.environ}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        while "projector following" not in line_within(follower.stdout, "the follower starts"):  # type: ignore[arg-type]
            pass  # (lines of the command line before it becomes the service)
        # the follower is ready to take the home: hold it there, as a slow start would, while the
        # reader goes on asking (a home without a service then has the reader start one)
        follower.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: _serving_pid() not in (None, follower.pid) or follower_waits(address),
                       "a service of the reader serves the home, or the follower has marked it")
            asked = len(reader.answers)
            wait_until(lambda: reader.answered_more(asked) or follower_waits(address),
                       "the reader is answered while the follower is held")
        finally:
            follower.send_signal(signal.SIGCONT)
        wait_until(lambda: _serving_pid() == follower.pid or follower.poll() is not None,
                   "the follower serves the home")
        assert follower.poll() is None, follower.communicate(timeout=60)
        taken = len(reader.answers)
        wait_until(lambda: reader.answered_more(taken + 2) or reader.errors, "the reader is answered by the follower")
        assert _serving_pid() == follower.pid
    finally:
        reader.stop()
        if follower is not None and follower.poll() is None:
            follower.send_signal(signal.SIGCONT)
            follower.send_signal(signal.SIGTERM)
            follower.communicate(timeout=60)
    assert reader.errors == [], reader.errors[:3]
    assert set(reader.answers) == {1}
    assert follower.returncode == 0
