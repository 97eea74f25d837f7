"""The projection service keeps a reader's session for the next request while the fold changes
nothing (one READ ONLY transaction instead of one per request), and never answers from it once
the tables changed: a kept session is ended before the positions of a change are published."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.bus import Bus
from projections import service as service_module
from projections.client import ServiceClient
from projections.service import _KEPT_SESSION_S, ProjectionService
from tests.support.foreign import append, envelope, started
from tests.support.polling import wait_until
from tests.support.projection_services import service_in_thread

TXID = "SELECT txid_current() AS t"


@pytest.fixture
def served(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ProjectionService, ServiceClient, Bus]]:
    """A service of the test's home in this process, a client of it, and another bus handle to
    append with (a job of another process). Its sessions are kept whatever their age (a slow first
    request, e.g. the client importing pandas, would outlast the real bound): see the test of now()."""
    monkeypatch.setattr(service_module, "_KEPT_SESSION_S", 3600.0)
    with service_in_thread() as served:
        yield served


def _log_run(writer: Bus, number: int) -> None:
    append(writer, f"r{number}", [envelope(f"r{number}", 0, "run_started", started(name=f"run{number}"))])


def _txid(client: ServiceClient) -> int:
    return int(client.answer([(TXID, None)])[0].t[0])


def test_requests_with_nothing_folded_between_go_on_in_one_transaction(
        served: tuple[ProjectionService, ServiceClient, Bus]) -> None:
    _, client, writer = served
    first = _txid(client)
    assert [_txid(client) for _ in range(3)] == [first] * 3
    with client.snapshot() as query:  # a session block is a request too
        assert int(query(TXID).t[0]) == first
    _log_run(writer, 1)
    runs, after = client.answer([("SELECT name FROM runs", None), (TXID, None)])
    assert runs.name.tolist() == ["run1"]  # the kept session saw no run: it was ended, not asked
    assert int(after.t[0]) != first


def test_a_session_open_while_the_fold_commits_is_not_kept(
        served: tuple[ProjectionService, ServiceClient, Bus]) -> None:
    service, client, writer = served
    with client.snapshot() as query:
        assert query("SELECT count(*) AS n FROM runs").n[0] == 0
        _log_run(writer, 1)
        wait_until(lambda: sum(service.positions().values()) > 0, "the run is folded")
        assert query("SELECT count(*) AS n FROM runs").n[0] == 0  # still the block's snapshot
    assert client.answer([("SELECT count(*) AS n FROM runs", None)])[0].n[0] == 1


def test_kept_sessions_end_before_the_positions_of_a_change_are_published(
        served: tuple[ProjectionService, ServiceClient, Bus], monkeypatch: pytest.MonkeyPatch) -> None:
    service, client, writer = served
    ending = service._tables_changed

    def late() -> None:  # a fold thread held up here must not let a reader in on a session from before
        time.sleep(0.3)
        ending()

    monkeypatch.setattr(service, "_tables_changed", late)
    first = _txid(client)
    assert _txid(client) == first  # kept
    _log_run(writer, 1)
    assert client.answer([("SELECT count(*) AS n FROM runs", None)])[0].n[0] == 1


def test_now_in_an_answer_is_never_older_than_a_kept_session_may_be(
        served: tuple[ProjectionService, ServiceClient, Bus], monkeypatch: pytest.MonkeyPatch) -> None:
    _, client, _ = served  # nothing is folded meanwhile: only the session's age can end it
    monkeypatch.setattr(service_module, "_KEPT_SESSION_S", _KEPT_SESSION_S)

    def now_when_asked() -> tuple[float, float]:
        asked = time.time()
        return asked, float(client.answer([("SELECT epoch(now()) AS t", None)])[0].t[0])

    first_asked, first_now = now_when_asked()
    assert first_now >= first_asked - _KEPT_SESSION_S - 0.05
    wait_until(lambda: time.time() > first_asked + _KEPT_SESSION_S + 0.5, "time passes")
    asked, now = now_when_asked()  # the reaper and purge measure a run's silence with now()
    assert now >= asked - _KEPT_SESSION_S - 0.05, f"now() was {asked - now:.2f}s old"


def test_what_a_statement_leaves_in_its_session_is_gone_for_the_next_request(
        served: tuple[ProjectionService, ServiceClient, Bus]) -> None:
    _, client, _ = served
    first = _txid(client)
    client.answer([("EXPLAIN ANALYZE CREATE TEMP TABLE left_behind AS SELECT 1 AS x", None)])
    assert client.answer([("SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'left_behind'",
                           None)])[0].n[0] == 0
    client.answer([("EXPLAIN ANALYZE SET VARIABLE left_behind = 1", None)])
    assert client.answer([("SELECT getvariable('left_behind') AS v", None)])[0].v.isna().all()
    second = _txid(client)
    with pytest.raises(Exception, match="no_such_table"):
        client.answer([("SELECT * FROM no_such_table", None)])
    assert len({first, second, _txid(client)}) == 3


def test_a_rebuild_ends_the_kept_sessions(served: tuple[ProjectionService, ServiceClient, Bus]) -> None:
    _, client, writer = served
    _log_run(writer, 1)
    before = _txid(client)
    assert client.rebuild() >= 1
    assert _txid(client) != before
    assert client.answer([("SELECT name FROM runs", None)])[0].name.tolist() == ["run1"]


def test_every_answer_sees_every_run_logged_before_it_was_asked(
        served: tuple[ProjectionService, ServiceClient, Bus]) -> None:
    _, client, writer = served
    logged = [0]

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.sampled_from(["log", "answer", "session", "leave"]), min_size=1, max_size=8))
    def interleaved(steps: list[str]) -> None:
        for step in steps:
            if step == "log":
                logged[0] += 1
                _log_run(writer, logged[0])
            elif step == "answer":
                assert client.answer([("SELECT count(*) AS n FROM runs", None)])[0].n[0] == logged[0]
            elif step == "session":
                with client.snapshot() as query:
                    assert query("SELECT count(*) AS n FROM runs").n[0] == logged[0]
                    assert query("SELECT count(*) AS n FROM runs").n[0] == logged[0]
            else:  # a session that leaves something behind, then the same question
                client.answer([("EXPLAIN ANALYZE CREATE TEMP TABLE runs AS SELECT 1 AS x", None)])
                assert client.answer([("SELECT count(*) AS n FROM runs", None)])[0].n[0] == logged[0]

    interleaved()
