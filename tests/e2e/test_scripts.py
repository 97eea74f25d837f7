"""Script-level runs: a plain Python script opens its own run (engine.script), run as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine import get_run_db
from tests.support.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")


def _script(folder: Path, body: str, name: str = "train.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _run(script: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=script.parent, env=_env(**extra))


def _runs():
    return get_run_db().sql("SELECT uid, name, state, error, traceback, runtime FROM runs ORDER BY started_at")


def test_a_script_whose_only_runbus_line_is_get_or_create_ctx_is_a_run(bus_home: Path, tmp_path: Path) -> None:
    script = _script(tmp_path, """
        import logging, subprocess, sys
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('train')
        print('training with', ctx.get_param('lr', 0.1))  # a default is recorded as a param
        ctx.set_label('team', 'vision')
        logging.basicConfig()
        logging.getLogger('trainer').warning('a warning from logging')
        subprocess.run([sys.executable, '-c', 'print("from a child process")'], check=True)
        for step in range(3):
            ctx.log_metric('loss', 1.0 / (step + 1), step=step)
        ctx.log_result('accuracy', 0.93)
        assert get_or_create_ctx('another name') is ctx  # one run per process
    """)
    done = _run(script)
    assert done.returncode == 0, done.stderr
    assert "training with 0.1" in done.stdout  # still printed to the terminal

    runs = _runs()
    assert runs[["name", "state", "runtime"]].to_dict("records") == [
        {"name": "train", "state": "completed", "runtime": "script"}]
    record = get_run_db().read_run(runs.uid[0])
    assert record["params"] == {"lr": 0.1} and record["results"] == {"accuracy": 0.93}
    assert record["labels"]["team"] == "vision"
    assert get_run_db().sql("SELECT value FROM metrics ORDER BY step").value.tolist() == [1.0, 0.5, 1.0 / 3]
    listed = subprocess.run([RUNBUS, "runs"], capture_output=True, text=True, timeout=120, env=_env())
    assert listed.returncode == 0 and runs.uid[0][:8] in listed.stdout and "completed" in listed.stdout
    state, text = get_run_db().get_log(runs.uid[0])
    assert state == "completed"
    # (the Kafka client logs there too; and stdout piped is block-buffered: no order across streams)
    expected = {"training with 0.1", "WARNING:trainer:a warning from logging", "from a child process"}
    assert expected <= set(text.splitlines())


def test_the_console_log_holds_the_traceback_and_can_be_turned_off(home: Path, tmp_path: Path) -> None:
    script = _script(tmp_path, """
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('job')
        print('before the failure')
        raise RuntimeError('the failure')
    """)
    assert _run(script).returncode == 1
    uid = _runs().uid[0]
    state, text = get_run_db().get_log(uid)
    lines = text.splitlines()  # stdout piped is block-buffered: it may reach its fd after stderr
    assert state == "error" and "before the failure" in lines
    assert lines[lines.index("Traceback (most recent call last):") + 3] == "RuntimeError: the failure"

    script.write_text("from engine import get_or_create_ctx\nget_or_create_ctx('quiet')\nprint('not kept')\n")
    done = _run(script, RUNBUS_CAPTURE_CONSOLE="0")
    assert done.returncode == 0 and "not kept" in done.stdout
    quiet = get_run_db().sql("SELECT uid FROM runs WHERE name = 'quiet'").uid[0]
    assert get_run_db().get_log(quiet) == ("completed", "")


@pytest.mark.parametrize(("body", "state", "error"), [
    # the run open at interpreter exit
    ("ctx = get_or_create_ctx('job')\nctx.log_result('x', 1)", "completed", None),
    ("ctx = get_or_create_ctx('job')\nsys.exit(0)", "completed", None),
    ("ctx = get_or_create_ctx('job')\nsys.exit(3)", "error", "exited with 3"),
    ("ctx = get_or_create_ctx('job')\n1 / 0", "error", "ZeroDivisionError: division by zero"),
    # the with form
    ("with get_or_create_ctx('job') as ctx:\n    ctx.log_result('x', 1)", "completed", None),
    ("with start_run('job') as ctx:\n    sys.exit(0)", "completed", None),
    ("with start_run('job') as ctx:\n    sys.exit(3)", "error", "SystemExit: 3"),
    ("with start_run('job') as ctx:\n    raise ValueError('bad lr')", "error", "ValueError: bad lr"),
    ("with start_run('job') as ctx:\n    raise KeyboardInterrupt", "aborted", "KeyboardInterrupt"),
])
def test_how_the_script_ends_decides_the_state(home: Path, tmp_path: Path, body: str, state: str,
                                               error: str | None) -> None:
    done = _run(_script(tmp_path, "import sys\nfrom engine import get_or_create_ctx, start_run\n" + body))
    assert done.returncode != 0 or state == "completed"
    runs = _runs()
    assert runs.state.tolist() == [state], done.stderr
    if error is None:
        assert runs.error.isna().all()
    else:
        assert error in runs.error[0]
    if "Error" in (error or ""):
        assert "Traceback" in runs.traceback[0] and error in runs.traceback[0]


def test_the_with_form_ends_its_run_and_a_later_call_starts_another(home: Path, tmp_path: Path) -> None:
    done = _run(_script(tmp_path, """
        from engine import get_or_create_ctx, start_run
        for lr in (0.1, 0.2):
            with start_run('sweep-by-hand', params={'lr': lr}) as ctx:
                with get_or_create_ctx('nested') as inner:  # the open run; the outer block ends it
                    assert inner is ctx
                ctx.log_result('lr_seen', ctx.get_param('lr'))
    """))
    assert done.returncode == 0, done.stderr
    runs = _runs()
    assert runs.state.tolist() == ["completed", "completed"]
    assert [get_run_db().read_run(uid)["results"]["lr_seen"] for uid in runs.uid] == [0.1, 0.2]


@pytest.mark.parametrize("with_form", [False, True])
def test_ctrl_c_aborts_the_run(home: Path, tmp_path: Path, with_form: bool) -> None:
    ready = tmp_path / "ready"
    body = f"ctx = get_or_create_ctx('job')\nopen({str(ready)!r}, 'w').close()\ntime.sleep(600)\n"
    if with_form:
        body = "with get_or_create_ctx('job') as ctx:\n" + textwrap.indent(body.split("\n", 1)[1], "    ")
    process = subprocess.Popen([sys.executable, str(_script(tmp_path, "import time\nfrom engine import "
                                                                      "get_or_create_ctx\n" + body))],
                               env=_env(), stderr=subprocess.DEVNULL)
    wait_until(ready.exists, "the script opened its run")
    process.send_signal(signal.SIGINT)
    assert process.wait(60) != 0
    runs = _runs()
    assert runs.state.tolist() == ["aborted"]
    assert "KeyboardInterrupt" in runs.error[0]


def test_sigterm_aborts_the_run_and_the_script_still_dies_by_it(home: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = _script(tmp_path, f"""
        import time
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('job')
        open({str(ready)!r}, 'w').close()
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, str(script)], env=_env(), stderr=subprocess.PIPE)
    wait_until(ready.exists, "the script opened its run")
    process.terminate()
    assert process.wait(60) == -signal.SIGTERM
    assert b"Traceback" not in process.stderr.read()
    runs = _runs()
    assert runs.state.tolist() == ["aborted"] and "terminated by SIGTERM" in runs.error[0]


