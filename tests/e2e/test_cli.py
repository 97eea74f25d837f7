"""The runbus command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.polling import line_within

RUNBUS = str(Path(sys.executable).parent / "runbus")

JOB = """
def train(context, lr=0.1, epochs=3):
    for step in range(epochs):
        context.log_metric("loss", 1.0 / (step + 1), step=step)
    context.log_result("accuracy", 0.5 + lr)
    return "ok"

def broken(context):
    raise RuntimeError("no data")

def until_stopped(context):
    import os, time
    deadline = time.monotonic() + 120
    step = 0
    while not os.path.exists("stop") and time.monotonic() < deadline:
        context.log_metric("tick", step, step=step)
        step += 1
        time.sleep(0.05)
"""


@pytest.fixture
def cli(home: Path, tmp_path: Path):
    (tmp_path / "job.py").write_text(JOB)
    env = {**os.environ, "RUNBUS_HOME": str(home)}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([RUNBUS, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    run.env = env  # type: ignore[attr-defined]
    run.cwd = tmp_path  # type: ignore[attr-defined]
    return run


def test_run_then_list_show_and_query(cli) -> None:
    cli("run", "job.py:train", "-p", "lr=0.25", "-p", "epochs=4", "--name", "exp1", "--label", "team=a")

    runs = json.loads(cli("runs", "--format", "json").stdout)
    assert [(r["name"], r["state"]) for r in runs] == [("exp1", "completed")]
    shown = json.loads(cli("show", runs[0]["uid"][:8]).stdout)
    assert shown["params"] == {"lr": 0.25, "epochs": 4}
    assert shown["results"] == {"accuracy": 0.75, "return": "ok"}
    assert shown["labels"] == {"team": "a"}
    csv = cli("sql", "SELECT key, count(*) AS n FROM metrics GROUP BY key", "--format", "csv").stdout
    assert csv.splitlines() == ["key,n", "loss,4"]
    assert "exp1" in cli("runs", "--label", "team=a").stdout
    assert "exp1" not in cli("runs", "--label", "team=b").stdout


def test_errors_are_one_line_and_exit_non_zero(cli) -> None:
    failed = cli("run", "job.py:broken", check=False)
    assert failed.returncode == 1
    assert "RuntimeError: no data" in failed.stdout  # the run's table shows its error and traceback
    assert failed.stderr.strip().splitlines() == [  # one line on stderr (the traceback was printed again)
        f"error: run broken ({failed.stdout.split('(')[1][:8]}) ended in state error: RuntimeError: no data"]
    (cli.cwd / "script.py").write_text("raise RuntimeError('no data')\n")  # type: ignore[attr-defined]
    script = cli("run", "script.py", check=False)
    assert script.returncode == 1 and script.stderr.count("Traceback") == 1  # the script's own, once
    assert script.stderr.strip().splitlines()[-1].endswith("command exited with code 1: RuntimeError: no data")

    refused = cli("sql", "DROP TABLE runs", check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("error:") and "read-only" in refused.stderr
    assert "Traceback" not in refused.stderr

    missing = cli("show", "nope", check=False)
    assert missing.returncode == 1 and "no run with uid 'nope'" in missing.stderr


def test_project_rebuild_reports_the_records_folded(cli) -> None:
    cli("run", "job.py:train")
    assert "applied" in cli("project").stdout
    rebuilt = cli("project", "--rebuild").stdout
    assert "rebuilt from" in rebuilt
    assert json.loads(cli("sql", "SELECT count(*) AS n FROM runs", "--format", "json").stdout) == [{"n": 1}]


def test_tail_prints_events_of_a_run_that_is_still_going(cli) -> None:
    # the job logs until the test says stop: the tail may start late, the job is still going
    job = subprocess.Popen([RUNBUS, "run", "job.py:until_stopped"], cwd=cli.cwd, env=cli.env,
                           stdout=subprocess.DEVNULL)
    tail = subprocess.Popen([RUNBUS, "tail", "--type", "metric"], cwd=cli.cwd, env=cli.env,
                            stdout=subprocess.PIPE, text=True)
    try:
        first = line_within(tail.stdout, "the tail printed a metric")
        assert "metric" in first and "tick" in first
        assert job.poll() is None  # the run is still going while its events are shown
        (cli.cwd / "stop").touch()
        assert job.wait(60) == 0
    finally:
        job.kill()
        tail.terminate()
        tail.wait(10)


def test_runs_filters_and_sorts_as_list_runs_does(cli) -> None:
    """`runbus runs` had no --parent, --since, --until nor --sort, and its JSON held the labels as
    JSON text inside the JSON."""
    cli("run", "job.py:train", "--hyper", "lr=0.3,0.1,0.2", "--selector", "max.accuracy", "--label", "team=a",
        "--quiet")
    every = json.loads(cli("runs", "--format", "json").stdout)
    parent = next(r["uid"] for r in every if r["iteration"] == 0)
    listed = json.loads(cli("runs", "--parent", parent[:6], "--sort", "-result.accuracy", "--format", "json").stdout)
    assert [r["iteration"] for r in listed] == [1, 3, 2]  # lr 0.3, 0.2, 0.1
    assert listed[0]["labels"] == {"team": "a"}
    assert json.loads(cli("runs", "--until", "2000-01-01", "--format", "json").stdout) == []
    assert len(json.loads(cli("runs", "--since", "2000-01-01T00:00:00Z", "--format", "json").stdout)) == 4
    for args, said in ((["--parent", "zzzz"], "no run with uid 'zzzz'"),
                       (["--since", "yesterday"], "since 'yesterday' is not a time"),
                       (["--state", "bogus"], "state 'bogus' is not one of")):
        refused = cli("runs", *args, check=False)
        assert refused.returncode != 0 and said in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
