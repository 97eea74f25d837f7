"""Killing a projector in the middle of its work, as a crash would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb

from producers.bus import Bus
from projections import Projector
from tests.support.tables import snapshot

ROOT = Path(__file__).resolve().parents[2]


def kill_projector_mid_stream(db_path: Path, batch_size: int, batches: int) -> None:
    """Project the current RUNBUS_* bus into `db_path`, `batch_size` bus records (each up to 500 events)
    at a time; SIGKILL it after `batches` committed batches."""
    child = subprocess.Popen([sys.executable, "-m", "tests.support.project_in_steps", str(db_path), str(batch_size)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ})
    for _ in range(batches):
        assert child.stdout is not None and child.stdout.readline().strip() == "batch"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


def resume_and_compare(bus: Bus, killed: Path, clean: Path) -> tuple[dict, dict]:
    """Resume the killed projection and fold a clean one; returns both snapshots."""
    with duckdb.connect(str(killed)) as con:
        projector = Projector(bus, con)
        consumed = sum(projector.positions().values())
        assert 0 < consumed < sum(bus.end_offsets().values()), "the kill must land mid-stream"
        projector.catch_up()
        resumed = snapshot(con)
    with duckdb.connect(str(clean)) as con:
        Projector(bus, con).catch_up()
        rebuilt = snapshot(con)
    return resumed, rebuilt
