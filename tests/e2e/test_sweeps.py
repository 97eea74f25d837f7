"""Hyper-parameter sweeps as users run them: locally, on threads and on a real Dask LocalCluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine import NewRun, get_run_db, new_function
from engine.sweep.runner import _chunk_size
from tests.support import handlers
from tests.support.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")


def _iterations(parent_uid: str):
    return get_run_db().sql("SELECT iteration, state, uid FROM runs WHERE parent_uid = ? ORDER BY iteration",
                            [parent_uid])


def test_seed_sweep_picks_iteration_2_and_records_the_table(home: Path) -> None:
    task = NewRun(handler=handlers.seed_like).with_hyper_params({"p1": [5, 2, 3]}, "min.loss")
    run = new_function().run(task)

    assert run.state == "completed"
    assert run.results["best_iteration"] == 2
    assert run.results["loss"] == 6 and run.results["accuracy"] == 4
    table = run.artifact("iteration_results").as_df()
    assert list(table.columns) == ["iter", "state", "param.p1", "output.accuracy", "output.loss"]
    assert table.to_dict("list") == {"iter": [1, 2, 3], "state": ["completed"] * 3, "param.p1": [5, 2, 3],
                                     "output.accuracy": [10, 4, 6], "output.loss": [15, 6, 9]}
    assert run.artifact("parallel_coordinates").get().startswith(b"\x89PNG")
    children = _iterations(run.uid)
    assert list(children.iteration) == [1, 2, 3] and set(children.state) == {"completed"}
    requested = get_run_db().sql("SELECT count(*) AS n FROM events WHERE run_uid = ? "
                                 "AND type = 'iteration_requested'", [run.uid])
    assert requested.n[0] == 3


@pytest.mark.dask
def test_seed_sweep_gives_the_same_answer_on_a_dask_local_cluster(home: Path) -> None:
    task = NewRun(handler=handlers.seed_like_where).with_hyper_params({"p1": [5, 2, 3]}, "min.loss")
    run = new_function(command="dask://").run(task, handler=handlers.seed_like_where)

    assert run.state == "completed"
    assert run.results["best_iteration"] == 2
    assert len(run.artifact("iteration_results").as_df()) == 3
    iterations = get_run_db().sql(
        "SELECT r.runtime, TRY_CAST(res.value AS BIGINT) AS pid FROM runs r "
        "JOIN results res ON res.uid = r.uid AND res.key = 'pid' WHERE r.parent_uid = ?", [run.uid])
    assert len(iterations) == 3 and set(iterations.runtime) == {"dask://"}
    # each iteration ran in a worker process, not in the driver
    assert os.getpid() not in set(iterations.pid)


@pytest.mark.dask
def test_a_large_sweep_on_dask_keeps_every_iteration_a_run_with_its_events_in_the_log(home: Path) -> None:
    # 80 short iterations on 2 workers: after the first few, each Dask task runs a chunk of them and
    # flushes once; every iteration is still a run of its own, with its events and result in the log
    run = new_function(command="dask://").run(NewRun(handler=handlers.scored),
                                              hyperparams={"x": list(range(80)), "fail_on": [7]},
                                              selector="max.score")
    assert run.state == "error" and run.error == "1 of 80 iterations failed"  # x=7 raised, in its chunk
    assert run.results["best_iteration"] == 80 and run.results["score"] == 79
    children = _iterations(run.uid)
    assert list(children.iteration) == list(range(1, 81))
    assert children.set_index("iteration").state.to_dict() == {i: "error" if i == 8 else "completed"
                                                                 for i in range(1, 81)}
    scores = get_run_db().sql("SELECT r.iteration, v.value_num FROM runs r JOIN results v ON v.uid = r.uid "
                              "AND v.key = 'score' WHERE r.parent_uid = ? ORDER BY r.iteration", [run.uid])
    assert scores.value_num.tolist() == [x for x in range(80) if x != 7]
    table = run.artifact("iteration_results").as_df()
    assert table["output.score"].dropna().tolist() == [x for x in range(80) if x != 7]


def test_the_chunk_of_iterations_a_task_runs_fits_the_flush_interval_and_keeps_workers_balanced() -> None:
    assert _chunk_size([], 1000, 2) == 1  # nothing measured yet
    assert _chunk_size([0.002, 0.002, 0.004], 1000, 2) == 100  # ~0.2 s of 2 ms iterations
    assert _chunk_size([0.002], 100, 2) == 12  # at most a quarter of each worker's share
    assert _chunk_size([0.5], 1000, 2) == 1  # long iterations: one a task
    assert _chunk_size([0.0], 1000, 2) == 125


@pytest.mark.dask
def test_a_handler_from_a_script_file_runs_on_dask(home: Path, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("def handler(context, p=0):\n    context.log_result('sq', p * p)\n")
    run = new_function(command=str(script)).run(handler="handler", hyperparams={"p": [1, -3, 2]}, selector="max.sq")
    assert run.results["best_iteration"] == 2
    dask_run = new_function(command="dask://").run(handler=f"{script}:handler", hyperparams={"p": [1, -3, 2]},
                                                   selector="max.sq")
    assert dask_run.state == "completed", dask_run.error
    assert dask_run.results["best_iteration"] == 2 and dask_run.results["sq"] == 9


def test_grid_sweep_runs_every_combination_on_parallel_threads(home: Path) -> None:
    run = new_function().run(NewRun(handler=handlers.scored), hyperparams={"x": [1, 2, 3], "delay": [0.0, 0.01]},
                             selector="max.score", parallel_runs=3, quiet=True)
    assert run.state == "completed"
    assert len(_iterations(run.uid)) == 6
    assert run.results["best_iteration"] == 5  # x=3, delay=0.0 comes first among the best


def test_selector_skips_iterations_without_a_number_and_handles_negatives(home: Path) -> None:
    run = new_function().run(NewRun(handler=handlers.scored),
                             hyperparams={"x": [-4, None, -9, -1]}, selector="min.score", strategy="list")
    assert run.results["best_iteration"] == 3 and run.results["score"] == -9
    run = new_function().run(NewRun(handler=handlers.scored),
                             hyperparams={"x": [-4, None, -9, -1]}, selector="max.score")
    assert run.results["best_iteration"] == 4


def test_one_iteration_raising_makes_the_parent_error_but_the_best_is_still_reported(home: Path) -> None:
    run = new_function().run(NewRun(handler=handlers.scored, params={"fail_on": 2}),
                             hyperparams={"x": [1, 2, 3]}, selector="max.score")
    assert run.state == "error"
    assert "1 of 3 iterations failed" in run.error
    assert run.results["best_iteration"] == 3
    table = run.artifact("iteration_results").as_df()
    assert list(table.state) == ["completed", "error", "completed"]


def test_stop_condition_stops_dispatching(home: Path) -> None:
    run = new_function().run(NewRun(handler=handlers.scored), hyperparams={"x": [1, 5, 9, 2, 3]},
                             selector="max.score", stop_condition="score >= 5")
    assert run.state == "completed"
    assert list(_iterations(run.uid).iteration) == [1, 2]
    assert run.results["best_iteration"] == 2


def test_a_stop_condition_that_cannot_be_evaluated_ends_the_sweep_in_error(home: Path) -> None:
    """It raised out of the sweep after the first iteration: the parent stayed 'running' (then
    'lost') and the other iterations never ran."""
    run = new_function().run(NewRun(handler=handlers.scored), hyperparams={"x": [1, 0, 3]},
                             selector="max.score", stop_condition="10 / score > 100")
    assert run.state == "error"
    assert "stop_condition '10 / score > 100' failed: ZeroDivisionError" in run.error
    assert list(_iterations(run.uid).iteration) == [1, 2]  # none started after it failed
    assert get_run_db().read_run(run.uid)["state"] == "error"


def test_max_errors_stops_dispatching_after_that_many_failures(home: Path) -> None:
    run = new_function().run(NewRun(handler=handlers.scored, params={"fail_on": 7}),
                             hyperparams={"x": [7, 7, 1, 2, 3]}, max_errors=2, selector="max.score")
    assert run.state == "error"
    assert list(_iterations(run.uid).iteration) == [1, 2]
    assert run.error == "2 of 2 iterations failed; 3 not run"  # (it said nothing of the 3 max_errors kept back)


def test_a_selector_no_iteration_logged_is_a_warning(home: Path) -> None:
    with pytest.warns(UserWarning, match="no completed iteration logged a number as 'nosuch'"):
        run = new_function().run(NewRun(handler=handlers.scored), hyperparams={"x": [1, 2]}, selector="min.nosuch")
    assert run.state == "completed" and "best_iteration" not in run.results


def test_sweep_from_the_cli(home: Path, tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text("def train(context, p1=1):\n    context.log_result('loss', p1 * 3)\n")
    done = subprocess.run([RUNBUS, "run", "job.py:train", "--hyper", "p1=5,2,3", "--selector", "min.loss",
                           "--quiet"], cwd=tmp_path, env={**os.environ, "RUNBUS_HOME": str(home)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    parent = get_run_db().list_runs(iterations=False)
    assert get_run_db().read_run(parent.uid[0])["results"]["best_iteration"] == 2


SWEEP_SCRIPT = """
import sys
from engine import NewRun, new_function
from tests.support.handlers import gated
run = new_function().run(NewRun(handler=gated, params={"gate_after": 6, "gate": sys.argv[1]}),
                         hyperparams={"x": list(range(1, 21))}, selector="max.score", quiet=True)
