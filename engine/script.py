"""Script-level runs: a script (cron, Slurm, a notebook, `python train.py`) opens its own run.

`get_or_create_ctx(name)` starts a run for the process (or returns the one already open); the run
ends when the script does: completed on a normal exit or `sys.exit(0)`, error on an uncaught
exception or another exit code, aborted on Ctrl-C or SIGTERM; `kill -9` leaves it silent, and its
missing heartbeats make it read `lost`. The context-manager form ends it at the end of the block.

A script launched by Runbus (`runbus run script.py`, a command function) joins the launcher's run
instead: the launcher hands the run over in a file named by RUNBUS_RUN_HANDOVER (see
`write_handover`). The script then writes that run's results, metrics and artifacts on a stream of
its own and never ends the run: the launcher does, from the exit code.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import hashlib
import json
import os
import signal
import stat
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.bootstrap import Services
from engine.loader import code_mac
from engine.runspec import RunSpec
from engine.task import check_name
from producers.console import capture_console
from producers.context import RunContext, RunFinishedError
from producers.spill import make_private_folder
from producers.writer import EventsNotWritten

HANDOVER_ENV = "RUNBUS_RUN_HANDOVER"
_HANDOVER_KEYS = ("uid", "name", "project", "handler", "runtime", "params", "inputs", "input_digests",
                  "secrets", "labels", "parent_uid", "iteration", "code_ref")


class Terminated(BaseException):
    """SIGTERM reached a script whose run Runbus tracks (raised in the main thread)."""


class ScriptContext(RunContext):
    """A RunContext that is also a context manager and knows whether this process owns its run.

    `owns_run` is False for a script that joined the run of the Runbus process that launched it,
    and in a process forked from the owner: leaving it flushes what the process logged and ends
    nothing. `owner_pid` is the process that made the context. In a forked child the first call
    joins the run on a stream and a writer of the child's own (the parent's writer thread does not
    exist there; the child's library session is built for it), so what the child logs is delivered."""

    owns_run: bool = True
    owner_pid: int = 0
    _depth: int = 0
    _console: Any = None
    _handover: Path | None = None  # the handover file of a run this process owns (for its children)
    _forked = False  # inherited by a forked child and not yet joined there

    def flush_events(self) -> None:
        """Wait until everything this process logged is on the bus (EventsNotWritten says why not)."""
        global _main_thread_flushing, _sigterm_deferred
        if self._forked:
            return  # a forked child that logged nothing: what is queued is the parent's to write
        in_main = threading.current_thread() is threading.main_thread()
        outer = _main_thread_flushing
        _main_thread_flushing = outer or in_main
        try:
            self._writer.sync(f"the events of run {self.uid}")
        finally:
            _main_thread_flushing = outer
        if in_main and not outer and _sigterm_deferred:  # a SIGTERM came during the flush
            _sigterm_deferred = False
            _die_by(signal.SIGTERM, self)

    def stop_heartbeats(self) -> None:
        """This process stops speaking for the run (a joined run's launcher still does)."""
        if not self._forked:
            self._writer.untrack(self.uid)

    def log_output(self, stream: str, text: str) -> None:
        if self._forked:
            self._join_in_child()
        super().log_output(stream, text)

    def flush_output(self) -> None:
        if not self._forked:  # what a forked child holds buffered is its parent's to send
            super().flush_output()

    def _logger_line(self, level: int, text: str) -> None:
        if self._forked:
            self._join_in_child()
        super()._logger_line(level, text)

    def _emit(self, event_type: str, payload: dict[str, Any], ts: float | None = None, *,
              last: bool = False, text_chars: int = 0) -> None:
        if self._forked:
            self._join_in_child()
        super()._emit(event_type, payload, ts, last=last, text_chars=text_chars)

    def _join_in_child(self) -> None:
        """In a forked child: become a joined context of the same run, on this process's own stream
        and writer (the same identity, params, secrets; what the parent logged stays in view)."""
        from engine.api import session  # the child's first call: the library's entry in this process

        with _lock:
            if not self._forked:
                return
            svc = session().services
            kept = self.results, self.artifacts, self._metric_keys
            RunContext.__init__(self, svc.writer, svc.artifact_store, uid=self.uid, name=self.name,
                                project=self.project, handler=self.handler, runtime=self.runtime,
                                params=self.parameters, inputs=self.inputs, input_digests=self._input_digests,
                                secrets=self._secrets, labels=self.labels, parent_uid=self.parent_uid,
                                iteration=self.iteration, code_ref=self.code_ref,
                                iterations_recorder=self._iterations_recorder, sign=self._sign)
            self.results, self.artifacts, self._metric_keys = kept
            self.owner_pid = os.getpid()
            self._forked = False
            self.resume()
            _flush_when_worker_ends(self)
            atexit.unregister(_at_exit)  # after the new writer's own atexit close (last in, first out)
            atexit.register(_at_exit)

    def __enter__(self) -> ScriptContext:
        self._depth += 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._depth -= 1
        if self._depth <= 0:  # a nested `with` on the same run leaves the ending to the outer one
            _end(self, exc)


