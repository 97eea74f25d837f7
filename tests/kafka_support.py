"""Kafka test support: the `kafka_bootstrap` fixture and fresh topic names.

tests/conftest.py registers this module as a plugin, so any test can request `kafka_bootstrap`.
"""

from __future__ import annotations

import os
import uuid

import pytest

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def _broker_answers(bootstrap: str) -> str | None:
    """None if a broker at `bootstrap` answers a metadata request, else why not."""
    from kafka.admin import KafkaAdminClient
    from kafka.net.compat import KafkaNetClient

    made: list[KafkaNetClient] = []

    def net_client(**kwargs: object) -> KafkaNetClient:
        made.append(KafkaNetClient(**kwargs))
        return made[-1]

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), bootstrap_timeout_ms=3000,
                                 request_timeout_ms=3000, kafka_client=net_client)
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
