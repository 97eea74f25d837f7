"""The seed's sweep on dask:// from a plain script with no `if __name__ == '__main__':` guard."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import get_run_db
from tests.support.projection_services import SERVICE_MODULE

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.py"

# the seed's lines for the sweep on Dask, as the tutorial wrote them
SEED_DASK_LINES = """
print('the script body ran')
task = NewRun(handler=handler).with_hyper_params({'p1': [5, 2, 3]}, 'min.loss')
run = new_function(command='dask://').run(task, handler=handler)
print('best iteration:', run.results['best_iteration'], run.state)
"""


def _unguarded_seed(folder: Path) -> Path:
    """The quickstart's imports and handler, then the seed's Dask lines at module level."""
    head = QUICKSTART.read_text().split('\nif __name__ == "__main__":', 1)[0]
    script = folder / "seed_on_dask.py"
    script.write_text(head + "\n" + SEED_DASK_LINES)
    return script


def _processes_of(home: Path) -> set[int]:
    """Live processes (other than this one) whose environment names `home`: the script and its workers
    (not the home's projection service: it serves every reader of the home, and the fixture stops it)."""
    marker = f"RUNBUS_HOME={home}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if SERVICE_MODULE in (entry / "cmdline").read_bytes().split(b"\0"):
                continue
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


@pytest.mark.dask
def test_the_seed_as_an_unguarded_script_runs_one_sweep_on_dask(bus_home: Path, tmp_path: Path) -> None:
    script = _unguarded_seed(tmp_path)
    process = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "RUNBUS_HOME": str(bus_home)})
    seen: set[int] = set()
    while process.poll() is None:  # the worker processes, while they live
        seen |= _processes_of(bus_home)
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.count("the script body ran") == 1  # no worker ran the script again
    assert stdout.strip().splitlines()[-1] == "best iteration: 2 completed"

    db = get_run_db()
    top = db.sql("SELECT uid, state FROM runs WHERE parent_uid IS NULL")
    assert top.state.tolist() == ["completed"]  # one sweep
    iterations = db.sql("SELECT iteration, state FROM runs WHERE parent_uid = ? ORDER BY iteration", [top.uid[0]])
    assert iterations.to_dict("list") == {"iteration": [1, 2, 3], "state": ["completed"] * 3}
    assert db.sql("SELECT count(*) AS n FROM events WHERE type = 'run_started'").n[0] == 4
    assert db.read_run(top.uid[0])["results"]["best_iteration"] == 2

    workers = seen - {process.pid}
    assert len(workers) >= 2, f"saw no worker processes (seen: {seen})"
    assert not _processes_of(bus_home), "processes of the script outlived it"


@pytest.mark.dask
def test_dask_with_an_address_uses_that_existing_scheduler(home: Path) -> None:
    from engine import NewRun, new_function
    from engine.runtimes.dask import local_cluster
    from tests.support import handlers

    with local_cluster(1) as cluster:
        address = cluster.scheduler_address.removeprefix("tcp://")
        task = NewRun(handler=handlers.seed_like).with_hyper_params({"p1": [5, 2, 3]}, "min.loss")
        run = new_function(command=f"dask://{address}").run(task, quiet=True)
        assert run.state == "completed" and run.results["best_iteration"] == 2
        # the iterations ran on that cluster's worker: it is still there for the next job
        assert len(cluster.scheduler_info["workers"]) == 1
    runtimes = get_run_db().sql("SELECT DISTINCT runtime FROM runs").runtime.tolist()
    assert runtimes == [f"dask://{address}"]
