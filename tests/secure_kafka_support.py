"""The secured test broker: `KAFKA_SECURE=1`'s broker (kafka/kafka.sh). `make test` boots one for the
whole run, shared by every pytest-xdist worker (RUNBUS_TEST_KAFKA_SECURE=host:port and
RUNBUS_TEST_KAFKA_SECURE_STATE=its state folder; the tests wait for it if it is still starting and
leave it running). Without those, the tests start one on ports of their own, once per session (per
worker that runs them), and stop it after.

SASL_SSL, SCRAM users admin (super user), writer (may write topics runbus*, not read them), reader
(may read them, not write) and runner (both), a CA made for it. Fails, not skips, when RUNBUS_REQUIRE_KAFKA=1 and it
cannot start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from producers.bus.kafka_security import KafkaSecurity, Secret
from tests.kafka_support import own_state, start_own_broker, wait_for_shared_broker


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


def start_secure_broker() -> Iterator[SecureBroker]:
    """The shared secured broker once it answers (see the module docstring); else start one (fresh
    storage in kafka/.state-test/secure[-<worker>]), yield it, stop it."""
    shared = os.environ.get("RUNBUS_TEST_KAFKA_SECURE")
    if shared:
        state = Path(os.environ["RUNBUS_TEST_KAFKA_SECURE_STATE"])
        broker = SecureBroker(shared, state / "secure")
        wait_for_shared_broker(shared, state, "the shared secured Kafka broker (RUNBUS_TEST_KAFKA_SECURE)",
                               lambda: broker.security("admin").client_config())
        yield broker
        return
    started = start_own_broker(own_state("secure"), secure=True)
    broker = next(started)
    try:
        yield SecureBroker(broker.bootstrap, broker.state / "secure")
    finally:
        started.close()
