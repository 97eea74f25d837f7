"""Shared fixtures: every test gets its own RUNBUS_HOME and fresh services."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.api import close_session

pytest_plugins = ["tests.kafka_support", "tests.support.browser"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty RUNBUS_HOME on the embedded bus, used by the engine for this test."""
    runbus_home = tmp_path / "runbus-home"
    monkeypatch.setenv("RUNBUS_HOME", str(runbus_home))
    monkeypatch.delenv("RUNBUS_BUS", raising=False)
    monkeypatch.setenv("RUNBUS_FLUSH_INTERVAL", "0.05")
    monkeypatch.setenv("RUNBUS_PROJECTION", "inprocess")  # until the fixture stops each home's service
    close_session()
    yield runbus_home
    close_session()


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus_home(request: pytest.FixtureRequest, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`home`, once on the embedded bus and once on a fresh topic of the Kafka test broker."""
    if request.param == "kafka":
        from tests.kafka_support import use_fresh_topic

        use_fresh_topic(monkeypatch, request.getfixturevalue("kafka_bootstrap"))
    yield home
    close_session()
