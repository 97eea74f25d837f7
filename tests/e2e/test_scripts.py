"""Script-level runs: a plain Python script opens its own run (engine.script), run as a real process."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine import get_run_db
from tests.support.polling import wait_until
from tests.support.scripts import script_env, write_script

RUNBUS = str(Path(sys.executable).parent / "runbus")


def _run(script: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=script.parent, env=script_env(**extra))


def _runs():
    return get_run_db().sql("SELECT uid, name, state, error, traceback, runtime FROM runs ORDER BY started_at")


def test_a_script_whose_only_runbus_line_is_get_or_create_ctx_is_a_run(bus_home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
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
    listed = subprocess.run([RUNBUS, "runs"], capture_output=True, text=True, timeout=120, env=script_env())
    assert listed.returncode == 0 and runs.uid[0][:8] in listed.stdout and "completed" in listed.stdout
    state, text = get_run_db().get_log(runs.uid[0])
    assert state == "completed"
    # (the Kafka client logs there too; and stdout piped is block-buffered: no order across streams)
    expected = {"training with 0.1", "WARNING:trainer:a warning from logging", "from a child process"}
    assert expected <= set(text.splitlines())


def test_the_console_log_holds_the_traceback_and_can_be_turned_off(home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
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
    ("ctx = get_or_create_ctx('job')\nexit(3)", "error", "exited with 3"),  # the builtins site adds
    ("ctx = get_or_create_ctx('job')\nquit(3)", "error", "exited with 3"),
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
    done = _run(write_script(tmp_path, "import sys\nfrom engine import get_or_create_ctx, start_run\n" + body))
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
    done = _run(write_script(tmp_path, """
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
    process = subprocess.Popen([sys.executable, str(write_script(tmp_path, "import time\nfrom engine import "
                                                                      "get_or_create_ctx\n" + body))],
                               env=script_env(), stderr=subprocess.DEVNULL)
    wait_until(ready.exists, "the script opened its run")
    process.send_signal(signal.SIGINT)
    assert process.wait(60) != 0
    runs = _runs()
    assert runs.state.tolist() == ["aborted"]
    assert "KeyboardInterrupt" in runs.error[0]