def test_a_script_with_its_own_sigterm_handler_keeps_it(home: Path, tmp_path: Path) -> None:
    done = _run(_script(tmp_path, """
        import os, signal
        from engine import get_or_create_ctx
        signal.signal(signal.SIGTERM, lambda *_: print('my handler'))
        ctx = get_or_create_ctx('job')
        os.kill(os.getpid(), signal.SIGTERM)
        ctx.log_result('after', 1)
    """))
    assert done.returncode == 0, done.stderr
    assert "my handler" in done.stdout
    assert _runs().state.tolist() == ["completed"]


def test_kill_9_leaves_the_run_lost(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_HEARTBEAT_INTERVAL", "0.2")
    ready = tmp_path / "ready"
    script = _script(tmp_path, f"""
        import time
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('job')
        ctx.log_result('step', 1)
        ctx.flush_events()
        open({str(ready)!r}, 'w').close()
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, str(script)], env=_env())
    wait_until(ready.exists, "the script logged")
    assert _runs().state.tolist() == ["running"]
    process.kill()
    process.wait(60)
    wait_until(lambda: _runs().state.tolist() == ["lost"], "the silent run reads lost")


def test_a_run_name_is_checked_as_mlrun_does_before_anything_starts(home: Path) -> None:
    from engine import get_or_create_ctx

    with pytest.raises(ValueError, match="name 'team/train' must not contain '/'"):
        get_or_create_ctx("team/train")
    assert get_run_db().sql("SELECT count(*) AS n FROM events").n[0] == 0


@pytest.mark.parametrize("call", [
    "get_or_create_ctx('train', params={'lr': 0.1}, labels={'team': 'vision'})",
    "get_or_create_ctx('', spec={'metadata': {'name': 'train', 'labels': {'team': 'vision'}},"
    " 'spec': {'parameters': {'lr': 0.1}}})",  # MLRun's run dict
    "start_run('train', params={'lr': 0.1}, labels={'team': 'vision'})",
])
def test_params_and_labels_given_at_the_call(home: Path, tmp_path: Path, call: str) -> None:
    done = _run(_script(tmp_path, f"from engine import get_or_create_ctx, start_run\nctx = {call}\n"
                                  "ctx.log_result('lr_seen', ctx.parameters['lr'])\n"))
    assert done.returncode == 0, done.stderr
    record = get_run_db().read_run(_runs().uid[0])
    assert (record["name"], record["params"], record["results"]) == ("train", {"lr": 0.1}, {"lr_seen": 0.1})
    assert record["labels"]["team"] == "vision"