_lock = threading.RLock()
_current: ScriptContext | None = None
_exit_code: list[Any] = []  # what sys.exit() was last called with (atexit cannot learn it otherwise)
# a SIGTERM handler that flushed while the main thread was flushing would wait for a lock that
# thread holds: the signal waits for the end of that flush instead
_main_thread_flushing = False
_sigterm_deferred = False
_hooks_installed = False


def get_or_create_ctx(name: str = "", event: Any = None, spec: Mapping[str, Any] | str | None = None,
                      with_env: bool = True, rundb: str = "", project: str = "",
                      upload_artifacts: bool = False, labels: Mapping[str, Any] | None = None,
                      params: Mapping[str, Any] | None = None, capture_output: bool | None = None,
                      ) -> ScriptContext:
    """The process's open run, or a new one named `name` (started), as MLRun's `get_or_create_ctx`.

    With `with_env` (the default), a script launched by Runbus joins the launcher's run and gets
    its params; `params` then only add defaults for keys it did not give. `spec` is MLRun's run
    dict ({'metadata': {name, project, labels}, 'spec': {parameters}}) or its JSON. `capture_output`
    False keeps this run's console out of the log (default: RUNBUS_CAPTURE_CONSOLE). `event`,
    `rundb` and `upload_artifacts` are accepted for MLRun code and ignored: the bus comes from
    RUNBUS_BUS, and artifacts are always stored. A library entry point: the run records through
    the process's library session (engine.api).
    """
    global _current
    with _lock:
        if _current is not None and (not _current.owns_run or _current.state == "running"):
            return _current
        from engine.api import session

        svc = session().services
        settings = svc.settings
        metadata, parameters = _mlrun_spec(spec)
        params = {**parameters, **(params or {})}
        labels = {**metadata.get("labels", {}), **(labels or {})}
        handover = os.environ.get(HANDOVER_ENV) if with_env else None
        record = read_handover(Path(handover), settings.home) if handover else None
        if record is not None:
            context = _join(svc, record, params, labels)
        else:
            context = _start(svc, name or metadata.get("name") or _script_name(), project or metadata.get("project"),
                             params, labels, capture_output)
        _current = context
        _install_hooks()
        return context


def start_run(name: str = "", project: str = "", params: Mapping[str, Any] | None = None,
              labels: Mapping[str, Any] | None = None, capture_output: bool | None = None) -> ScriptContext:
    """`get_or_create_ctx` for the `with start_run(...) as ctx:` form: the block is the run."""
    return get_or_create_ctx(name, project=project, params=params, labels=labels, capture_output=capture_output)


def current_context() -> ScriptContext | None:
    """The run this process opened or joined with get_or_create_ctx, if any."""
    return _current


# the handover between a launcher and the script it runs ---------------------------------------------