print(run.uid)
"""


def _comparable(parent_uid: str) -> tuple:
    db = get_run_db()
    record = db.read_run(parent_uid)
    table = db.sql("SELECT uri FROM artifacts WHERE uid = ? AND key = 'iteration_results'", [parent_uid])
    csv = Path(table.uri[0].removeprefix("file://")).read_text()
    finished = db.sql("SELECT iteration, state FROM runs WHERE parent_uid = ? AND state = 'completed' "
                      "ORDER BY iteration", [parent_uid])
    results = db.sql("SELECT r.iteration, k.key, k.value FROM runs r JOIN results k USING (uid) "
                     "WHERE r.parent_uid = ? AND r.state = 'completed' ORDER BY 1, 2", [parent_uid])
    return (record["state"], record["results"], csv, finished.values.tolist(), results.values.tolist())


def test_a_killed_driver_is_resumed_running_only_unfinished_iterations(bus_home: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_HEARTBEAT_INTERVAL", "0.3")
    env = {**os.environ, "RUNBUS_HOME": str(bus_home), "PYTHONPATH": str(ROOT)}
    gate = tmp_path / "gate"  # iterations 7..20 wait for it: the driver dies with exactly 6 done
    driver = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, str(gate)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    db = get_run_db()
    wait_until(lambda: db.sql("SELECT count(*) AS n FROM runs WHERE parent_uid IS NOT NULL "
                              "AND (state = 'completed' OR iteration = 7)").n[0] == 7,
               "iterations 1-6 completed and 7 started")
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    parent_uid = db.sql("SELECT uid FROM runs WHERE iteration = 0").uid[0]
    finished_before = set(db.sql("SELECT iteration FROM runs WHERE parent_uid = ? AND state = 'completed'",
                                 [parent_uid]).iteration)
    assert finished_before == set(range(1, 7))
    gate.touch()

    resumed = subprocess.run([RUNBUS, "resume", parent_uid, "--quiet"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr

    runs = db.sql("SELECT iteration, state, started_at FROM runs WHERE parent_uid = ?", [parent_uid])
    after_kill = runs[runs.state != "lost"]
    rerun = set(after_kill.iteration) - finished_before
    assert rerun == set(range(1, 21)) - finished_before  # exactly the unfinished ones ran again
    assert after_kill.iteration.value_counts().max() == 1  # and none of the finished ones
    assert set(runs.state) <= {"completed", "lost"}
    assert (runs.state == "lost").sum() <= 1  # the iteration that was running when the driver died
    # the parent's duration is the whole sweep's (it was the resumed part's); a lost iteration's is
    # how long it was heard from before the verdict (it was 0)
    timed = db.sql("SELECT uid, state, duration_s, epoch(finished_at) - epoch(started_at) AS span FROM runs "
                   "WHERE uid = ? OR parent_uid = ?", [parent_uid, parent_uid])
    whole = timed[timed.uid == parent_uid].iloc[0]
    assert abs(whole.duration_s - whole.span) < 0.25, whole
    for lost in timed[timed.state == "lost"].itertuples():
        heard = db.sql("SELECT epoch(max(ts)) - epoch(min(ts)) AS s FROM events WHERE run_uid = ? "
                       "AND type <> 'run_finished'", [lost.uid]).s[0]
        assert abs(lost.duration_s - heard) < 0.01, (lost, heard)

    clean = subprocess.run([sys.executable, "-c", SWEEP_SCRIPT, str(gate)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stderr
    assert _comparable(parent_uid) == _comparable(clean.stdout.strip().splitlines()[-1])


@pytest.mark.dask
def test_an_iteration_whose_worker_dies_ends_lost(bus_home: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_HEARTBEAT_INTERVAL", "0.3")
    from engine.api import close_session
    close_session()
    marker = tmp_path / "died"
    run = new_function(command="dask://").run(NewRun(handler=handlers.dies_once, params={"marker": str(marker)}),
                                               hyperparams={"x": [1, 2, 3]}, selector="max.score", quiet=True)
    assert marker.exists()
    runs = _iterations(run.uid)
    lost = runs[runs.state == "lost"]
    assert list(lost.iteration) == [2]
    assert "no heartbeat" in get_run_db().read_run(lost.uid.iloc[0])["error"]
    assert get_run_db().sql("SELECT count(*) AS n FROM runs WHERE state = 'running'").n[0] == 0
    assert json.loads(json.dumps(run.results))["best_iteration"] == 3


HELD_HANDLER = """
import hashlib, os, time
from pathlib import Path
from distributed import get_worker

