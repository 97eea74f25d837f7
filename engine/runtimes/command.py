"""Command runtime: a script or program runs in a subprocess as one run.

The command's `{param}` placeholders take the run's params; a `.py` command runs with this
Python. The child gets the run handed over (engine.script.write_handover), so a script that calls
`get_or_create_ctx` logs into this very run. Its stdout and stderr go to this process's own and
into the run's log; its exit code decides the run's state, which only this process records.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from engine.bootstrap import Services
from engine.runspec import RunSpec
from engine.script import HANDOVER_ENV, script_code_ref, sigterm_raises, write_handover
from engine.secrets import resolve_all
from engine.task import RunTemplate
from producers.artifact_store import file_sha256
from producers.context import RunContext

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_STDERR_TAIL_LINES = 20  # of the child's stderr, in the error of a run whose command failed
_TERMINATE_GRACE_S = 10.0


def command_argv(command: str, args: Sequence[str] | None, params: Mapping[str, Any]) -> list[str]:
    """argv for `command` + `args` with each `{param}` replaced by the param's value; a `.py` file
    first runs with this Python. ValueError names a placeholder that has no param."""
    argv = [_template(token, params, command) for token in [*shlex.split(command), *(args or [])]]
    if not argv:
        raise ValueError("command is empty: name a script or program to run")
    if argv[0].endswith(".py"):
        argv.insert(0, sys.executable)
    return argv


def run_script(svc: Services, script: str, args: Sequence[str], task: RunTemplate) -> RunContext:
    """`runbus run script.py`: the script (with `args`) as a command run of `task`'s params,
    inputs, labels and secrets, named after the task or the script, recorded through `svc`."""
    inputs = {key: path if "://" in path else Path(path).resolve().as_uri() for key, path in task.inputs.items()}
    digests = {key: file_sha256(Path(path)) for key, path in task.inputs.items()
               if "://" not in path and Path(path).is_file()}
    spec = RunSpec(svc.settings, None, script, task.name or Path(script).stem, task.project or svc.settings.project,
                   params=dict(task.params), inputs=inputs, input_digests=digests,
                   secrets=resolve_all(task.secret_sources), labels=dict(task.labels))
    return run_command(svc, shlex.join([script]), list(args), spec)


def run_command(svc: Services, command: str, args: list[str] | None, spec: RunSpec) -> RunContext:
    """Run `command` (+ `args`) in a subprocess as the run `spec` describes, recorded through `svc`;
    returns the ended context.

    Exit code 0 is `completed`; another code is `error` naming it, with the last lines of the
    command's stderr; death by a signal is `error` naming the signal. Ctrl-C here terminates the
    command and records `aborted`, then is raised; so does SIGTERM (as engine.script.Terminated)
    when this process has no SIGTERM handler of its own.
    """
    argv = command_argv(command, args, spec.params)
    script = Path(argv[1]).resolve() if argv[0] == sys.executable and len(argv) > 1 else None
    code_ref = spec.code_ref
    if code_ref is None and script is not None and script.is_file():
        code_ref = script_code_ref(script, spec.handler_ref, spec.settings.home)
    spec = replace(spec, runtime="command", code_ref=code_ref, extra={**spec.extra, "command": argv})
    context = spec.new_context(svc)
    context.start()
    handover = write_handover(context, spec)
    try:
        returncode, stderr_tail = _run(argv, context, spec, handover)
    except BaseException as exc:  # Ctrl-C (the child was terminated) or a command that cannot start
        context.flush_output()
        context.finish(error=exc, state=None if isinstance(exc, Exception) else "aborted")
        if isinstance(exc, Exception):
            return context
        raise
    finally:
        handover.unlink(missing_ok=True)
    context.flush_output()
    context.finish(error=_verdict(returncode, stderr_tail))
    return context


def _run(argv: list[str], context: RunContext, spec: RunSpec, handover: Path) -> tuple[int, list[str]]:
    env = {**os.environ, HANDOVER_ENV: str(handover), "RUNBUS_HOME": str(spec.settings.home),
           "RUNBUS_BUS": spec.settings.bus_url}
    env.setdefault("PYTHONUNBUFFERED", "1")  # the run's log follows the script as it prints
    capture = spec.settings.capture_console
    tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    readers = [threading.Thread(target=_pump, args=(process.stdout, "stdout", sys.stdout, context, capture, None),
                                name="runbus-command-stdout", daemon=True),
               threading.Thread(target=_pump, args=(process.stderr, "stderr", sys.stderr, context, capture, tail),
                                name="runbus-command-stderr", daemon=True)]
    for reader in readers:
        reader.start()
    try:
        with sigterm_raises():  # a launcher stopped by SIGTERM (Slurm, Kubernetes) stops its command too
            returncode = process.wait()
    except BaseException:
        _stop(process)
        raise
    finally:
        for reader in readers:
            reader.join()
    return returncode, list(tail)


def _pump(pipe: IO[bytes] | None, stream: str, echo: IO[str], context: RunContext, capture: bool,
          tail: deque[str] | None) -> None:
    """Copy the child's `stream` to `echo` and (with `capture`) into the run, until it closes."""
    assert pipe is not None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
    log_output = context.log_output if capture else None
    partial = ""
    with pipe:
        while True:
            chunk = os.read(pipe.fileno(), 65536)
            text = decoder.decode(chunk, final=not chunk)
            if text:
                with contextlib.suppress(ValueError, OSError):  # a closed or broken terminal
                    echo.write(text)
                    echo.flush()
                if log_output is not None:
                    try:
                        log_output(stream, text)
                    except Exception as exc:  # keep reading: a child blocked on a full pipe never ends
                        log_output = None
                        print(f"runbus: the {stream} of run {context.uid} is no longer kept: {exc}",
                              file=sys.stderr)
                if tail is not None:
                    lines = (partial + text).split("\n")
                    partial = lines.pop()[-4096:]
                    tail.extend(line[-4096:] for line in lines)
            if not chunk:
                break
    if tail is not None and partial:
        tail.append(partial)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the child (SIGTERM, then SIGKILL after a grace period) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(_TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _verdict(returncode: int, stderr_tail: list[str]) -> str | None:
    """None for success, else the error to record (the run masks its secrets in it)."""
    if returncode == 0:
        return None
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        message = f"command was killed by {name}"
    else:
        message = f"command exited with code {returncode}"
    tail = "\n".join(stderr_tail).strip()
    return f"{message}\n{tail}" if tail else message


def _template(token: str, params: Mapping[str, Any], command: str) -> str:
    def value(found: re.Match[str]) -> str:
        key = found.group(1)
        if key not in params:
            raise ValueError(f"command {command!r}: placeholder {{{key}}} has no param {key!r}")
        item = params[key]
        if isinstance(item, (dict, list)):
            return json.dumps(item)
        return str(item)

    return _PLACEHOLDER.sub(value, token)