def write_handover(context: RunContext, spec: RunSpec) -> Path:
    """Write what a launched script needs to join `context`'s run (started from `spec`) to a new
    file readable by its owner only (in RUNBUS_HOME/handover, 0700); the launcher names it in
    RUNBUS_RUN_HANDOVER and removes it when the script ends.

    A file rather than environment variables because the run's secrets are in it: a process's
    environment is inherited by everything it starts and is what crash reporters and debug dumps
    print; argv is readable by every user (/proc/PID/cmdline). The file is the owner's alone."""
    folder = handover_folder(spec.settings.home, fix=True)
    fd, path = tempfile.mkstemp(dir=folder, prefix="run-", suffix=".json")  # mode 0600
    record = {
        "uid": context.uid, "name": context.name, "project": context.project, "handler": context.handler,
        "runtime": context.runtime, "params": context.parameters, "inputs": context.inputs,
        "input_digests": spec.input_digests, "secrets": spec.secrets, "labels": context.labels,
        "parent_uid": context.parent_uid, "iteration": context.iteration, "code_ref": context.code_ref}
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(record, out)
    return Path(path)


def handover_folder(home: Path, fix: bool = False) -> Path:
    """RUNBUS_HOME/handover, resolved, checked to be a folder of this user's with mode 0700 (with
    `fix`, made if missing and a group/other mode bit removed); ValueError names it otherwise."""
    folder = home.resolve() / "handover"
    if fix:
        make_private_folder(folder)
    try:
        found = os.lstat(folder)
    except OSError as exc:
        raise ValueError(f"handover folder {str(folder)!r} cannot be used: {exc.strerror}") from None
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
        raise ValueError(f"handover folder {str(folder)!r} is not a folder owned by this user (uid {os.getuid()})")
    if stat.S_IMODE(found.st_mode) != 0o700:
        if not fix:
            raise ValueError(f"handover folder {str(folder)!r} has mode {stat.S_IMODE(found.st_mode):o}, "
                             f"not 700: others could place or read handovers there")
        os.chmod(folder, 0o700)
    return folder