def held(context, x=0, folder=""):
    # logs the Dask task it runs in; the first iteration to run second in its task claims `folder`/held
    # (writing its process, x and task there) and waits, up to 120 s, for its worker to be killed
    task = str(get_worker().get_current_task())
    context.log_result("task", task)
    ran = Path(folder, hashlib.sha1(task.encode()).hexdigest())
    with ran.open("a") as out:
        out.write(f"{x}\\n")
    if len(ran.read_text().split()) == 2:
        try:
            claim = os.open(Path(folder, "held"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            claim = None
        if claim is not None:
            os.write(claim, f"{os.getpid()} {x} {task}\\n".encode())
            os.close(claim)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.02)
    context.log_result("score", x)
"""

HELD_SWEEP = """
import sys
from engine import new_function
run = new_function(command="dask://").run(handler=sys.argv[1] + ":held", params={"folder": sys.argv[2]},
                                          hyperparams={"x": list(range(1, 61))}, selector="max.score", quiet=True)
print(run.uid, run.state)
"""


def _held_claim(folder: Path) -> tuple[int, int, str] | None:
    text = (folder / "held").read_text() if (folder / "held").exists() else ""
    if not text.endswith("\n"):
        return None
    pid, x, task = text.split(maxsplit=2)
    return int(pid), int(x), task.strip()


def _runs_of_task(task: str) -> list[tuple[int, str]]:
    rows = get_run_db().sql("SELECT r.iteration, r.state, k.value FROM runs r JOIN results k ON k.uid = r.uid "
                            "AND k.key = 'task' WHERE r.parent_uid IS NOT NULL")
    return sorted((int(i), s) for i, s, v in rows.itertuples(index=False) if json.loads(v) == task)


@pytest.mark.dask
def test_a_worker_killed_mid_chunk_reruns_only_the_iterations_the_bus_does_not_show_finished(
        bus_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_HEARTBEAT_INTERVAL", "0.3")
    script, folder = tmp_path / "held.py", tmp_path / "held-state"
    script.write_text(HELD_HANDLER)
    folder.mkdir()
    env = {**os.environ, "RUNBUS_HOME": str(bus_home), "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-c", HELD_SWEEP, str(script), str(folder)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid, held_x, task = wait_until(lambda: _held_claim(folder), "an iteration runs second in its task", 120)
        # the iteration before it in its task completed, its events on the bus; this one has started
        wait_until(lambda: _runs_of_task(task) == [(held_x - 1, "completed"), (held_x, "running")],
                   "the held iteration's chunk-mate completed and it is running")
        os.kill(pid, signal.SIGKILL)  # the worker dies in the middle of the chunk
        out, err = driver.communicate(timeout=180)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    parent_uid, parent_state = out.split()[-2:]
    assert parent_state == "completed"
    runs = get_run_db().sql("SELECT iteration, state FROM runs WHERE parent_uid = ?", [parent_uid])
    completed = runs[runs.state == "completed"].iteration.value_counts()
    assert sorted(completed.index) == list(range(1, 61)) and set(completed) == {1}  # each once
    assert runs[runs.state == "lost"].iteration.tolist() == [held_x]  # the one running when its worker died
    assert len(runs) == 61  # no other iteration ran twice


NOTEBOOK_CELL = """
from engine import NewRun, new_function

def cell_handler(context, p=0):      # defined in __main__, as in a notebook cell
    context.log_result('cube', p ** 3)

run = new_function(command='dask://').run(NewRun(handler=cell_handler), hyperparams={'p': [1, 3, 2]},
                                          selector='max.cube', quiet=True)
print(run.state, run.results['best_iteration'], run.results['cube'])
"""


@pytest.mark.dask
def test_a_handler_defined_in_main_like_a_notebook_cell_runs_on_dask(home: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", NOTEBOOK_CELL], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "RUNBUS_HOME": str(home), "PYTHONPATH": str(ROOT)}, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "completed 2 27"


def test_reap_marks_runs_whose_process_died_as_lost(home: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_HEARTBEAT_INTERVAL", "0.2")
    env = {**os.environ, "RUNBUS_HOME": str(home), "PYTHONPATH": str(ROOT)}
    script = ("import os, signal, time\n"
              "from engine import NewRun, new_function\n"
              "def doomed(context):\n"
              "    context.log_result('step', 1)\n"
              "    time.sleep(0.5)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "new_function().run(NewRun(handler=doomed))\n")
    subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, timeout=60)
    # silent for 3 of its own heartbeat intervals, the run reads as lost before anyone reaps it
    wait_until(lambda: get_run_db().sql("SELECT state FROM runs").state.tolist() == ["lost"], "the run reads lost")
    reaped = subprocess.run([RUNBUS, "reap"], env=env, capture_output=True, text=True, timeout=60)
    assert reaped.returncode == 0, reaped.stderr
    assert "marked 1 run(s) lost" in reaped.stdout
    row = get_run_db().sql("SELECT state, error FROM runs").iloc[0]
    assert row.state == "lost" and "no heartbeat" in row.error


def test_after_a_worker_died_a_sweep_that_cannot_read_the_bus_to_its_end_runs_no_iteration_again(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bus holds more than the sweep can read in RUNBUS_FLUSH_TIMEOUT (a broker whose last records
    are not readable yet): an iteration of the dead worker not seen finished may be among them, so
    none is returned to run again; the sweep is told why, naming the setting."""
    from collections import Counter

    from distributed import KilledWorker

    from engine.api import close_session, session
    from engine.sweep.runner import BusNotRead, _ended_before_loss
    from engine.sweep.watcher import ChildWatcher
    from tests.support.foreign import append, envelope, finished, started

    monkeypatch.setenv("RUNBUS_FLUSH_TIMEOUT", "1")
    close_session()
    svc = session().services
    begun = svc.bus.end_offsets()
    append(svc.bus, "child-1", [envelope("child-1", 0, "run_started", started(parent_uid="sweep", iteration=1)),
                                envelope("child-1", 1, "run_finished", finished())])
    watcher = ChildWatcher(svc.bus, svc.codec, "sweep", begun)
    end = svc.bus.end_offsets()
    lost = KilledWorker("task", "worker", 0)
    with pytest.MonkeyPatch.context() as ahead:
        ahead.setattr(svc.bus, "end_offsets", lambda: {p: offset + 1 for p, offset in end.items()})
        with pytest.raises(BusNotRead) as stopped:
            _ended_before_loss(svc, watcher, [1, 2], lost, Counter(), 1)
    for part in ("iterations [1, 2]", "within 1s", "RUNBUS_FLUSH_TIMEOUT", "may have finished"):
        assert part in str(stopped.value), (part, str(stopped.value))
    # the bus read to its end: the finished iteration stays finished, the other is to run again
    assert set(_ended_before_loss(svc, watcher, [1, 2], lost, Counter(), 1)) == {1}
