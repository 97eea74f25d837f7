"""fd-level console capture of script-level runs goes through a relay process (producers/relay.py):
the script's own stdout and stderr stay exactly what they are without capture, even when the script
crashes, is killed or leaves children running; the run's log holds everything printed before its end.
Each test runs a real script as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from engine import get_run_db
from tests.support.polling import wait_until
from tests.support.scripts import script_env, write_script

# stdout and stderr interleaved, unbuffered, from Python, raw fd writes and a child process
INTERLEAVED = """
    import os, subprocess, sys
    from engine import get_or_create_ctx
    ctx = get_or_create_ctx('order')
    for i in range(300):
        print('out', i)
        print('err', i, file=sys.stderr)
        if i % 50 == 0:
            os.write(2, b'raw err %d\\n' % i)
            subprocess.run([sys.executable, '-c', f'import sys; print("child out {i}"); '
                            f'print("child err {i}", file=sys.stderr)'], check=True)
"""


def _run_into(script: Path, output: Path, **extra: str) -> int:
    """Run `script` as `python script > output 2>&1`; its exit code (the relay may still be writing)."""
    with output.open("wb") as file:
        return subprocess.run([sys.executable, str(script)], stdout=file, stderr=subprocess.STDOUT, timeout=120,
                              cwd=script.parent, env=script_env(**extra)).returncode


def _lines_in(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def _only_run() -> tuple[str, str]:
    runs = get_run_db().sql("SELECT uid, state FROM runs")
    assert len(runs) == 1, runs
    return runs.uid[0], runs.state[0]


def test_output_into_one_file_is_byte_identical_to_the_uncaptured_run(home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, INTERLEAVED)
    assert _run_into(script, tmp_path / "plain", RUNBUS_CAPTURE_CONSOLE="0", PYTHONUNBUFFERED="1") == 0
    assert _run_into(script, tmp_path / "captured", PYTHONUNBUFFERED="1") == 0
    expected = (tmp_path / "plain").read_bytes()
    assert b"out 299\nerr 299\n" in expected
    wait_until(lambda: len((tmp_path / "captured").read_bytes()) >= len(expected), "the relay wrote everything")
    assert (tmp_path / "captured").read_bytes() == expected
    # one pipe for both: the run's log has the program's exact order, as the stream "console"
    uid = get_run_db().sql("SELECT DISTINCT uid FROM logs").uid[0]  # the uncaptured run has none
    logged = get_run_db().sql("SELECT stream, text FROM logs WHERE uid = ? ORDER BY line_no", [uid])
    assert set(logged.stream) == {"console"}
    assert "\n".join(logged.text) + "\n" == expected.decode()


def test_a_segfault_s_fatal_error_reaches_the_file(home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import ctypes, faulthandler
        faulthandler.enable()
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('segv')
        print('last words before the crash', flush=True)
        ctypes.string_at(0)
    """)
    output = tmp_path / "out"
    assert _run_into(script, output) == -signal.SIGSEGV
    text = wait_until(lambda: "Fatal Python error" in output.read_text() and output.read_text(),
                      "the fatal error in the file")
    assert "last words before the crash" in text
    assert "Fatal Python error: Segmentation fault" in text
    assert 'File "' + str(script) + '"' in text  # faulthandler's traceback, whole


