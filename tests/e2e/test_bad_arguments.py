"""A wrong argument to the reading and logging API is an error naming it, at the call: not a
DuckDB error quoting SQL, nor an AttributeError from inside Runbus, nor an empty answer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine import NewRun, get_run_db, new_function


def _scored(context: Any) -> None:
    context.log_result("x", 1)


@pytest.fixture
def db(home: Path) -> Any:
    new_function().run(NewRun(handler=_scored, name="one"))
    return get_run_db()


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda db: db.list_runs(since="yesterday"), ValueError, "since 'yesterday' is not a time"),
    (lambda db: db.list_runs(until="2026-13-45"), ValueError, "until '2026-13-45' is not a time"),
    (lambda db: db.list_runs(since=5), TypeError, "since must be a datetime or ISO 8601 text"),
    (lambda db: db.list_runs(state="weird"), ValueError, "state 'weird' is not one of running, completed"),
    (lambda db: db.list_runs(labels=5), TypeError, "labels must be a mapping or a list"),
    (lambda db: db.list_runs(sort_by=["-result.x", "name"]), TypeError, "sort_by must be one column"),
    (lambda db: db.read_run(6), KeyError, "run uid must be non-empty text, got 6"),
    (lambda db: NewRun(handler=_scored).with_hyper_params({"a": 5}, "min.x"), TypeError,
     "hyper-param 'a': expected a list of values, got 5"),
    (lambda db: NewRun(handler=_scored).with_hyper_params([1, 2], "min.x"), TypeError,
     "hyperparams must be a mapping"),
], ids=["since text", "until not a date", "since a number", "state", "labels", "two sort columns", "uid a number",
        "hyper-param a number", "hyperparams a list"])
def test_a_wrong_argument_names_itself(db: Any, call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call(db)


def test_times_in_iso_8601_and_mlflow_s_order_by_list_are_taken(db: Any) -> None:
    assert db.list_runs(since="2000-01-01T00:00:00Z").name.tolist() == ["one"]
    assert db.list_runs(until="2000-01-01").empty
    assert db.list_runs(sort_by=["-result.x"]).name.tolist() == db.list_runs(sort_by="-result.x").name.tolist()


def test_log_results_of_a_list_is_refused_at_the_call_and_the_run_goes_on(home: Path) -> None:
    refused: list[str] = []

    def job(context: Any) -> None:
        for call in (lambda: context.log_results([1, 2]), lambda: context.log_metrics(["loss"])):
            try:
                call()
            except TypeError as exc:
                refused.append(str(exc))
        context.log_result("after", 1)

    run = new_function().run(NewRun(handler=job, name="lists"))
    assert run.state == "completed" and run.results == {"after": 1}
    assert refused == ["log_results takes a mapping of key -> value, got list",
                       "log_metrics takes a mapping of key -> value, got list"]


def test_a_runtime_runbus_does_not_have_is_refused_not_run_in_process(home: Path, tmp_path: Path) -> None:
    """`runbus run job.py:train --runtime spark://` ran the handler in-process, recorded 'local', and
    exited 0."""
    with pytest.raises(ValueError, match=re.escape("command 'spark://x' names a runtime Runbus does not have")):
        new_function(command="spark://x")
    (tmp_path / "job.py").write_text("def train(context):\n    context.log_result('ran', 1)\n")
    done = subprocess.run([str(Path(sys.executable).parent / "runbus"), "run", "job.py:train", "--runtime", "spark://"],
                          cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "names a runtime Runbus does not have" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert get_run_db().list_runs().empty


def test_iterations_of_a_parent_with_no_row_are_listed_by_its_uid(db: Any) -> None:
    """A parent given as the iterations name it is taken as it is, even with no row of its own
    (iterations appended by another producer); only a text no run is named by is resolved as a prefix."""
    from engine.api import session
    from tests.support.foreign import append, envelope, finished, started

    orphan = "f" * 32
    append(session().services.bus, orphan, [envelope(orphan, 0, "run_started", started(name="orphan",
                                                                                       parent_uid="nosuchparent")),
                                            envelope(orphan, 1, "run_finished", finished())])
    assert db.list_runs(parent="nosuchparent").uid.tolist() == [orphan]
    with pytest.raises(KeyError, match="no run with uid 'nosuch'"):
        db.list_runs(parent="nosuch")


def test_a_label_longer_than_the_bound_that_is_there_can_be_removed(home: Path) -> None:
    """Keys are bounded at the call that sets them; a label another producer set with a longer key
    (or one set before the bound) can still be removed."""
    from engine.api import session
    from producers.values import MAX_KEY_CHARS
    from tests.support.foreign import append, envelope, finished, started

    uid, key = "e" * 32, "k" * (MAX_KEY_CHARS + 50)
    append(session().services.bus, uid, [envelope(uid, 0, "run_started", started(labels={key: "v", "team": "a"})),
                                         envelope(uid, 1, "run_finished", finished())])
    db = get_run_db()
    with pytest.raises(TypeError, match="at most 250 are allowed"):
        db.set_labels(uid, {key: "w"})
    db.set_labels(uid, remove=[key])
    assert db.read_run(uid)["labels"] == {"team": "a"}


def test_a_local_input_that_is_no_file_is_a_warning_and_the_run_goes_on(home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nosuch.csv"
    with pytest.warns(UserWarning, match=re.escape(f"input 'data': {missing} is not a file; recorded as given")):
        run = new_function().run(NewRun(handler=_scored, name="unread").with_input("data", str(missing)))
    assert run.state == "completed"
