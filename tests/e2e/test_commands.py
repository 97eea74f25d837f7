"""Commands as functions: a script run in a subprocess as one run (engine.runtimes.command)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine import get_run_db
from engine.api import session
from engine.runspec import RunSpec
from engine.runtimes.command import command_argv, run_command
from engine.settings import load_settings
from tests.support.polling import wait_until
from tests.support.scripts import write_script

ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the child scripts import engine


def _spec(params: dict | None = None, secrets: dict | None = None, name: str = "cmd") -> RunSpec:
    return RunSpec(load_settings(), None, "job.py", name, "default", params=params or {}, secrets=secrets or {})


def _row(uid: str):
    return get_run_db().sql("SELECT * FROM runs WHERE uid = ?", [uid]).iloc[0]


def test_argv_is_templated_from_params_and_a_py_file_runs_with_this_python() -> None:
    argv = command_argv("train.py --lr {lr} --layers={layers} '{not a param}'", ["--tag", "{name}"],
                        {"lr": 0.1, "layers": [1, 2], "name": "x"})
    assert argv == [sys.executable, "train.py", "--lr", "0.1", "--layers=[1, 2]", "{not a param}", "--tag", "x"]
    assert command_argv("echo {a}", None, {"a": "b c"}) == ["echo", "b c"]


def test_a_placeholder_without_a_param_is_refused_before_any_run_starts(home: Path) -> None:
    with pytest.raises(ValueError, match=r"placeholder \{lr\} has no param 'lr'"):
        run_command(session().services, "train.py --lr {lr}", None, _spec({"other": 1}))
    assert get_run_db().sql("SELECT count(*) AS n FROM events").n[0] == 0


def test_the_scripts_own_context_logs_into_the_launchers_run(bus_home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import sys
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('a name the launcher overrides', params={'epochs': 3})
        ctx.log_result('argv', sys.argv[1:])
        ctx.log_result('lr_seen', ctx.get_param('lr'))
        ctx.log_metric('loss', 0.25, step=1)
        ctx.set_label('from', 'child')
    """)
    context = run_command(session().services, f"{script} --lr {{lr}}", ["--seed", "7"],
                          _spec({"lr": 0.01}, name="train"))

    assert context.state == "completed"
    db = get_run_db()
    runs = db.sql("SELECT uid, name, state, runtime FROM runs")
    assert runs.to_dict("records") == [{"uid": context.uid, "name": "train", "state": "completed",
                                        "runtime": "command"}]
    record = db.read_run(context.uid)
    assert record["results"] == {"argv": ["--lr", "0.01", "--seed", "7"], "lr_seen": 0.01}
    assert record["params"] == {"lr": 0.01, "epochs": 3}
    assert record["labels"]["from"] == "child"
    assert db.sql("SELECT value FROM metrics WHERE uid = ?", [context.uid]).value.tolist() == [0.25]
    # only the launcher ends the run: one run_finished, on the stream of its run_started
    ends = db.sql("SELECT stream FROM events WHERE type = 'run_finished'").stream.tolist()
    assert ends == db.sql("SELECT stream FROM events WHERE type = 'run_started'").stream.tolist()
    assert not list((bus_home / "handover").iterdir())  # the file holding the run's secrets is gone


@pytest.mark.parametrize(("body", "state", "error"), [
    ("print('fine')", "completed", None),
    ("import sys; sys.exit(0)", "completed", None),
    ("import sys; print('bad input', file=sys.stderr); sys.exit(3)", "error", "command exited with code 3\nbad input"),
    ("raise RuntimeError('boom')", "error", "RuntimeError: boom"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "error", "command was killed by SIGKILL"),
])
def test_the_exit_code_decides_the_state(home: Path, tmp_path: Path, body: str, state: str,
                                         error: str | None) -> None:
    script = write_script(tmp_path, body)
    context = run_command(session().services, str(script), None, _spec())
    row = _row(context.uid)
    assert (context.state, row.state) == (state, state)
    if error is None:
        assert row.error is None or row.error != row.error  # NULL reads as None or NaN
    else:
        assert error in row.error


