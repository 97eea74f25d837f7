"""A Dask sweep whose driver cannot read the bus to its end after a worker died: it runs none of
that worker's iterations again, lets the others finish, leaves the sweep's run unfinished and says
how to finish it with `runbus resume`, which then runs only what the log does not show finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from engine import NewRun, get_run_db, new_function
from tests.support.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")
FLUSH_TIMEOUT_S = 3
HOLD_S = 2 * FLUSH_TIMEOUT_S + 2  # x == 1 runs on past the driver's first wait for the bus


def held_past_a_death(context, x=0, marker=""):
    """x == 2 kills its own worker the first time; x == 1, on the other worker, goes on running for
    HOLD_S after that."""
    died = Path(marker)
    if x == 2 and not died.exists():
        died.write_text("died")
        time.sleep(0.5)  # let run_started reach the bus
        os.kill(os.getpid(), signal.SIGKILL)
    if x == 1:
        deadline = time.monotonic() + 60
        while not died.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(HOLD_S)
    context.log_result("score", x)


def _runs(parent_uid: str):
    return get_run_db().sql("SELECT iteration, state, uid FROM runs WHERE parent_uid = ? ORDER BY iteration",
                            [parent_uid])


def _completed_outside(parent_uid: str, unread: list[int]):
    """The sweep's runs once every iteration outside `unread` (iteration 1 among them) completed."""
    def probe():
        runs = _runs(parent_uid)
        completed = set(runs[runs.state == "completed"].iteration)
        return (runs,) if completed >= {1, 2, 3} - set(unread) else None
    (runs,) = wait_until(probe, f"the iterations other than {unread} completed")
    return runs


def _sweep_stopped_by_an_unreadable_bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Sweep x = 1, 2, 3 on two Dask workers; once iteration 2 killed its worker, the driver's bus
    reports an end it cannot be read up to (a broker whose last records are not readable yet).
    The SweepNotFinished raised, once the bus reads normally again."""
    from engine.api import close_session, session
    from engine.sweep.runner import SweepNotFinished

    monkeypatch.setenv("RUNBUS_HEARTBEAT_INTERVAL", "0.3")
    monkeypatch.setenv("RUNBUS_FLUSH_TIMEOUT", str(FLUSH_TIMEOUT_S))
    close_session()
    svc = session().services
    marker = tmp_path / "died"
    real_end = svc.bus.end_offsets

    def end_offsets() -> dict[int, int]:
        ends = real_end()
        # far ahead: the heartbeats and iterations that go on writing do not bring it within reach
        return {p: offset + 10**9 for p, offset in ends.items()} if marker.exists() else ends

    with pytest.MonkeyPatch.context() as lagging, pytest.raises(SweepNotFinished) as stopped:
        lagging.setattr(svc.bus, "end_offsets", end_offsets)
        new_function(command="dask://").run(NewRun(handler=held_past_a_death, params={"marker": str(marker)}),
                                            hyperparams={"x": [1, 2, 3]}, selector="max.score", quiet=True)
    assert marker.exists()
    return stopped.value


@pytest.mark.dask
def test_a_sweep_that_cannot_read_the_bus_after_a_worker_died_is_left_unfinished_for_resume(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stopped = _sweep_stopped_by_an_unreadable_bus(tmp_path, monkeypatch)
    parent_uid = stopped.parent_uid
    assert 2 in stopped.iterations and 1 not in stopped.iterations
    for part in (f"iterations {stopped.iterations}", "RUNBUS_FLUSH_TIMEOUT", f"runbus resume {parent_uid}"):
        assert part in str(stopped), (part, str(stopped))
    # iteration 1 was running on a live worker when the other died: it ran to its end, not abandoned
    runs = _completed_outside(parent_uid, stopped.iterations)
    assert runs.iteration.value_counts().max() == 1  # nothing ran again
    db = get_run_db()
    parent = db.read_run(parent_uid)
    assert parent["state"] in ("running", "lost") and pd.isna(parent["finished_at"])  # no end: resume takes it
    # its heartbeats stopped: it reads lost (as a dead driver's sweep does), and its log says why
    wait_until(lambda: db.read_run(parent_uid)["state"] == "lost", "the sweep's run reads lost")
    lines = db.sql("SELECT text FROM logs WHERE uid = ? AND stream = 'stderr'", [parent_uid]).text.tolist()
    assert any(f"runbus resume {parent_uid}" in line for line in lines), lines


@pytest.mark.dask
def test_a_sweep_left_unfinished_by_an_unreadable_bus_resumes_running_only_what_did_not_finish(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stopped = _sweep_stopped_by_an_unreadable_bus(tmp_path, monkeypatch)
    parent_uid = stopped.parent_uid
    db = get_run_db()
    wait_until(lambda: db.read_run(parent_uid)["state"] == "lost", "the sweep's run reads lost")
    runs = _completed_outside(parent_uid, stopped.iterations)
    finished = runs[runs.state == "completed"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reaped = subprocess.run([RUNBUS, "reap"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert reaped.returncode == 0, reaped.stderr  # the reaper's 'lost' verdict on the sweep's run, as cron's would

    resumed = subprocess.run([RUNBUS, "resume", parent_uid, "--quiet"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    record = db.read_run(parent_uid)
    assert record["state"] == "completed"
    assert record["results"]["best_iteration"] == 3
    runs = _runs(parent_uid)
    completed = runs[runs.state == "completed"]
    assert sorted(completed.iteration) == [1, 2, 3]  # each iteration completed once
    assert set(finished.uid) <= set(completed.uid)  # those finished before were not run again
    assert runs[runs.state == "lost"].iteration.tolist() == [2]  # the one running when its worker died
    assert len(runs) == 4
    assert json.loads(db.sql("SELECT value FROM results WHERE uid = ? AND key = 'score'",
                             [parent_uid]).value[0]) == 3
