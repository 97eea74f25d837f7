"""Shared fixtures: every test gets its own RUNBUS_HOME and a fresh library session.

Tests of user-facing behaviour (tests/e2e, tests/hostile, tests/compat) read through the default
read path: the home's projection service, started on demand by the first reader and stopped when
the test ends. The other folders keep the in-process mode until they are moved; a test about the
in-process mode says so with `@pytest.mark.projection("inprocess")` (and a test elsewhere can ask
for the service with `@pytest.mark.projection("service")`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.api import close_session
from tests.support.projection_services import stop_projection_services

pytest_plugins = ["tests.kafka_support", "tests.support.browser"]

SERVICE_READ_PATH_FOLDERS = ("e2e", "hostile", "compat")
# a service a test left behind (one it started for another home, say) exits after this idle time
SERVICE_IDLE_S = "10"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "projection(mode): read the test's home through 'service' (the "
                                       "projection service) or 'inprocess' (this process folds)")


# Fixtures too costly to set up in every pytest-xdist worker (Makefile: --dist loadgroup): the tests
# using one run in a single worker. The secured broker is one per session (unless `make test` shares
# one with every worker: RUNBUS_TEST_KAFKA_SECURE); a browser, and test_ui's seeded UI, one per module.
SESSION_GROUPS = {"broker": "kafka-secure"}
MODULE_GROUPED_FIXTURES = {"browser", "ui"}
# The order in which the folders' tests are handed to the workers: the slow ones first (Hypothesis
# machines, many processes, brokers), so that the many short unit tests fill the end of the run
# instead of a minute-long test starting last while the other workers have nothing left to do.
FOLDER_ORDER = ("property", "e2e", "hostile", "integration", "compat", "contract", "unit")


def _folder_rank(item: pytest.Item) -> int:
    parts = item.nodeid.split("::")[0].split("/")  # relative to the rootdir: tests/<folder>/test_x.py
    folder = parts[1] if len(parts) > 2 and parts[0] == "tests" else ""
    return FOLDER_ORDER.index(folder) if folder in FOLDER_ORDER else len(FOLDER_ORDER)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_folder_rank)  # stable: each folder keeps its own order
    session_groups = {} if os.environ.get("RUNBUS_TEST_KAFKA_SECURE") else SESSION_GROUPS
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        groups = [group for fixture, group in session_groups.items() if fixture in names]
        if not groups and names & MODULE_GROUPED_FIXTURES:
            groups = [item.nodeid.split("::")[0]]
        for group in groups[:1]:
            item.add_marker(pytest.mark.xdist_group(group))


def projection_mode(request: pytest.FixtureRequest) -> str:
    """The RUNBUS_PROJECTION a test runs with: its marker's, else its folder's."""
    marker = request.node.get_closest_marker("projection")
    if marker is not None:
        return str(marker.args[0])
    folder = Path(str(request.node.path)).parent.name
    return "service" if folder in SERVICE_READ_PATH_FOLDERS else "inprocess"


@pytest.fixture
def home(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty RUNBUS_HOME on the embedded bus, used by the engine for this test. The projection
    services of homes under the test's folder are stopped (and waited for) at teardown."""
    runbus_home = tmp_path / "runbus-home"
    monkeypatch.setenv("RUNBUS_HOME", str(runbus_home))
    monkeypatch.delenv("RUNBUS_BUS", raising=False)
    monkeypatch.setenv("RUNBUS_FLUSH_INTERVAL", "0.05")
    monkeypatch.setenv("RUNBUS_PROJECTION", projection_mode(request))
    monkeypatch.setenv("RUNBUS_PROJECTION_IDLE", SERVICE_IDLE_S)
    close_session()
    try:
        yield runbus_home
    finally:
        close_session()
        stop_projection_services(runbus_home, tmp_path)


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus_home(request: pytest.FixtureRequest, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`home`, once on the embedded bus and once on a fresh topic of the Kafka test broker."""
    if request.param == "kafka":
        from tests.kafka_support import use_fresh_topic

        use_fresh_topic(monkeypatch, request.getfixturevalue("kafka_bootstrap"))
    yield home
    close_session()
