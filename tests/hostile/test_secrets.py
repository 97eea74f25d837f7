"""Secret values never leave the run's process in any string: error, traceback, return value,
results, labels, params, log lines, the raw log and what `runbus run` prints. RUNBUS_HOME and
the log are readable by their owner only."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import session
from producers.context import RunContext

SECRET = "s3cr3t-Tok3n_9f8e7d"
RUNBUS = str(Path(sys.executable).parent / "runbus")


def _with_secret(task: Any, kind: str, tmp_path: Path) -> Any:
    if kind == "file":
        secrets = tmp_path / "secrets.env"
        secrets.write_text(f"API_TOKEN={SECRET}\n")
        return task.with_secrets("file", str(secrets))
    return task.with_secrets("inline", {"API_TOKEN": SECRET})


def _raw_log(bus_home: Path) -> bytes:
    """Every byte the bus holds (the log file and its WAL on the embedded bus; the records on Kafka)."""
    svc = session().services
    svc.writer.flush(30)
    if svc.settings.bus_url == "embedded":
        return b"".join(p.read_bytes() for p in bus_home.glob("log.sqlite*"))
    positions: dict[int, int] = {}
    raw = b""
    while batch := svc.bus.read(positions, timeout=1.0):
        for record in batch:
            raw += record.value
            positions[record.partition] = record.offset + 1
    return raw


def _assert_masked(text: str | None) -> None:
    assert text is not None and SECRET not in text and "***" in text


@pytest.mark.parametrize("kind", ["file", "inline"])
def test_a_secret_in_an_exception_message_is_masked_everywhere_it_goes(
        bus_home: Path, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    def job(context: RunContext) -> None:
        token = context.get_secret("API_TOKEN")
        context.log_result("accuracy", 0.9)
        raise PermissionError(f"the server refused token {token!r} for user {token}")

    run = new_function().run(_with_secret(NewRun(handler=job), kind, tmp_path))

    assert run.state == "error"
    _assert_masked(run.error)
    _assert_masked(run.traceback)
    row = get_run_db().read_run(run.uid)
    _assert_masked(row["error"])
    _assert_masked(row["traceback"])
    assert row["results"] == {"accuracy": 0.9}
    finished = get_run_db().sql("SELECT payload FROM events WHERE run_uid = ? AND type = 'run_finished'",
                                [run.uid]).payload.iloc[0]
    _assert_masked(finished)
    assert SECRET.encode() not in _raw_log(bus_home)
    assert SECRET not in caplog.text


@pytest.mark.parametrize("kind", ["file", "inline"])
def test_a_secret_in_results_labels_params_return_value_and_log_lines_is_masked(
        bus_home: Path, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    def job(context: RunContext) -> dict[str, Any]:
        token = context.get_secret("API_TOKEN")
        context.logger.warning("calling the API with %s", token)
        try:
            raise ConnectionError(f"refused {token}")
        except ConnectionError:
            context.logger.exception("the call failed")
        context.log_result("header", f"Bearer {token}")
        context.log_result("nested", {"auth": [token], f"by-{token}": 1})
        context.log_results({"again": token})
        context.set_label("auth", f"token={token}")
        assert context.get_param("url", f"https://user:{token}@example.com") == f"https://user:{token}@example.com"
        return {"used": token}

    with caplog.at_level(logging.WARNING, logger="runbus.run"):
        run = new_function().run(_with_secret(NewRun(handler=job, params={"given": SECRET}), kind, tmp_path))

    assert run.state == "completed", run.error
    row = get_run_db().read_run(run.uid)
    for value in (row["results"], row["labels"], row["params"], run.results, run.labels, run.parameters):
        _assert_masked(json.dumps(value))
    assert row["results"]["header"] == "Bearer ***" and row["labels"]["auth"] == "token=***"
    assert row["params"]["url"] == "https://user:***@example.com" and row["params"]["given"] == "***"
    assert row["results"]["return"] == {"used": "***"}
    events = get_run_db().sql("SELECT payload FROM events WHERE run_uid = ?", [run.uid])
    assert not any(SECRET in payload for payload in events.payload)
    assert SECRET.encode() not in _raw_log(bus_home)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("runbus.run")]
    assert any("calling the API with ***" in line for line in lines)
    assert any("the call failed" in line and "refused ***" in line for line in lines)
    assert SECRET not in caplog.text


def test_runbus_run_prints_a_failed_run_with_its_secret_masked(home: Path, tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(
        "def leak(context):\n"
        "    raise RuntimeError('bad token ' + context.get_secret('API_TOKEN'))\n")
    (tmp_path / "secrets.env").write_text(f"API_TOKEN={SECRET}\n")
    env = {**os.environ, "RUNBUS_HOME": str(home)}

    done = subprocess.run([RUNBUS, "run", "job.py:leak", "--secrets", "secrets.env"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert "bad token ***" in done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_runbus_home_and_the_log_are_readable_by_their_owner_only(home: Path) -> None:
    def job(context: RunContext) -> None:
        context.log_result("x", 1)

    previous = os.umask(0o022)  # the usual umask: files world-readable unless made otherwise
    try:
        new_function().run(NewRun(handler=job))
        get_run_db().sql("SELECT count(*) FROM runs")  # the projection is made
    finally:
        os.umask(previous)

    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "artifacts").stat().st_mode) == 0o700
    # DuckDB makes its .wal anew after each checkpoint with the process's umask: the 0700 home
    # is what keeps that one private
    for made_file in [*home.glob("log.sqlite*"), home / "runbus.duckdb"]:
        assert stat.S_IMODE(made_file.stat().st_mode) == 0o600, made_file


def test_a_secret_too_short_to_mask_is_named_in_a_warning_and_leaves_messages_readable(
        home: Path, caplog: pytest.LogCaptureFixture) -> None:
    def job(context: RunContext) -> None:
        raise ValueError(f"step 1 of 10 failed with {context.get_secret('API_TOKEN')}")

    task = NewRun(handler=job).with_secrets("inline", {"SHORT_FLAG_FOR_TEST": "1", "API_TOKEN": SECRET})
    with caplog.at_level(logging.WARNING, logger="runbus.secrets"):
        run = new_function().run(task)

    assert run.error == "ValueError: step 1 of 10 failed with ***"
    assert "secret 'SHORT_FLAG_FOR_TEST' is shorter than 4 characters" in caplog.text


def test_no_repr_of_a_task_or_run_spec_shows_a_secret_value(home: Path) -> None:
    from engine.runspec import RunSpec

    task = NewRun(handler=print).with_secrets("inline", {"API_TOKEN": SECRET})
    # what a Dask worker is handed, and prints when the task fails
    spec = RunSpec(session().services.settings, print, "builtins:print", name="x", project="p",
                   secrets={"API_TOKEN": SECRET})

    for shown in (repr(spec), repr(task.secret_sources), repr(task), repr(spec.new_context(session().services))):
        assert SECRET not in shown


def test_a_refused_value_is_not_quoted_in_the_error_so_no_cut_secret_leaks(home: Path) -> None:
    class Config:
        def __repr__(self) -> str:  # long enough that a bounded repr would cut the secret in half
            return f"Config(endpoint='https://api.example.com/v1/models/abc', token='{SECRET}')"

    def job(context: RunContext) -> None:
        context.log_result("cfg", Config())

    run = new_function().run(NewRun(handler=job).with_secrets("inline", {"API_TOKEN": SECRET}))

    assert run.state == "error" and "result 'cfg'" in run.error and "Config" in run.error
    row = get_run_db().read_run(run.uid)
    for text in (run.error, run.traceback, row["error"], row["traceback"]):
        assert SECRET[:6] not in text


def test_a_secret_in_a_name_or_a_key_is_masked(bus_home: Path) -> None:
    def job(context: RunContext) -> None:
        context.log_result(f"auc@{SECRET}", 1)
        context.log_metric(f"loss/{SECRET}", 0.1)
        context.set_label(f"by-{SECRET}", "x")
        context.get_param(f"default-{SECRET}", 2)
        context.log_artifact(f"model-{SECRET}", body=b"x", format=f"f-{SECRET}")

    task = NewRun(handler=job, name=f"train-{SECRET}", params={SECRET: 1}, labels={SECRET: "v"})
    run = new_function().run(task.with_secrets("inline", {"API_TOKEN": SECRET}))

    assert run.state == "completed", run.error
    db = get_run_db()
    assert db.sql("SELECT name FROM runs WHERE uid = ?", [run.uid]).name.tolist() == ["train-***"]
    assert sorted(db.sql("SELECT key FROM params WHERE uid = ?", [run.uid]).key) == ["***", "default-***"]
    assert db.sql("SELECT key FROM results WHERE uid = ?", [run.uid]).key.tolist() == ["auc@***"]
    assert db.sql("SELECT key FROM metrics WHERE uid = ?", [run.uid]).key.tolist() == ["loss/***"]
    assert sorted(db.sql("SELECT key FROM labels WHERE uid = ?", [run.uid]).key) == ["***", "by-***"]
    events = db.sql("SELECT payload FROM events WHERE run_uid = ?", [run.uid])
    assert not any(SECRET in payload for payload in events.payload)
    assert SECRET.encode() not in _raw_log(bus_home)


def test_a_secret_in_a_sweeps_hyperparams_is_masked_in_the_run_description(home: Path) -> None:
    def job(context: RunContext, endpoint_key: str) -> None:
        context.log_result("ok", 1)

    task = NewRun(handler=job, name="sweep").with_secrets("inline", {"API_TOKEN": SECRET})
    run = new_function().run(task, hyperparams={"endpoint_key": [SECRET, "other-key"]})

    assert run.state == "completed", run.error
    started = get_run_db().sql("SELECT payload FROM events WHERE run_uid = ? AND type = 'run_started'",
                               [run.uid]).payload.iloc[0]
    assert "***" in started and SECRET not in started
    for extra in get_run_db().sql("SELECT extra::VARCHAR AS e FROM runs").e:
        assert SECRET not in (extra or "")
    # the sweep's own bodies (iteration_results, the parallel-coordinates plot) are Runbus's to mask
    bodies = [p for p in (home / "artifacts").rglob("*") if p.is_file()]
    assert bodies and not [p for p in bodies if SECRET.encode() in p.read_bytes()]


def test_a_secret_key_that_is_not_utf8_is_refused_naming_the_key_and_nothing_is_logged(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"secret key 'K\\udc80' is not valid UTF-8") as refused:
        NewRun(handler=print).with_secrets("inline", {"K\udc80": SECRET})
    assert SECRET not in str(refused.value)

    monkeypatch.setenv("K\udc80", SECRET)  # an environment variable whose name is not UTF-8
    with pytest.raises(ValueError, match=r"secret key 'K\\udc80' is not valid UTF-8") as refused:
        new_function().run(NewRun(handler=print).with_secrets("env", ["K\udc80"]))
    assert SECRET not in str(refused.value)
    assert get_run_db().sql("SELECT count(*) AS n FROM events").n.iloc[0] == 0


def test_the_run_logger_formats_as_logging_does_and_a_bad_format_does_not_end_the_run(
        home: Path, caplog: pytest.LogCaptureFixture) -> None:
    def job(context: RunContext) -> None:
        context.logger.warning("epoch %(epoch)d with %(token)s", {"epoch": 3, "token": SECRET})
        context.logger.warning("progress 50% of %s", SECRET)

    with caplog.at_level(logging.WARNING, logger="runbus.run"):
        run = new_function().run(NewRun(handler=job).with_secrets("inline", {"API_TOKEN": SECRET}))

    assert run.state == "completed", run.error
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("runbus.run")]
    assert "epoch 3 with ***" in lines
    assert any(line.startswith("progress 50% of %s (arguments ('***',)") for line in lines)
    assert SECRET not in caplog.text


def test_a_secret_split_across_lines_or_in_a_bytes_repr_is_masked(home: Path) -> None:
    secret = "pässwörd-Tok3n_9f8e7d"

    def split(context: RunContext) -> None:
        raise RuntimeError(f"token {secret[:7]}\n{secret[7:]} refused")

    def in_bytes(context: RunContext) -> None:
        open(b"/nonexistent/" + secret.encode())  # noqa: SIM115 - the error message shows a bytes repr

    for job in (split, in_bytes):
        run = new_function().run(NewRun(handler=job).with_secrets("inline", {"API_TOKEN": secret}))
        assert run.state == "error" and "***" in run.error
        row = get_run_db().read_run(run.uid)
        for text in (run.error, run.traceback, row["error"], row["traceback"]):
            assert secret[:7] not in text and secret[7:] not in text
            assert repr(secret.encode())[2:-1] not in text
