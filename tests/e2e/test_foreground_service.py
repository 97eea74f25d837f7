"""The projection service in the foreground (what `runbus project --follow` becomes): Ctrl-C or SIGTERM
ends it while it waits for the home, and a failure of the projection ends it with one line naming
the cause and a non-zero status, as the command line says errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from engine import NewRun, new_function
from engine.api import close_session, session
from engine.projection_service import service_command
from projections.client import ServiceClient
from projections.service import ServiceAddress
from tests.support.polling import line_within, wait_until

ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")


@pytest.fixture
def service_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RUNBUS_PROJECTION", "service")
    close_session()
    yield home


def _serving_pid() -> int | None:
    svc = session().services
    found = ServiceClient(ServiceAddress.of(svc.settings.home), svc.bus, start=None, timeout_s=30).running()
    return None if found is None else int(found["pid"])


def _end(process: subprocess.Popen[str]) -> tuple[str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=60)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_follower_waiting_for_the_home_ends_at_once_on_a_signal(service_home: Path, signum: int) -> None:
    first = subprocess.Popen([RUNBUS, "project", "--follow"], env={**os.environ}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _serving_pid() == first.pid or first.poll() is not None, "the first follower serves")
        assert first.poll() is None, first.communicate()
        # a second follower started without the command line's check waits for the home, for as long
        # as RUNBUS_DB_TIMEOUT says: far longer than this test waits for it to exit on the signal
        second = subprocess.Popen(service_command("--follow", "--foreground"), cwd=ROOT,
                                  env={**os.environ, "RUNBUS_DB_TIMEOUT": "3600"}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            assert "projector following" in line_within(second.stdout, "the second follower starts")  # type: ignore[arg-type]
            second.send_signal(signum)
            out, err = second.communicate(timeout=60)  # the test's deadline: it must end by itself
        finally:
            _end(second)
        assert second.returncode == 0, err
        assert "stopped before it took" in out, out
        assert err == "", err
        assert _serving_pid() == first.pid  # the first one serves on
    finally:
        _end(first)


def test_a_follower_stopped_for_a_purge_waits_for_the_purge_lock_and_still_ends_on_sigterm(service_home: Path) -> None:
    """Stopped for a purge, a follower lets go of the home and takes it again only once the purge
    lock is free (the purge removes the projection's files meanwhile); a signal ends that wait."""
    follower = subprocess.Popen([RUNBUS, "project", "--follow"], env={**os.environ}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _serving_pid() == follower.pid or follower.poll() is not None, "the follower serves")
        assert follower.poll() is None, follower.communicate()
        address = ServiceAddress.of(session().services.settings.home)
        client = ServiceClient(address, session().services.bus, start=None, timeout_s=30)
        with FileLock(str(address.purge), mode=0o600, thread_local=False):
            assert client.stop(for_purge=True) == follower.pid
            _line_saying(follower, "waiting for the purge of")  # it waits, rather than ending as a plain stop does
            with FileLock(str(address.lock), thread_local=False).acquire(timeout=60):  # its service let go
                pass
            assert client.running() is None and follower.poll() is None
            follower.send_signal(signal.SIGTERM)
            out, err = follower.communicate(timeout=60)  # while the purge lock is still held
    finally:
        _end(follower)
    assert follower.returncode == 0, err
    assert "projector stopped" in out and "folding the log again" not in out, out


def _line_saying(process: subprocess.Popen[str], text: str) -> str:
    """The first line of `process`'s stdout holding `text` (earlier lines are skipped)."""
    while True:
        line = line_within(process.stdout, f"a line saying {text!r}")  # type: ignore[arg-type]
        assert line, f"stdout ended before a line saying {text!r}"
        if text in line:
            return line


def test_no_follower_takes_the_home_while_a_purge_holds_it(service_home: Path) -> None:
    """A purge holds its lock from before it stops the service until the projection's files are gone:
    a follower started meanwhile waits for it, so the purge gets the home (it failed half of the time
    when a new follower could take the home first)."""
    address = ServiceAddress.of(session().services.settings.home)
    purging = FileLock(str(address.purge), mode=0o600, thread_local=False)
    purging.acquire(timeout=10)
    follower = subprocess.Popen([RUNBUS, "project", "--follow"], env={**os.environ}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        _line_saying(follower, "projector following")
        # it goes for the home right after that line: the home's lock stays free for the purge
        home = FileLock(str(address.lock), thread_local=False)
        watched_until = time.monotonic() + 2.0
        while time.monotonic() < watched_until:
            with home.acquire(timeout=5):
                assert _serving_pid() is None
        purging.release()
        wait_until(lambda: _serving_pid() == follower.pid or follower.poll() is not None, "the follower serves")
        assert follower.poll() is None, follower.communicate()
    finally:
        if purging.is_locked:
            purging.release()
        _end(follower)

_FAILING = """
import duckdb

from projections.user import UserProjection


class Failing(UserProjection):
    name = "failing"

    def create(self, con):
        pass

    def drop(self, con):
        pass

    def apply(self, con, events):
        raise duckdb.IOException("the disk under the projection went away\\nand a hint below")
"""


def _hi(context):
    context.log_result("word", "hi")


def test_a_failing_projection_ends_the_follower_with_one_line_naming_the_cause(service_home: Path,
                                                                              tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "failing_projection.py").write_text(textwrap.dedent(_FAILING))
    new_function().run(NewRun(handler=_hi, name="folded"))
    env = {**os.environ, "RUNBUS_PROJECTIONS": "failing_projection:Failing",
           "PYTHONPATH": os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])}
    follower = subprocess.Popen([RUNBUS, "project", "--follow"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        out, err = follower.communicate(timeout=120)  # the test's deadline: the failure ends it
    finally:
        _end(follower)
    assert follower.returncode == 1, (out, err)
    assert err.strip().splitlines() == [
        f"error: the projection service of {service_home.resolve()} stopped: "
        "the disk under the projection went away"], err
