"""Console capture: a run's stdout and stderr (print, logging, warnings, child processes) become
`log` events, with bounded memory, masked secrets and one run's lines per thread.

Process-wide behaviour (fd-level capture, logging configuration, memory) is tested in real Python
subprocesses; thread routing in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import close_session, session
from engine.runspec import RunSpec
from engine.settings import load_settings
from producers.console import LINE_CONTINUES, LINE_MAX_CHARS, RunOutput, capture_console
from producers.redact import Redactor

ROOT = Path(__file__).resolve().parents[2]

# Starts a run (secret TOKEN) and writes its uid to argv[1]; the test's body follows, with `ctx`.
PROLOGUE = """
import sys
from engine.api import close_session, session
from engine.runspec import RunSpec
from engine.settings import load_settings
spec = RunSpec(load_settings(), None, "test", "console", "default", secrets={"TOKEN": "hunter2-secret"})
ctx = spec.new_context(session().services)
ctx.start()
open(sys.argv[1], "w").write(ctx.uid)
"""


def _run_script(tmp_path: Path, body: str, **env: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Run PROLOGUE + body in a fresh interpreter; (the run's uid, the finished process)."""
    script = tmp_path / "job.py"
    script.write_text(PROLOGUE + textwrap.dedent(body))
    uid_file = tmp_path / "uid"
    done = subprocess.run([sys.executable, str(script), str(uid_file)], capture_output=True, text=True,
                          errors="replace", timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr
    return uid_file.read_text(), done


def _lines(uid: str) -> list[tuple[str, str]]:
    """(stream, text) of every line of the run's log, in order."""
    frame = get_run_db().sql("SELECT stream, text FROM logs WHERE uid = ? ORDER BY line_no", [uid])
    return list(zip(frame.stream, frame.text, strict=True))


def _texts(uid: str, stream: str | None = None) -> list[str]:
    return [text for s, text in _lines(uid) if stream is None or s == stream]


def test_print_logging_and_warnings_reach_the_run_and_the_terminal(bus_home: Path, tmp_path: Path) -> None:
    uid, done = _run_script(tmp_path, """
        import logging, warnings
        from producers.console import capture_console
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # bound to stderr now
        with capture_console(ctx, fd_level=False):
            print("printed line")
            logging.getLogger("job").info("logged record")
            warnings.warn("a warning")
            ctx.logger.info("context logger says %s", "hi")
        ctx.finish()
    """)
    assert _texts(uid, "stdout") == ["printed line"]
    stderr = _texts(uid, "stderr")
    assert "INFO logged record" in stderr
    assert any("UserWarning: a warning" in line for line in stderr)
    assert _texts(uid, "logger") == ["[info] context logger says hi"]
    assert not any("context logger" in line for line in stderr)  # held once, as the logger's
    assert "printed line" in done.stdout and "INFO logged record" in done.stderr
    assert "INFO context logger says hi" in done.stderr


def test_fd_level_capture_holds_a_child_process_and_raw_fd_writes(bus_home: Path, tmp_path: Path) -> None:
    uid, done = _run_script(tmp_path, """
        import os, subprocess
        from producers.console import capture_console
        with capture_console(ctx, fd_level=True):
            print("from python")
            subprocess.run(["echo", "from a child"], check=True)
            subprocess.run(["sh", "-c", "echo child error >&2"], check=True)
            os.write(1, b"raw fd write\\n")
            os.write(1, b"bad utf-8 \\xff\\xfe!\\n")
        print("after the capture")
        ctx.finish()
    """)
    assert _texts(uid, "stdout") == ["from python", "from a child", "raw fd write", "bad utf-8 \\xff\\xfe!"]
    assert _texts(uid, "stderr") == ["child error"]
    assert done.stdout.splitlines() == ["from python", "from a child", "raw fd write",
                                        "bad utf-8 \ufffd\ufffd!", "after the capture"]


def test_a_hundred_thousand_lines_are_all_kept_in_order_with_bounded_memory(bus_home: Path,
                                                                           tmp_path: Path) -> None:
    # 100,000 lines of 500 characters: 50 MB of text, far more than the bound the capture keeps
    uid, done = _run_script(tmp_path, """
        import resource
        from producers.console import capture_console
        pad = "x" * 490
        with capture_console(ctx, fd_level=False):
            print("warm-up")
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for i in range(100_000):
                print(f"{i:08d}|{pad}")
        ctx.finish()
        grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("GROWN", grown_kb, file=sys.stderr)
    """)
    grown_mb = int(done.stderr.split("GROWN")[1].split()[0]) / 1024
    assert grown_mb < 40, f"peak RSS grew by {grown_mb:.0f} MB while printing 50 MB"
    lines = _texts(uid, "stdout")
    assert lines[0] == "warm-up"
    assert [int(line.split("|")[0]) for line in lines[1:]] == list(range(100_000))
    assert all(len(line) == 499 for line in lines[1:])


def test_secrets_are_masked_even_when_written_in_pieces(bus_home: Path, tmp_path: Path) -> None:
    uid, done = _run_script(tmp_path, """
        from producers.console import capture_console
        with capture_console(ctx, fd_level=True):
            print("token: hunter2-", end="", flush=True)
            print("secret.")
            ctx.logger.warning("again hunter2-secret")
            sys.stdout.write("a long line " + "y" * 20000 + "hunter2-secret" + "z" * 100 + "\\n")
        ctx.finish()
    """)
    lines = _lines(uid)
    assert ("stdout", "token: ***.") in lines
    assert ("logger", "[warning] again ***") in lines
    assert "hunter2" not in json.dumps(lines)
    assert not get_run_db().sql("SELECT event_id FROM events WHERE contains(payload::VARCHAR, 'hunter2')").size
    assert "hunter2-secret" in done.stdout  # the terminal shows what the program wrote


def test_a_long_line_is_split_into_marked_pieces(home: Path) -> None:
    context = RunSpec(load_settings(), None, "test", "long", "default").new_context(session().services)
    context.start()
    line = "".join(chr(ord("a") + i % 26) for i in range(3 * LINE_MAX_CHARS))
    context.log_output("stdout", line[:100])
    context.log_output("stdout", line[100:] + "\nshort\n")
    context.finish()
    pieces = _texts(context.uid)
    assert pieces[-1] == "short"
    assert all(len(piece) <= LINE_MAX_CHARS for piece in pieces)
    assert all(piece.endswith(LINE_CONTINUES) for piece in pieces[:-2])
    assert "".join(piece.removesuffix(LINE_CONTINUES) for piece in pieces[:-1]) == line


def test_finish_flushes_an_unfinished_line_before_run_finished(home: Path) -> None:
    context = RunSpec(load_settings(), None, "test", "partial", "default").new_context(session().services)
    context.start()
    context.log_output("stderr", "no line break yet")
    context.log_output("stdout", "progress 10%\rprogress 50%\rprogress 100%\r\n")
    context.finish()
    types = list(get_run_db().sql("SELECT type FROM events WHERE run_uid = ? ORDER BY position",
                                  [context.uid]).type)
    assert types == ["run_started", "log", "run_finished"]
    assert _lines(context.uid) == [("stdout", "progress 100%"), ("stderr", "no line break yet")]


def test_output_after_the_run_finished_is_dropped_with_a_note(home: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    context = RunSpec(load_settings(), None, "test", "late", "default").new_context(session().services)
    context.start()
    context.finish()
    context.log_output("stdout", "too late\n")
    context.log_output("stdout", "later still\n")
    assert capfd.readouterr().err.count("console output written after its end is not logged") == 1
    assert _lines(context.uid) == []


def test_log_output_refuses_an_unknown_stream(home: Path) -> None:
    context = RunSpec(load_settings(), None, "test", "bad", "default").new_context(session().services)
    with pytest.raises(ValueError, match="'stdin'"):
        context.log_output("stdin", "x")
    with pytest.raises(TypeError, match="bytes"):
        context.log_output("stdout", b"x")  # type: ignore[arg-type]


def test_each_thread_s_output_goes_to_its_own_run(home: Path) -> None:
    spec = RunSpec(load_settings(), None, "test", "threaded", "default")
    contexts = [spec.new_context(session().services) for _ in range(2)]
    barrier = threading.Barrier(3)

    def job(index: int) -> None:
        context = contexts[index]
        context.start()
        with capture_console(context, fd_level=False):
            barrier.wait()
            for i in range(200):
                print(f"run {index} line {i}")
            barrier.wait()
        context.finish()

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    barrier.wait()
    print("from the main thread: no run")
    barrier.wait()
    for thread in threads:
        thread.join()
    for index, context in enumerate(contexts):
        assert _texts(context.uid) == [f"run {index} line {i}" for i in range(200)]
    assert sys.stdout.__class__.__name__ != "_Tee"  # restored once the last capture ended


def _chatty(context, x: int = 0) -> None:
    for step in range(40):
        print(f"x={x} step {step}")
        time.sleep(0.001)  # let the other iterations' threads print in between
    context.log_result("score", x)


def test_a_threaded_sweep_keeps_each_iteration_s_prints_in_its_own_run(home: Path) -> None:
    parent = new_function().run(NewRun(handler=_chatty), hyperparams={"x": [1, 2, 3]}, selector="max.score",
                                parallel_runs=3, quiet=True)
    children = get_run_db().list_runs(parent=parent.uid)
    assert len(children) == 3
    for uid, x in zip(children.uid, children.iteration, strict=True):
        state, text = get_run_db().get_log(uid)
        assert state == "completed"
        assert text.splitlines() == [f"x={x} step {step}" for step in range(40)]


def _prints_and_logs(context) -> None:
    print("printed")
    context.logger.info("logged")


def test_capture_is_off_with_the_setting(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on = new_function().run(NewRun(handler=_prints_and_logs, name="on")).uid
    monkeypatch.setenv("RUNBUS_CAPTURE_CONSOLE", "0")
    close_session()  # settings are read once, when the library session is built
    off = new_function().run(NewRun(handler=_prints_and_logs, name="off")).uid
    assert get_run_db().get_log(on) == ("completed", "printed\n[info] logged\n")
    # the run's own logger still writes to the run's log: it is a call on the run, not console output
    assert get_run_db().get_log(off) == ("completed", "[info] logged\n")


def test_a_dask_iteration_keeps_its_prints(home: Path) -> None:
    parent = new_function(command="dask://").run(NewRun(handler=_chatty), hyperparams={"x": [1, 2]},
                                                 selector="max.score", quiet=True)
    children = get_run_db().list_runs(parent=parent.uid)
    assert sorted(children.iteration) == [1, 2]
    for uid, x in zip(children.uid, children.iteration, strict=True):
        assert get_run_db().get_log(uid)[1].splitlines() == [f"x={x} step {step}" for step in range(40)]


def test_a_secret_across_the_cut_of_an_endless_line_is_still_masked() -> None:
    """A line that never ends is sent in pieces as it grows; a secret written across a piece's end
    must be masked whole wherever the cut falls (the offsets cover the first cut)."""
    secret = "hunter2-secret"

    class Writer:
        def every_interval(self, key: str, tick: object) -> None: ...
        def stop_interval(self, key: str) -> None: ...

    for offset in range(LINE_MAX_CHARS - 100, LINE_MAX_CHARS + 200):
        chunks: list[dict] = []
        output = RunOutput(lambda payload, ts, chars, into=chunks: into.extend(payload["chunks"]), Redactor([secret]),
                           Writer(), "key", "run")
        text = "a" * offset + secret + "b" * (2 * LINE_MAX_CHARS)
        for start in range(0, len(text), 100):  # written in small pieces, no line break
            output.write("stdout", text[start:start + 100])
            output.tick()  # as the writer's thread does between writes
        output.close()
        pieces = "\n".join(chunk["text"] for chunk in chunks).split("\n")
        assert len(pieces) > 2 and "hunter" not in "".join(pieces), offset
        assert "".join(p.removesuffix(LINE_CONTINUES) for p in pieces) == text.replace(secret, "***"), offset


def test_fd_level_capture_without_file_descriptors_falls_back_to_the_python_level(home: Path,
                                                                                 tmp_path: Path) -> None:
    """As in Jupyter, whose sys.stdout has no fileno(): the calling thread is captured."""
    uid, done = _run_script(tmp_path, """
        import io
        from producers.console import capture_console

        class NotebookStream(io.StringIO):
            def fileno(self):
                raise io.UnsupportedOperation("fileno")

        shown = sys.stdout = NotebookStream()
        with capture_console(ctx, fd_level=True):
            print("in a notebook cell")
        assert sys.stdout is shown
        ctx.finish()
        sys.__stdout__.write("SHOWN " + shown.getvalue())
    """)
    assert _texts(uid) == ["in a notebook cell"]
    assert "SHOWN in a notebook cell" in done.stdout


def test_fd_level_capture_falls_back_to_the_python_level_when_the_relay_cannot_start(home: Path,
                                                                                    tmp_path: Path) -> None:
    uid, done = _run_script(tmp_path, """
        from producers.console import capture_console
        sys.executable = "/nonexistent/python"  # the relay process is started with it
        with capture_console(ctx, fd_level=True):
            print("still captured")
        ctx.finish()
    """)
    assert _texts(uid) == ["still captured"]
    assert "console capture falls back to the Python level" in done.stderr
    assert "still captured" in done.stdout


def test_lines_of_different_streams_keep_the_order_they_were_written_in(home: Path) -> None:
    context = RunSpec(load_settings(), None, "test", "order", "default").new_context(session().services)
    context.start()
    context.log_output("stdout", "first\n")
    context.log_output("stderr", "second\n")
    context.log_output("stdout", "third\nhalf ")
    context.logger.info("fourth")
    context.log_output("stderr", "fifth\n")
    context.log_output("stdout", "a line\n")  # completed after the stderr line that came between
    context.finish()  # one batch: nothing was sent before
    assert _lines(context.uid) == [("stdout", "first"), ("stderr", "second"), ("stdout", "third"),
                                   ("logger", "[info] fourth"), ("stderr", "fifth"), ("stdout", "half a line")]
