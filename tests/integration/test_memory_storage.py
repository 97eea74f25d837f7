"""The projection's storage settings that keep the projection service's memory bounded
(projections.database.STORAGE_SETTINGS): DuckDB never merges row groups (a merge builds them whole
in memory), and a closing connection leaves its appends in the WAL rather than in row groups of
their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.api import session
from engine.bootstrap import make_bus
from engine.projection_service import build_service
from projections.client import ServiceClient
from projections.database import open_projection
from projections.service import serving_in_thread


def _row_groups(path: Path, table: str) -> tuple[int, int]:
    """(row groups, rows) of `table` in the projection at `path`."""
    with open_projection(path, linger_s=0) as con:
        groups = con.execute(f"SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('{table}')").fetchall()
        rows = con.execute(f"SELECT count(*) FROM {table}").fetchall()
    return groups[0][0], rows[0][0]


def test_a_checkpoint_leaves_row_groups_unmerged(tmp_path: Path) -> None:
    path = tmp_path / "runbus.duckdb"
    with open_projection(path, linger_s=0) as con:
        con.execute("CREATE TABLE steps (run VARCHAR, step BIGINT)")
        for run in range(3):
            con.execute("INSERT INTO steps SELECT ?, i FROM range(1000) r(i)", [f"run{run}"])
            con.execute("CHECKPOINT")

    assert _row_groups(path, "steps") == (3, 3000)


def test_sessions_that_each_append_a_little_share_one_row_group(tmp_path: Path) -> None:
    path = tmp_path / "runbus.duckdb"
    for run in range(5):
        with open_projection(path, linger_s=0) as con:
            con.execute("CREATE TABLE IF NOT EXISTS steps (run VARCHAR, step BIGINT)")
            con.execute("INSERT INTO steps SELECT ?, i FROM range(100) r(i)", [f"run{run}"])

    assert _row_groups(path, "steps") == (1, 500)


@pytest.fixture
def served(home: Path) -> Iterator[ServiceClient]:
    """A projection service of `home` on a thread of this process, and a client of it."""
    svc = session().services
    bus = make_bus(svc.settings.bus_url, svc.settings)
    service = build_service(svc.settings, bus)
    with serving_in_thread(service):
        yield ServiceClient(service.address, svc.bus, start=None, timeout_s=30)
    bus.close()


def test_the_projection_service_folds_without_merging_row_groups(served: ServiceClient) -> None:
    answer = served.answer([("SELECT current_setting('max_vacuum_tasks') AS tasks", None)])[0]

    assert int(answer.tasks[0]) == 0