def read_handover(path: Path, home: Path) -> dict[str, Any] | None:
    """The run a launcher handed over in `path`, trusted only when it is a regular file of this
    user's, with no group/other mode bit, in `home`'s handover folder (see `handover_folder`).
    None (with a warning on stderr) when the file is gone: its launcher ended (a detached child
    outlived it), so the caller runs a run of its own. ValueError names the file otherwise."""
    where = f"{HANDOVER_ENV}={str(path)!r}"
    folder = handover_folder(home)
    if Path(os.path.realpath(path.parent)) != folder:
        raise ValueError(f"{where}: not a file of the handover folder {str(folder)!r}: not trusted")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        print(f"runbus: {where} no longer exists (the process that launched this one has ended): "
              f"this process starts a run of its own", file=sys.stderr)
        return None
    except OSError as exc:
        raise ValueError(f"{where}: cannot read the launcher's run: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        found = os.fstat(handle.fileno())  # of the very file read: no swap between check and read
        if not stat.S_ISREG(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
            raise ValueError(f"{where}: not trusted: a handover must be a regular file owned by this "
                             f"user (uid {os.getuid()}) with mode 600 (it is mode {stat.S_IMODE(found.st_mode):o}, "
                             f"owner uid {found.st_uid})")
        try:
            record = json.loads(handle.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}: cannot read the launcher's run: {exc}") from None
    missing = [key for key in _HANDOVER_KEYS if key not in record] if isinstance(record, dict) else ["uid"]
    if missing:
        raise ValueError(f"{where}: the handover has no {missing[0]!r}")
    return record


def script_code_ref(path: Path, reference: str, home: Path) -> str | None:
    """The code reference of a script file, as `describe_handler` makes for a handler's source."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return f"{path}@sha256:{digest}#mac:{code_mac(home, reference, str(path), digest)}"


# building the context ------------------------------------------------------------------------------

def _start(svc: Services, name: str, project: str | None, params: Mapping[str, Any], labels: Mapping[str, Any],
           capture_output: bool | None) -> ScriptContext:
    settings = svc.settings
    check_name("name", name)  # as MLRun does: names go into paths and URIs
    check_name("project", project)
    script = _script_path()
    reference = str(script) if script else "<stdin>"
    spec = RunSpec(settings, None, reference, name, project or settings.project, runtime="script",
                   params=dict(params), labels={k: str(v) for k, v in labels.items()},
                   code_ref=script_code_ref(script, reference, settings.home) if script else None)
    context = spec.new_context(svc, context_class=ScriptContext)
    context.owner_pid = os.getpid()
    context.start()
    # on the bus before the script goes on: an os._exit or kill -9 right after still leaves a run
    try:
        context.flush_events()
    except EventsNotWritten as exc:  # queued or in the spill file: delivered later; the job goes on
        print(f"runbus: run {context.uid} started, but its start is not on the bus yet: {exc}", file=sys.stderr)
    # the processes the script starts (spawn workers re-importing __main__, scripts it runs) join it
    context._handover = write_handover(context, spec)
    os.environ[HANDOVER_ENV] = str(context._handover)
    if settings.capture_console and capture_output is not False:
        context._console = _capture(context)
    return context


def _join(svc: Services, record: Mapping[str, Any], params: Mapping[str, Any],
          labels: Mapping[str, Any]) -> ScriptContext:
    spec = RunSpec(svc.settings, None, record["handler"], record["name"], record["project"], record["runtime"],
                   record["params"], record["inputs"], record["input_digests"], record["secrets"],
                   record["labels"], record["code_ref"], record["parent_uid"], record["iteration"])
    context = spec.new_context(svc, uid=record["uid"], context_class=ScriptContext)
    context.owner_pid, context.owns_run = os.getpid(), False
    context.resume()  # its own stream; run_started is the launcher's
    for key, value in params.items():
        context.get_param(key, value)
    for key, value in labels.items():
        context.set_label(key, value, replace=False)
    _flush_when_worker_ends(context)
    return context


def _flush_when_worker_ends(context: ScriptContext) -> None:
    """Flush a joined context's events when its multiprocessing worker ends: multiprocessing ends
    it with os._exit, which skips atexit hooks, but runs its own finalizers first."""
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is None:
        return
    mp_util.Finalize(None, _flush_quietly, args=(context,), exitpriority=0)
    # a spawn worker joins while it imports __main__, before the worker clears the finalizers
    # (and then runs the after-fork hooks)
    mp_util.register_after_fork(context, _flush_when_worker_ends)


def _flush_quietly(context: ScriptContext) -> None:
    """Put what this process logged for a run it does not own on the bus (bounded), saying on
    stderr when it cannot; its heartbeats stop."""
    try:
        context.flush_events()
    except Exception as exc:
        print(f"runbus: the events of run {context.uid} could not be written: {exc}", file=sys.stderr)
    finally:
        context.stop_heartbeats()


def _capture(context: ScriptContext) -> Any:
    """Enter fd-level console capture for the run: its stdout and stderr, and its children's."""
    capture = capture_console(context, fd_level=True)
    capture.__enter__()
    return capture


def _mlrun_spec(spec: Mapping[str, Any] | str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if spec is None:
        return {}, {}
    if isinstance(spec, str):
        spec = json.loads(spec)
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a dict or its JSON, not {type(spec).__name__}")
    return dict(spec.get("metadata") or {}), dict((spec.get("spec") or {}).get("parameters") or {})


def _script_path() -> Path | None:
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None)
    return Path(file).resolve() if file and Path(file).is_file() else None


def _script_name() -> str:
    script = _script_path()
    return script.stem if script else "script"


# ending the run -------------------------------------------------------------------------------------

def _end(context: ScriptContext, exc: BaseException | None = None, exit_code: Any = None) -> None:
    """End the run as `exc` (or the process's exit code) says; a joined run (or one a forked child
    inherited) is only flushed."""
    if not context.owns_run or context.owner_pid != os.getpid():
        _flush_quietly(context)
        return
    if context._console is not None:
        console, context._console = context._console, None
        with contextlib.suppress(Exception):
            console.__exit__(None, None, None)
    if context._handover is not None:
        _withdraw_handover(context._handover)
        context._handover = None
    if context.state != "running":
        return
    state = None
    error: BaseException | str | None = None
    if isinstance(exc, SystemExit):
        error = None if exc.code in (None, 0) else exc
    elif isinstance(exc, Exception):
        error = exc
    elif exc is not None:  # KeyboardInterrupt, Terminated and other BaseExceptions
        error, state = exc, "aborted"
    elif exit_code not in (None, 0):
        error = f"the script exited with {exit_code!r}"
    with contextlib.suppress(RunFinishedError):
        context.finish(error=error, state=state)


def _withdraw_handover(path: Path) -> None:
    """The run ends: processes started from now on start runs of their own."""
    if os.environ.get(HANDOVER_ENV) == str(path):
        del os.environ[HANDOVER_ENV]
    path.unlink(missing_ok=True)


def _after_fork_in_child() -> None:
    """A forked child never ends (nor waits to end) the parent's run: it does not own it, and the
    context it inherited joins the run on the child's first call (ScriptContext._join_in_child)."""
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork
    context = _current
    if context is None:
        return
    # its console capture (the parent's) is left alone: leaving it in a child does nothing
    context.owns_run, context._handover = False, None
    context._forked = context.state == "running"


os.register_at_fork(after_in_child=_after_fork_in_child)


def _install_hooks() -> None:
    """End the open run at interpreter exit, on an uncaught exception, on SIGTERM (hooks installed once)."""
    global _hooks_installed
    # (re)registered after the writer of this run registered its own atexit close (atexit runs
    # last-in first-out): the run's last events are emitted while the writer still takes them
    atexit.unregister(_at_exit)
    atexit.register(_at_exit)
    if _hooks_installed:
        return
    _hooks_installed = True
    previous_hook = sys.excepthook

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(exc, Terminated):
            previous_hook(kind, exc, tb)  # first: the traceback is then in the run's console log too
        context = _current
        if context is not None:
            try:
                _end(context, exc)
            except Exception:
                traceback.print_exc()
        if isinstance(exc, Terminated):
            _die_by(signal.SIGTERM, context)

    sys.excepthook = excepthook
    sys.exit = _RememberingExit(sys.exit)  # type: ignore[assignment]
    for name in ("exit", "quit"):  # the builtins site adds (they raise SystemExit themselves)
        if hasattr(builtins, name):
            setattr(builtins, name, _RememberingExit(getattr(builtins, name)))
    if threading.current_thread() is threading.main_thread() and _user_has_no_handler(signal.SIGTERM):
        signal.signal(signal.SIGTERM, _on_sigterm)


class _RememberingExit:
    """Stands in for sys.exit, exit or quit, remembering the status for the atexit hook."""

    def __init__(self, original: Any) -> None:
        self._original = original
        self.__doc__ = original.__doc__

    def __call__(self, status: Any = None) -> None:
        _exit_code[:] = [status]
        self._original(status)

    def __repr__(self) -> str:
        return repr(self._original)  # what the REPL shows for `exit`


def _at_exit() -> None:
    context = _current
    if context is None:
        return
    try:
        _end(context, exit_code=_exit_code[0] if _exit_code else None)
    except Exception as exc:
        print(f"runbus: run {context.uid} could not be ended at exit: {exc}", file=sys.stderr)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active (in the main thread, when the program has no SIGTERM handler of its own),
    SIGTERM raises `Terminated` here, so what is under way can record `aborted` as it unwinds."""
    if threading.current_thread() is not threading.main_thread() or not _user_has_no_handler(signal.SIGTERM):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _user_has_no_handler(signum: int) -> bool:
    return signal.getsignal(signum) in (signal.SIG_DFL, None, _on_sigterm)


def _raise_terminated(signum: int, frame: Any) -> None:
    # raised in the main thread, so the run ends (aborted) as the stack unwinds, with no lock held
    raise Terminated("terminated by SIGTERM")


def _on_sigterm(signum: int, frame: Any) -> None:
    """The run's owner records `aborted` as the stack unwinds; a process that joined the run (a
    launched script, a multiprocessing worker, a forked child) flushes what it logged and dies
    by SIGTERM at once, as it would without Runbus (no traceback: a pool's workers end so)."""
    global _sigterm_deferred
    context = _current
    if context is not None and context.owns_run and context.owner_pid == os.getpid():
        _raise_terminated(signum, frame)
    if _main_thread_flushing:
        _sigterm_deferred = True
        return
    _die_by(signal.SIGTERM, context)


def _die_by(signum: signal.Signals, context: ScriptContext | None) -> None:
    """End the process by `signum`, as it would have without Runbus (the parent sees the signal)."""
    if context is not None:
        _flush_quietly(context)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)