def test_the_error_masks_the_runs_secrets_in_the_commands_stderr(home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import sys
        from engine import get_or_create_ctx
        print('login failed with', get_or_create_ctx('job').get_secret('TOKEN'), file=sys.stderr)
        sys.exit(1)
    """)
    context = run_command(session().services, str(script), None, _spec(secrets={"TOKEN": "hunter2-secret"}))
    assert context.state == "error"
    assert "login failed with ***" in _row(context.uid).error
    assert "hunter2" not in get_run_db().sql("SELECT string_agg(payload, '') AS p FROM events").p[0]


def test_the_commands_output_is_kept_in_the_runs_log(bus_home: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    script = write_script(tmp_path, """
        import subprocess, sys
        print('epoch 1')
        print('a warning', file=sys.stderr)
        subprocess.run([sys.executable, '-c', 'print("from its own child")'], check=True)
        print('no newline at the end', end='')
    """)
    context = run_command(session().services, str(script), None, _spec())
    state, text = get_run_db().get_log(context.uid)
    assert state == "completed"
    assert sorted(text.splitlines()) == sorted(["epoch 1", "a warning", "from its own child",
                                                "no newline at the end"])
    streams = get_run_db().sql("SELECT stream, text FROM logs WHERE uid = ? ORDER BY line_no", [context.uid])
    assert dict(zip(streams.text, streams.stream, strict=True))["a warning"] == "stderr"

    monkeypatch.setenv("RUNBUS_CAPTURE_CONSOLE", "0")
    quiet = run_command(session().services, str(script), None,
                        RunSpec(load_settings(), None, "job.py", "quiet", "default"))
    assert get_run_db().get_log(quiet.uid) == ("completed", "")


def test_the_commands_output_reaches_the_launchers_terminal(home: Path, tmp_path: Path) -> None:
    child = write_script(tmp_path, "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\n")
    launcher = write_script(tmp_path, f"""
        from engine.api import session
        from engine.runspec import RunSpec
        from engine.runtimes.command import run_command
        from engine.settings import load_settings
        run_command(session().services, {str(child)!r}, None,
                    RunSpec(load_settings(), None, 'child.py', 'echo', 'default'))
    """, "launcher.py")
    done = subprocess.run([sys.executable, str(launcher)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "to stdout" in done.stdout and "to stderr" in done.stderr


def test_ctrl_c_in_the_launcher_stops_the_command_and_records_aborted(home: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    child = write_script(tmp_path, f"""
        import os, time
        open({str(pid_file)!r}, 'w').write(str(os.getpid()))
        time.sleep(600)
    """)
    launcher = write_script(tmp_path, f"""
        from engine.api import session
        from engine.runspec import RunSpec
        from engine.runtimes.command import run_command
        from engine.settings import load_settings
        run_command(session().services, {str(child)!r}, None,
                    RunSpec(load_settings(), None, 'child.py', 'sleeper', 'default'))
    """, "launcher.py")
    process = subprocess.Popen([sys.executable, str(launcher)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), "the command started")
    child_pid = int(pid_file.read_text())
    process.send_signal(signal.SIGINT)  # the launcher only, as when its own process group is not the terminal's
    assert process.wait(60) != 0
    assert get_run_db().sql("SELECT state FROM runs").state.tolist() == ["aborted"]
    assert not _alive(child_pid)


def test_runbus_run_runs_a_script_file_as_a_command(home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import sys
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('ignored')
        ctx.log_result('args', sys.argv[1:])
        print('p is', ctx.get_param('p'))
    """)
    done = subprocess.run([RUNBUS, "run", str(script), "--param", "p=5", "--", "--flag", "x"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "p is 5" in done.stdout
    record = get_run_db().read_run(get_run_db().sql("SELECT uid FROM runs").uid[0])
    assert (record["name"], record["state"], record["params"]) == ("job", "completed", {"p": 5})
    assert record["results"] == {"args": ["--flag", "x"]}

    failed = subprocess.run([RUNBUS, "run", str(write_script(tmp_path, "raise SystemExit(4)", "bad.py"))],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert failed.returncode == 1
    assert "command exited with code 4" in failed.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_runbus_run_stops_the_script_and_records_aborted(home: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    child = write_script(tmp_path, f"""
        import os, time
        open({str(pid_file)!r}, 'w').write(str(os.getpid()))
        time.sleep(600)
    """)
    process = subprocess.Popen([RUNBUS, "run", str(child)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), "the script started")
    child_pid = int(pid_file.read_text())
    process.terminate()  # as Slurm or Kubernetes stop a job
    assert process.wait(60) == 128 + signal.SIGTERM
    assert "terminated by SIGTERM" in process.stderr.read()
    row = get_run_db().sql("SELECT state, error FROM runs").iloc[0]
    assert row.state == "aborted" and "terminated by SIGTERM" in row.error
    assert not _alive(child_pid)


def test_a_secret_in_the_command_line_is_masked_wherever_the_command_is_recorded(home: Path, tmp_path: Path) -> None:
    from engine import new_function, new_task

    script = write_script(tmp_path, "import sys\nprint('got', len(sys.argv[1]), 'characters')\n")
    run = new_function(command=f"{script} s3cr3t-value").run(
        new_task(name="seccmd").with_secrets("inline", {"PASSWORD": "s3cr3t-value"}))
    assert run.state == "completed"
    row = _row(run.uid)
    assert row.handler == f"{script} ***"
    payloads = get_run_db().sql("SELECT string_agg(payload, '') AS p FROM events").p[0]
    assert "s3cr3t" not in payloads and "***" in payloads


def test_runbus_run_prints_the_run_as_the_log_holds_it(home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('train')
        ctx.log_result('epochs_seen', ctx.get_param('epochs', 3))  # a param the script itself adds
    """, "train.py")
    done = subprocess.run([RUNBUS, "run", str(script), "--param", "lr=0.1"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert '{"epochs_seen": 3}' in done.stdout
    assert '"epochs": 3' in done.stdout and '"lr": 0.1' in done.stdout
