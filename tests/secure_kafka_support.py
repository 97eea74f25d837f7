"""The secured test broker: `KAFKA_SECURE=1`'s broker (kafka/kafka.sh), started by the tests on ports
of their own, once per session, and stopped after.

SASL_SSL, SCRAM users admin (super user), writer (may write topics runbus*, not read them), reader
(may read them, not write) and runner (both), a CA made for it. Fails, not skips, when RUNBUS_REQUIRE_KAFKA=1 and it
cannot start.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dotenv import dotenv_values

from producers.bus.kafka_security import KafkaSecurity, Secret

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / "kafka" / ".state-test-secure"
_START_TIMEOUT_S = 240


@dataclass(frozen=True)
class SecureBroker:
    """A running secured broker: where it listens and its users' credentials."""

    bootstrap: str
    secrets: Path  # ca.crt and <user>.password

    def security(self, user: str, password: str | None = None, ca_file: Path | None = None,
                 mechanism: str = "SCRAM-SHA-512") -> KafkaSecurity:
        """How `user` connects: its own password and the broker's CA unless others are given."""
        secret = Secret(password) if password is not None else Secret.from_file(str(self.secrets / f"{user}.password"))
        return KafkaSecurity("SASL_SSL", mechanism, user, secret, str(ca_file or self.secrets / "ca.crt"))

    def password(self, user: str) -> str:
        return (self.secrets / f"{user}.password").read_text().strip()

    def env(self, user: str) -> dict[str, str]:
        """The RUNBUS_* settings of `user`, as kafka.sh writes them for people to source."""
        return {key: value or "" for key, value in dotenv_values(self.secrets / f"{user}.env").items()}

    def admin_config(self) -> dict[str, object]:
        """kafka-python configuration of the super user."""
        return {"bootstrap_servers": [self.bootstrap], **self.security("admin").client_config()}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _kafka_sh(command: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "kafka" / "kafka.sh"), command], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def start_secure_broker() -> Iterator[SecureBroker]:
    """Start the secured broker (fresh storage), yield it, stop it."""
    port, controller = _free_ports(2)
    env = {**os.environ, "RUNBUS_KAFKA_SECURE": "1", "RUNBUS_KAFKA_PORT": str(port),
           "RUNBUS_KAFKA_CONTROLLER_PORT": str(controller), "RUNBUS_KAFKA_STATE": str(STATE),
           "RUNBUS_KAFKA_START_TIMEOUT": str(_START_TIMEOUT_S - 60)}
    env.pop("RUNBUS_KAFKA_KEEP_DATA", None)
    try:
        started = _kafka_sh("up", env, _START_TIMEOUT_S)
        problem = None if started.returncode == 0 else (started.stderr or started.stdout).strip()[-2000:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    if problem is not None:
        _kafka_sh("down", env, 60)
        message = f"the secured Kafka broker (kafka/kafka.sh with RUNBUS_KAFKA_SECURE=1) did not start: {problem}"
        if os.environ.get("RUNBUS_REQUIRE_KAFKA") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield SecureBroker(f"127.0.0.1:{port}", STATE / "secure")
    finally:
        _kafka_sh("down", env, 60)
