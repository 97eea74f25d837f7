"""The projection service opens its file again on a new DuckDB instance once it has folded enough
and is idle (DuckDB reads the rows its instance appended more slowly than a new instance reads them
from the file), never under a reader's open snapshot, and folds and answers on after it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from producers.bus import Bus
from projections import service as service_module
from projections.client import ServiceClient
from projections.database import _connect_when_free, wal_path
from projections.service import ProjectionService
from tests.support.foreign import append, envelope, started
from tests.support.polling import wait_until
from tests.support.projection_services import service_in_thread

REOPEN_AFTER = 20


@pytest.fixture
def served(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ProjectionService, ServiceClient, Bus]]:
    """A service of the test's home in this process whose idle fold checkpoints whatever the WAL
    holds (so the file is written, and a reopen can be due), a client of it, and another bus handle
    to append with (a job of another process). It opens its file again after no number of records
    until a test lowers `reopens.after_records` (to REOPEN_AFTER), once it is ready to see it do so."""
    monkeypatch.setattr(service_module, "CHECKPOINT_WAL_BYTES", 1)

    def no_reopen_yet(service: ProjectionService) -> None:
        service.reopens.after_records = 10**9

    with service_in_thread(no_reopen_yet) as served:
        yield served


def _log_runs(writer: Bus, numbers: range) -> None:
    for number in numbers:
        append(writer, f"r{number}", [envelope(f"r{number}", 0, "run_started", started(name=f"run{number}"))])


def _runs(client: ServiceClient) -> list[str]:
    return client.answer([("SELECT name FROM runs ORDER BY name", None)])[0].name.tolist()


def _transaction_number(client: ServiceClient) -> int:
    return int(client.answer([("SELECT txid_current() AS t", None)])[0].t[0])


def _names(numbers: range) -> list[str]:
    return sorted(f"run{number}" for number in numbers)


def _wal_written(service: ProjectionService) -> bool:
    wal = wal_path(service.db_path)
    return not wal.exists() or wal.stat().st_size == 0


def test_after_folding_enough_the_service_opens_its_file_again_and_folds_on(
        served: tuple[ProjectionService, ServiceClient, Bus]) -> None:
    service, client, writer = served
    _log_runs(writer, range(REOPEN_AFTER + 5))
    assert _runs(client) == _names(range(REOPEN_AFTER + 5))
    before = _transaction_number(client)
    service.reopens.after_records = REOPEN_AFTER
    wait_until(lambda: service.reopens.reopened == 1, "the service opens its file again once the fold is idle")
    assert _runs(client) == _names(range(REOPEN_AFTER + 5))
    assert _transaction_number(client) < before  # a new instance counts its transactions anew
    _log_runs(writer, range(REOPEN_AFTER + 5, 2 * REOPEN_AFTER + 10))  # folded by the new connection's projector
    assert _runs(client) == _names(range(2 * REOPEN_AFTER + 10))
    wait_until(lambda: service.reopens.reopened == 2, "the service opens its file again after folding as much again")
    assert client.ping()["reopened"] == 2
    assert _runs(client) == _names(range(2 * REOPEN_AFTER + 10))


def test_a_reader_snapshot_keeps_the_file_open_until_it_ends(
        served: tuple[ProjectionService, ServiceClient, Bus]) -> None:
    service, client, writer = served
    _log_runs(writer, range(REOPEN_AFTER + 5))
    assert _runs(client) == _names(range(REOPEN_AFTER + 5))
    wait_until(lambda: _wal_written(service), "the idle fold writes its WAL to the file")
    with client.snapshot() as fetch:
        assert fetch("SELECT count(*) AS n FROM runs").n[0] == REOPEN_AFTER + 5
        service.reopens.after_records = REOPEN_AFTER
        wait_until(lambda: service.reopens.put_off >= 2, "the idle fold puts off opening the file again")
        assert service.reopens.reopened == 0
        assert fetch("SELECT count(*) AS n FROM runs").n[0] == REOPEN_AFTER + 5  # its snapshot answers on
    wait_until(lambda: service.reopens.reopened == 1, "the service opens its file again once the snapshot ended")
    assert _runs(client) == _names(range(REOPEN_AFTER + 5))



# another process opening the file with DuckDB directly, read-only, and keeping it for a while
_HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _held_by_another_process(path: Path, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_opening_the_file_again_waits_for_another_process_holding_it(tmp_path: Path) -> None:
    """Between closing and opening the file again, a process opening it with DuckDB directly (a
    user's duckdb shell) can take DuckDB's lock: the service waits for it instead of failing."""
    path = tmp_path / "runbus.duckdb"
    duckdb.connect(str(path)).close()
    holder = _held_by_another_process(path, 1.0)
    try:
        _connect_when_free(path, timeout_s=60).close()  # held when asked: it waited for the other to let go
    finally:
        holder.kill()
        holder.wait()
    holder = _held_by_another_process(path, 60.0)
    try:
        with pytest.raises(duckdb.IOException, match="Could not set lock"):
            _connect_when_free(path, timeout_s=0.3)
    finally:
        holder.kill()
        holder.wait()
