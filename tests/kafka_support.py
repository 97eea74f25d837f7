"""Kafka test support: the `kafka_bootstrap` fixture, fresh topic names, and brokers of a test's own.

tests/conftest.py registers this module as a plugin, so any test can request `kafka_bootstrap`.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
REPO = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO / "kafka" / "kafka.sh"
_START_TIMEOUT_S = 240


def _broker_answers(bootstrap: str, **config: Any) -> str | None:
    """None if a broker at `bootstrap` answers a metadata request (a client with kafka-python's
    `config`), else why not."""
    from kafka.admin import KafkaAdminClient
    from kafka.net.compat import KafkaNetClient

    made: list[KafkaNetClient] = []

    def net_client(**kwargs: object) -> KafkaNetClient:
        made.append(KafkaNetClient(**kwargs))
        return made[-1]

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), bootstrap_timeout_ms=3000,
                                 request_timeout_ms=3000, kafka_client=net_client, **config)
    except Exception as exc:
        for client in made:  # kafka-python leaves the IO thread running when bootstrap fails
            client.close()
        return str(exc)
    try:
        admin.list_topics()
        return None
    except Exception as exc:
        return str(exc)
    finally:
        admin.close()


@pytest.fixture(scope="session", name="kafka_bootstrap")
def kafka_bootstrap_fixture() -> str:
    """The test broker's "host:port" (RUNBUS_TEST_KAFKA); skips, or fails with RUNBUS_REQUIRE_KAFKA=1,
    when no broker answers."""
    bootstrap = os.environ.get("RUNBUS_TEST_KAFKA", DEFAULT_BOOTSTRAP)
    problem = _broker_answers(bootstrap)
    if problem is not None:
        message = (f"no Kafka broker answers at {bootstrap} (RUNBUS_TEST_KAFKA): {problem}. "
                   f"Start one with `make kafka-up` (port 9092) or run `make test`.")
        if os.environ.get("RUNBUS_REQUIRE_KAFKA") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return bootstrap


def unique_topic(prefix: str = "runbus-test") -> str:
    """A topic name no other test uses, so tests never see each other's records."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def use_fresh_topic(monkeypatch: pytest.MonkeyPatch, bootstrap: str, partitions: int = 3) -> None:
    """Point RUNBUS_BUS at a new topic of the test broker and rebuild the services."""
    from engine.api import close_session

    monkeypatch.setenv("RUNBUS_BUS", f"kafka://{bootstrap}")
    monkeypatch.setenv("RUNBUS_KAFKA_TOPIC", unique_topic())
    monkeypatch.setenv("RUNBUS_KAFKA_PARTITIONS", str(partitions))
    close_session()


# -- a broker of the test's own (kafka/kafka.sh on free ports) ---------------------------------------

def own_state(name: str) -> Path:
    """kafka/.state-test/<name>, one per pytest-xdist worker (<name>-<worker>): the state folder of a
    broker this test process starts (inside the test broker's, which git and `make clean` know). A
    fixed folder per name, so the next run's `up` stops a broker a killed run left behind."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return REPO / "kafka" / ".state-test" / (f"{name}-{worker}" if worker else name)


def free_ports(count: int) -> list[int]:
    """`count` loopback ports free at the time of asking."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class OwnBroker:
    """A broker started by kafka/kafka.sh for a test: where it listens and kafka.sh's settings for it."""

    bootstrap: str
    env: dict[str, str]  # kafka.sh's environment: port, controller port, state folder

    def kafka_sh(self, command: str, *, keep_data: bool = False,
                 timeout_s: float = _START_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run `kafka.sh command` on this broker (`up` with `keep_data` restarts on the same storage);
        CalledProcessError when it fails."""
        env = {**self.env, "RUNBUS_KAFKA_KEEP_DATA": "1" if keep_data else "0"}
        return subprocess.run(["bash", str(KAFKA_SH), command], env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=True)

    @property
    def state(self) -> Path:
        return Path(self.env["RUNBUS_KAFKA_STATE"])


def start_own_broker(state: Path, *, secure: bool = False) -> Iterator[OwnBroker]:
    """Start a broker with fresh storage in `state` on free ports (the secured one with `secure`),
    yield it, stop it. Fails, or skips unless RUNBUS_REQUIRE_KAFKA=1, when it cannot start."""
    port, controller = free_ports(2)
    env = {**os.environ, "RUNBUS_KAFKA_SECURE": "1" if secure else "0", "RUNBUS_KAFKA_PORT": str(port),
           "RUNBUS_KAFKA_CONTROLLER_PORT": str(controller), "RUNBUS_KAFKA_STATE": str(state),
           "RUNBUS_KAFKA_START_TIMEOUT": str(_START_TIMEOUT_S - 60)}
    env.pop("RUNBUS_KAFKA_KEEP_DATA", None)
    broker = OwnBroker(f"127.0.0.1:{port}", env)
    try:
        broker.kafka_sh("up")
        problem = None
    except subprocess.CalledProcessError as exc:
        problem = (exc.stderr or exc.stdout or "").strip()[-2000:] or f"kafka.sh up exited with {exc.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    if problem is not None:
        _stop(broker)
        kind = "secured " if secure else ""
        message = f"the {kind}Kafka broker of {state} (kafka/kafka.sh up) did not start: {problem}"
        if os.environ.get("RUNBUS_REQUIRE_KAFKA") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield broker
    finally:
        _stop(broker)


def wait_for_shared_broker(bootstrap: str, state: Path, what: str,
                           config: Callable[[], dict[str, Any]] | None = None,
                           timeout_s: float = _START_TIMEOUT_S) -> None:
    """Return once the broker another process started for the whole run (`make test`) with its
    state folder `state` is started and answers a metadata request (`config()`: the client
    settings, asked on each try: they are written while it starts). Started: no kafka.sh holds the
    state folder's lock (an `up` adds the users' ACLs after the broker answers). Fails, or skips
    unless RUNBUS_REQUIRE_KAFKA=1, after `timeout_s`, naming `what` and the last reason."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _wait_unlocked(state / ".lock")
            settings = config() if config else {}
        except Exception as exc:  # still starting: the lock held, its credentials not written yet
            problem = str(exc)
        else:
            problem = _broker_answers(bootstrap, **settings)
        if problem is None:
            return
        if time.monotonic() > deadline:
            message = f"{what} at {bootstrap} does not answer after {timeout_s:g}s: {problem}"
            if os.environ.get("RUNBUS_REQUIRE_KAFKA") == "1":
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        time.sleep(0.5)


def _wait_unlocked(lock: Path) -> None:
    """Take and release kafka.sh's lock file `lock` (BlockingIOError while another holds it)."""
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(held, fcntl.LOCK_UN)


def _stop(broker: OwnBroker) -> None:
    subprocess.run(["bash", str(KAFKA_SH), "down"], env=broker.env, capture_output=True, text=True, timeout=60,
                   check=False)