def test_everything_printed_before_a_kill_9_reaches_the_file(home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import os, sys
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('k9')
        for i in range(2000):
            print('line', i)
        sys.stdout.flush()
        os.kill(os.getpid(), 9)
    """)
    output = tmp_path / "out"
    assert _run_into(script, output) == -signal.SIGKILL
    wait_until(lambda: "line 1999" in output.read_text(), "the last line in the file")
    assert _lines_in(output) == [f"line {i}" for i in range(2000)]


def test_a_child_left_running_keeps_printing_after_the_script_exited(home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ticks"
    script = write_script(tmp_path, f"""
        import subprocess, sys
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('daemon')
        child = ("import pathlib, time\\n"
                 "for i in range(8):\\n"
                 "    time.sleep(0.5); print('tick', i, flush=True); pathlib.Path({str(marker)!r}).write_text(str(i))")
        subprocess.Popen([sys.executable, '-c', child])
        print('launched', flush=True)
    """)
    output = tmp_path / "out"
    assert _run_into(script, output) == 0
    wait_until(lambda: marker.exists() and marker.read_text() == "7", "the child printed its last tick", 60)
    wait_until(lambda: "tick 7" in output.read_text(), "the last tick in the file")
    assert _lines_in(output) == ["launched"] + [f"tick {i}" for i in range(8)]
    uid, state = _only_run()
    assert state == "completed"
    assert "launched" in get_run_db().get_log(uid)[1].splitlines()


def test_the_log_holds_everything_printed_before_the_run_ended(home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import os, subprocess, sys, threading
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('everything')
        # a child that holds the pipe past the run's end must not delay or cut the log
        subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3)'])
        subprocess.run([sys.executable, '-c', 'print("from a child", flush=True)'], check=True)
        thread = threading.Thread(target=lambda: print('from a thread', file=sys.stderr))
        thread.start(); thread.join()
        for i in range(5000):  # right before the end: the relay still holds much of it then
            print('print', i)
        os.write(1, b'raw line\\n')
        print('the last line, no line break', end='')
    """)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=script_env())
    assert done.returncode == 0, done.stderr
    uid, state = _only_run()
    assert state == "completed"
    logged = get_run_db().sql("SELECT stream, text FROM logs WHERE uid = ? ORDER BY line_no", [uid])
    lines = list(zip(logged.stream, logged.text, strict=True))
    stdout = [text for stream, text in lines if stream == "stdout"]
    assert stdout == ["from a child"] + [f"print {i}" for i in range(5000)] + ["raw line",
                                                                              "the last line, no line break"]
    assert ("stderr", "from a thread") in lines
    assert done.stdout.splitlines() == stdout


def test_ctrl_c_to_the_script_s_process_group_leaves_its_output_whole(home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import os, signal, time
        from engine import get_or_create_ctx
        ctx = get_or_create_ctx('interrupted')
        for i in range(3000):
            print('line', i)
        print('interrupting', flush=True)
        os.killpg(os.getpgrp(), signal.SIGINT)  # as Ctrl-C does: the whole foreground group
        time.sleep(60)
    """)
    output = tmp_path / "out"
    with output.open("wb") as file:
        process = subprocess.run([sys.executable, str(script)], stdout=file, stderr=subprocess.STDOUT,
                                 timeout=120, cwd=tmp_path, env=script_env(), start_new_session=True)
    assert process.returncode != 0
    wait_until(lambda: "KeyboardInterrupt" in output.read_text(), "the traceback in the file")
    lines = _lines_in(output)
    assert lines[:3001] == [f"line {i}" for i in range(3000)] + ["interrupting"]
    uid, state = _only_run()
    assert state == "aborted"
    assert "line 2999" in get_run_db().get_log(uid)[1].splitlines()


def test_a_terminal_gets_the_program_s_exact_order(home: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, INTERLEAVED)
    controller, terminal = os.openpty()
    try:
        process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.DEVNULL, stdout=terminal,
                                   stderr=terminal, cwd=tmp_path, env=script_env(PYTHONUNBUFFERED="1"))
    finally:
        os.close(terminal)
    shown = b""
    while True:  # until every writer (the script, the relay) closed the terminal
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: no writer left
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert process.wait(60) == 0
    lines = shown.decode().replace("\r\n", "\n").splitlines()
    assert [line for line in lines if line.startswith(("out ", "err "))] == [
        f"{stream} {i}" for i in range(300) for stream in ("out", "err")]
    uid, _ = _only_run()
    logged = get_run_db().sql("SELECT stream, text FROM logs WHERE uid = ? ORDER BY line_no", [uid])
    assert set(logged.stream) == {"console"}
    assert list(logged.text) == lines