def test_sigterm_aborts_the_run_and_the_script_still_dies_by_it(home: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = write_script(tmp_path, f"""
        import time
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('job')
        open({str(ready)!r}, 'w').close()
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, str(script)], env=script_env(), stderr=subprocess.PIPE)
    wait_until(ready.exists, "the script opened its run")
    process.terminate()
    assert process.wait(60) == -signal.SIGTERM
    assert b"Traceback" not in process.stderr.read()
    runs = _runs()
    assert runs.state.tolist() == ["aborted"] and "terminated by SIGTERM" in runs.error[0]


def test_a_script_with_its_own_sigterm_handler_keeps_it(home: Path, tmp_path: Path) -> None:
    done = _run(write_script(tmp_path, """
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
    # lost after 3 s of silence: a loaded machine can stall the live script's heartbeat for longer than 0.6 s
    monkeypatch.setenv("RUNBUS_HEARTBEAT_INTERVAL", "1")
    ready = tmp_path / "ready"
    script = write_script(tmp_path, f"""
        import time
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('job')
        ctx.log_result('step', 1)
        ctx.flush_events()
        open({str(ready)!r}, 'w').close()
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, str(script)], env=script_env())
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
    done = _run(write_script(tmp_path, f"from engine import get_or_create_ctx, start_run\nctx = {call}\n"
                                  "ctx.log_result('lr_seen', ctx.parameters['lr'])\n"))
    assert done.returncode == 0, done.stderr
    record = get_run_db().read_run(_runs().uid[0])
    assert (record["name"], record["params"], record["results"]) == ("train", {"lr": 0.1}, {"lr_seen": 0.1})
    assert record["labels"]["team"] == "vision"


def _events(kind: str):
    return get_run_db().sql("SELECT run_uid, stream FROM events WHERE type = ?", [kind])


def test_a_forked_child_joins_the_run_and_never_ends_it(bus_home: Path, tmp_path: Path) -> None:
    done = _run(write_script(tmp_path, """
        import os, sys
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('rawfork')
        pid = os.fork()
        if pid == 0:  # a forked worker that logs through the context it inherited and ends normally
            ctx.log_metric('from_child', 7, step=1)
            sys.exit(0)
        os.waitpid(pid, 0)
        ctx.log_result('parent_result', 42)  # the run is still the parent's to log into and to end
    """), RUNBUS_FLUSH_TIMEOUT="5")
    assert done.returncode == 0, done.stderr
    runs = _runs()
    assert runs.state.tolist() == ["completed"], done.stderr
    assert get_run_db().read_run(runs.uid[0])["results"] == {"parent_result": 42}
    metrics = get_run_db().sql("SELECT key, value FROM metrics").to_dict("records")
    assert metrics == [{"key": "from_child", "value": 7.0}]
    # the child wrote on a stream of its own; only the stream of run_started ended the run
    assert _events("run_finished").stream.tolist() == _events("run_started").stream.tolist()
    assert _events("metric").stream[0] != _events("run_started").stream[0]


def test_fork_pool_workers_log_into_the_run(bus_home: Path, tmp_path: Path) -> None:
    done = _run(write_script(tmp_path, """
        import multiprocessing as mp
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('mp')
        def square(x):
            ctx.log_metric('square', x * x, step=x)
            return x * x
        if __name__ == '__main__':
            with mp.get_context('fork').Pool(2) as pool:  # leaving the block terminates the workers
                assert pool.map(square, range(4)) == [0, 1, 4, 9]
            ctx.log_result('after_pool', 1)
    """))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert _runs().state.tolist() == ["completed"]
    metrics = get_run_db().sql("SELECT step, value FROM metrics ORDER BY step")
    assert metrics.value.tolist() == [0.0, 1.0, 4.0, 9.0]


def test_spawned_workers_and_child_scripts_join_the_scripts_run(bus_home: Path, tmp_path: Path) -> None:
    write_script(tmp_path, """
        from engine import get_or_create_ctx
        get_or_create_ctx('child').log_result('from_child_script', 1)
    """, "child.py")
    done = _run(write_script(tmp_path, """
        import multiprocessing as mp, subprocess, sys
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('train')  # a spawn worker runs this again as it imports the script
        def square(x):
            ctx.log_metric('square', x * x, step=x)
            return x * x
        if __name__ == '__main__':
            with mp.get_context('spawn').Pool(2) as pool:
                assert pool.map(square, range(4)) == [0, 1, 4, 9]
            subprocess.run([sys.executable, 'child.py'], check=True)
            ctx.log_result('done', 1)
    """))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr  # the pool's SIGTERM ends its workers quietly
    runs = _runs()
    assert runs[["name", "state"]].to_dict("records") == [{"name": "train", "state": "completed"}]
    assert get_run_db().read_run(runs.uid[0])["results"] == {"from_child_script": 1, "done": 1}
    assert get_run_db().sql("SELECT value FROM metrics ORDER BY step").value.tolist() == [0.0, 1.0, 4.0, 9.0]
    assert len(_events("run_finished")) == 1
    assert not list((bus_home / "handover").iterdir())  # the run's handover went with it


def test_run_started_is_on_the_bus_when_get_or_create_ctx_returns(home: Path, tmp_path: Path) -> None:
    done = _run(write_script(tmp_path, "import os\nfrom engine import get_or_create_ctx\n"
                                  "get_or_create_ctx('job')\nos._exit(0)\n"))
    assert done.returncode == 0, done.stderr
    assert _runs().name.tolist() == ["job"]  # running until its silence reads lost


def _handover_record(uid: str) -> str:
    return json.dumps({"uid": uid, "name": "victim", "project": "default", "handler": "x.py", "runtime": "command",
                       "params": {}, "inputs": {}, "input_digests": {}, "secrets": {}, "labels": {},
                       "parent_uid": None, "iteration": 0, "code_ref": None})


@pytest.mark.parametrize("case", ["group_readable", "outside_the_folder", "symlink_out_of_the_folder",
                                  "folder_open_to_others"])
def test_a_handover_is_trusted_only_from_the_users_private_folder(home: Path, tmp_path: Path, case: str) -> None:
    folder = home / "handover"
    folder.mkdir(parents=True, mode=0o700)
    outside = tmp_path / "evil.json"
    outside.write_text(_handover_record("a" * 32))
    outside.chmod(0o600)
    handover = folder / "run-evil.json"
    if case == "group_readable":
        handover.write_text(_handover_record("a" * 32))
        handover.chmod(0o644)
    elif case == "outside_the_folder":
        handover = outside
    elif case == "symlink_out_of_the_folder":
        handover.symlink_to(outside)
    else:
        handover.write_text(_handover_record("a" * 32))
        handover.chmod(0o600)
        folder.chmod(0o755)
    done = _run(write_script(tmp_path, "from engine import get_or_create_ctx\n"
                                  "get_or_create_ctx('job').set_label('owner', 'attacker')\n"),
                RUNBUS_RUN_HANDOVER=str(handover))
    assert done.returncode != 0
    assert "RUNBUS_RUN_HANDOVER" in done.stderr or "handover folder" in done.stderr
    assert get_run_db().sql("SELECT count(*) AS n FROM events").n[0] == 0


def test_a_handover_whose_launcher_has_ended_warns_and_the_script_runs_its_own(home: Path, tmp_path: Path) -> None:
    folder = home / "handover"
    folder.mkdir(parents=True, mode=0o755)  # made under someone's umask: a run that hands over makes it private
    script = write_script(tmp_path, "from engine import get_or_create_ctx\n"
                                    "get_or_create_ctx('late').log_result('x', 1)\n")
    first = _run(script)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    done = _run(script, RUNBUS_RUN_HANDOVER=str(folder / "run-gone.json"))
    assert done.returncode == 0, done.stderr
    assert "run-gone.json" in done.stderr and "no longer exists" in done.stderr
    runs = _runs()
    assert runs[["name", "state"]].to_dict("records") == [{"name": "late", "state": "completed"}] * 2
