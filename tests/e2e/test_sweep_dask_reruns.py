"""Dask runs no sweep task again by itself after a worker died: the driver decides what runs again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from engine.bootstrap import Services
from engine.runtimes.dask import DaskPool
from engine.settings import load_settings
from tests.support.polling import wait_until


def _note_run(svc: Services, path: str) -> int:
    """Appends this worker process's id to `path` (one line a run); returns it."""
    with open(path, "a") as out:
        out.write(f"{os.getpid()}\n")
    return os.getpid()


@pytest.mark.dask
def test_a_finished_task_is_not_run_again_when_its_worker_dies_before_its_result_was_collected(
        home: Path, tmp_path: Path) -> None:
    # Dask recomputes a result lost with its worker; for a sweep's task that would run its
    # iterations a second time. The task is refused instead, and the driver hears why.
    runs = tmp_path / "runs"
    pool = DaskPool(None, load_settings())
    try:
        (future,) = pool.submit_all(_note_run, [str(runs)])
        wait_until(lambda: future.status == "finished", "the task ran to its end")
        (pid,) = map(int, runs.read_text().split())
        os.kill(pid, signal.SIGKILL)  # its result has not been fetched: it lived on that worker only
        ((done, value),) = pool.wait_done([future])
    finally:
        pool.close()
    assert done is future
    assert pool.lost(value), value
    assert runs.read_text().split() == [str(pid)]  # it ran once
