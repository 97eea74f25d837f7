"""Functions: a handler or a command plus where it runs, as MLRun's `new_function` / `run_function`.

`fn.run(task)` runs a handler in-process (kinds '', 'local', 'job', 'handler') or on Dask (kind
'dask', command 'dask://...'); a function with a command and no handler runs the command in a
subprocess (engine.runtimes.command). A Function records through the services it was made with
(`new_function`: the library session's, see engine.api).
"""

from __future__ import annotations

import re
import shlex
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.bootstrap import Services
from engine.loader import describe_handler, load_handler
from engine.run import RunObject
from engine.runspec import RunSpec
from engine.runtimes import local as local_runtime
from engine.runtimes.pools import open_pool
from engine.secrets import resolve_all
from engine.sweep.iteration import run_iteration
from engine.sweep.runner import CommandJob, run_sweep
from engine.sweep.spec import SweepSpec, read_param_file
from engine.task import HyperParamOptions, RunTemplate, check_name
from producers.artifact_store import file_sha256
from producers.context import RunContext
from producers.data_item import DataItem

LOCAL_KINDS = ("", "local", "job", "handler")
_RUNTIME_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")  # a command that is a URL names a runtime
KINDS = (*LOCAL_KINDS, "dask")
# MLRun's hyper-param options with no Runbus meaning: dropped when unset, refused when set
_MLRUN_ONLY_OPTIONS = ("dask_cluster_uri", "teardown_dask")

Handler = Callable[..., Any] | str


class Function:
    """Runs tasks: a handler in-process or on Dask, or a command in a subprocess."""

    def __init__(self, name: str | None = None, project: str | None = None, tag: str | None = None,
                 kind: str | None = None, command: str | None = None, image: str | None = None,
                 args: Sequence[str] | None = None, handler: Handler | None = None, *, svc: Services,
                 **options: Any) -> None:
        self.svc = svc
        self.name = check_name("function name", name or None)
        self.project = check_name("project", project or None)
        self.tag, self.image = tag or None, image or None
        self.options = dict(options)  # MLRun's mode, source, requirements...: kept, unused locally
        self.kind = kind or ""
        if self.kind not in KINDS:
            raise ValueError(f"function kind {self.kind!r} is not supported (supported: "
                             f"{', '.join(repr(k) for k in KINDS)}; 'job' and 'handler' run locally)")
        self.command = command or None
        self.args = [str(arg) for arg in args or []]
        self.handler = handler
        self.runtime = "local"
        scheme = _RUNTIME_URL.match(self.command or "")
        if scheme and scheme.group(1) != "dask":
            raise ValueError(f"command {self.command!r} names a runtime Runbus does not have: the runtimes are "
                             f"in-process (no command) and dask:// or dask://host:port")
        if self.command and self.command.startswith("dask://"):
            if self.kind not in ("", "dask"):
                raise ValueError(f"function kind {self.kind!r} runs locally; command {self.command!r} is a Dask URL")
            self.runtime = self.command
        elif self.kind == "dask":
            self.runtime = "dask://"

    def run(self, runspec: RunTemplate | None = None, handler: Handler | None = None, name: str | None = None,
            project: str | None = None, params: Mapping[str, Any] | None = None,
            inputs: Mapping[str, str] | None = None, out_path: str | None = None, workdir: str | None = None,
            artifact_path: str | None = None, watch: bool = True, schedule: Any = None,
            hyperparams: Mapping[str, Any] | None = None,
            hyper_param_options: HyperParamOptions | Mapping[str, Any] | None = None,
            verbose: bool | None = None, local: bool | None = None, returns: Iterable[str] | None = None,
            labels: Mapping[str, Any] | None = None, **sweep_options: Any) -> RunObject:
        """Run `runspec` (or a task built from the arguments); returns when the run has ended.

        With hyper-params or a param file (here or on the task) the run is a sweep: `selector`,
        `strategy`, `stop_condition`, `max_errors`, `parallel_runs`, `max_iterations`, `seed`,
        `quiet`. MLRun's `watch`, `local`, `verbose`, `out_path`, `artifact_path` and `workdir`
        are accepted: a run always runs here (or on the function's Dask cluster) and returns when
        it ends, and artifacts always go to the content store. `returns` names the handler's
        return values, logged as results. A `schedule` is refused (Runbus runs now).
        """
        if schedule is not None:
            raise ValueError("schedule is not supported: Runbus runs a function when it is called")
        task = runspec.copy() if runspec is not None else RunTemplate()
        task.params.update(params or {})
        task.inputs.update({k: str(v) for k, v in (inputs or {}).items()})
        task.labels.update({k: str(v) for k, v in (labels or {}).items()})
        if hyper_param_options is not None:
            task.spec.hyper_param_options = hyper_param_options
        task.returns = list(returns) if returns is not None else task.returns
        task.out_path, task.artifact_path = out_path or task.out_path, artifact_path or task.artifact_path
        if hyperparams is not None:
            task.hyper_params = {k: v if isinstance(v, (str, bytes)) else list(v) for k, v in hyperparams.items()}
        sweep = _sweep(task, sweep_options)
        spec = self._spec(task, handler, name, project)
        if isinstance(spec.handler, CommandJob):
            if sweep is not None:
                return self._finished(run_sweep(self.svc, spec, sweep))
            return self._finished(spec.handler.run(self.svc, spec))
        if sweep is not None:
            return RunObject.from_context(run_sweep(self.svc, spec, sweep))
        if self.runtime == "local":
            context = spec.new_context(self.svc)
            local_runtime.execute(spec.handler, context, capture_console=spec.settings.capture_console)
            return RunObject.from_context(context)
        return self._run_on_pool(spec)

    def _run_on_pool(self, spec: RunSpec) -> RunObject:
        pool = open_pool(self.svc, self.runtime, 1)
        try:
            (future,) = pool.submit_all(run_iteration, [pool.prepare(spec)])
            outcome = future.result()
        finally:
            pool.close()
        svc = self.svc
        return RunObject.from_record(svc.run_db().read_run(outcome.uid), str(svc.artifact_store.root))

    def _finished(self, context: RunContext) -> RunObject:
        """The run as the log holds it: a command's own process logged its results, not this one."""
        svc = self.svc
        return RunObject.from_record(svc.run_db().read_run(context.uid), str(svc.artifact_store.root))

    def _spec(self, task: RunTemplate, handler: Handler | None, name: str | None, project: str | None) -> RunSpec:
        svc = self.svc
        chosen = handler or task.handler or self.handler
        inputs = {key: _as_uri(path) for key, path in task.inputs.items()}
        if chosen is None and self.command and self.runtime == "local":
            job: Callable[..., Any] | CommandJob = CommandJob(self.command, self.args)
            reference, code_ref = self.command, None
            default_name = self.name or Path(shlex.split(self.command)[0]).stem
        else:
            found = self._handler(chosen)
            reference, code_ref = describe_handler(found)
            job = _with_returns(found, task.returns)
            default_name = self.name or getattr(found, "__name__", "run")
        return RunSpec(
            svc.settings, job, reference,
            name=check_name("run name", name or task.name or default_name) or "run",
            project=check_name("project", project or task.project or self.project) or svc.settings.project,
            runtime=self.runtime, params=dict(task.params), inputs=inputs,
            input_digests=_digests(inputs), secrets=resolve_all(task.secret_sources),
            labels=dict(task.labels), code_ref=code_ref)

    def _handler(self, handler: Handler | None) -> Callable[..., Any]:
        if callable(handler):
            return handler
        if isinstance(handler, str):
            return load_handler(handler, self._script())
        raise ValueError("no handler: pass handler= to run(), NewRun() or new_function(), or a command to run")

    def _script(self) -> str | None:
        """The .py file a handler name is looked up in: the command's first word."""
        if not self.command or self.command.startswith("dask://"):
            return None
        first = shlex.split(self.command)[0]
        return first if first.endswith(".py") else None

    def __repr__(self) -> str:
        return f"Function(name={self.name!r}, kind={self.kind!r}, command={self.command!r})"


def _sweep(task: RunTemplate, sweep_options: Mapping[str, Any]) -> SweepSpec | None:
    """The task's sweep (hyper-params or a param file, with the task's options and `sweep_options`),
    or None for a single run."""
    options = {**task.hyper_options, **sweep_options}
    if sweep_options and not (task.hyper_params or task.param_file):
        raise TypeError(f"sweep options without hyperparams: {', '.join(sweep_options)}")
    hyperparams = task.hyper_params
    if task.param_file:
        if hyperparams:
            raise ValueError("hyperparams and param_file cannot be used together")
        hyperparams, options["strategy"] = read_param_file(task.param_file, options.get("strategy"))
    for key in _MLRUN_ONLY_OPTIONS:
        if options.get(key) is None:
            options.pop(key, None)
    return SweepSpec.from_options(hyperparams, options) if hyperparams else None


def _with_returns(handler: Callable[..., Any], returns: Sequence[str]) -> Callable[..., Any]:
    """`handler` itself, or with `returns` a handler logging its return value(s) as results by
    those names (MLRun's `returns`; a ':type' suffix is dropped) instead of as 'return'."""
    if not returns:
        return handler
    names = [str(name).split(":", 1)[0].strip() for name in returns]

    def logs_returns(context: RunContext, **_params: Any) -> None:
        value = local_runtime.call_handler(handler, context)
        values = value if len(names) > 1 and isinstance(value, (tuple, list)) else (value,)
        if len(values) != len(names):
            raise ValueError(f"returns {names} names {len(names)} values; the handler returned {len(values)}")
        context.log_results(dict(zip(names, values, strict=True)))

    # the handler's identity (recorded reference, Dask shipping a script's code by value)
    logs_returns.__module__, logs_returns.__qualname__ = handler.__module__, handler.__qualname__
    logs_returns.__name__ = getattr(handler, "__name__", "handler")
    logs_returns.__wrapped_handler__ = handler  # type: ignore[attr-defined]
    return logs_returns


def _as_uri(path: str) -> str:
    if "://" in path:
        return path
    return Path(path).resolve().as_uri()


def _digests(inputs: Mapping[str, str]) -> dict[str, str]:
    """The sha256 of each input that is a file here (a rerun checks it); a warning for a local input
    that is no file (the run goes on: its handler may not read it, as in MLRun)."""
    found = {}
    for key, uri in inputs.items():
        local_path = Path(DataItem(key, uri).local()) if uri.startswith("file://") else None
        if local_path is not None and local_path.is_file():
            found[key] = file_sha256(local_path)
        elif local_path is not None:
            warnings.warn(f"input {key!r}: {local_path} is not a file; recorded as given", stacklevel=4)
    return found


def new_function(name: str | None = None, project: str | None = None, tag: str | None = None,
                 kind: str | None = None, command: str | None = None, image: str | None = None,
                 args: Sequence[str] | None = None, runtime: Any = None, mode: str | None = None,
                 handler: Handler | None = None, source: str | None = None,
                 requirements: str | list[str] | None = None, kfp: bool | None = None,
                 requirements_file: str = "") -> Function:
    """A function, with MLRun's `new_function` arguments in MLRun's order. `command` is None (a
    handler in-process), 'file.py' (where a handler name is looked up; with no handler, the script
    runs as a command), 'job.py --lr {lr}' (a command with params in argv, like `args`) or
    'dask://[host:port]'. `image`, `mode`, `source` and `requirements` are kept on the function and
    do not change a local run (as in MLRun); `runtime` (a function spec) and `kfp` are refused.
    A library entry point: the function records through the process's library session."""
    from engine.api import session

    if runtime is not None or kfp:
        raise ValueError(f"new_function: {'runtime' if runtime is not None else 'kfp'} is not supported")
    library = session()
    function = Function(name, project, tag, kind, command, image, args, handler, svc=library.services, mode=mode,
                        source=source, requirements=requirements, requirements_file=requirements_file)
    if function.name:
        library.functions[function.name] = function
    return function


def run_function(function: Function | str, handler: Handler | None = None, name: str = "",
                 params: Mapping[str, Any] | None = None, hyperparams: Mapping[str, Any] | None = None,
                 hyper_param_options: HyperParamOptions | Mapping[str, Any] | None = None,
                 inputs: Mapping[str, str] | None = None, outputs: Iterable[str] | None = None,
                 workdir: str = "", labels: Mapping[str, Any] | None = None, base_task: RunTemplate | None = None,
                 watch: bool = True, local: bool | None = None, verbose: bool | None = None,
                 selector: str | None = None, project_object: Any = None, auto_build: bool | None = None,
                 schedule: Any = None, artifact_path: str | None = None, notifications: Any = None,
                 returns: Iterable[str] | None = None, builder_env: Mapping[str, str] | None = None,
                 reset_on_run: bool | None = None, **options: Any) -> RunObject:
    """MLRun's `run_function`: run `function` (a Function, or the name of one made by
    `new_function` in this process) with these arguments; returns the ended run. `options` are
    sweep options (`parallel_runs`, `stop_condition`...); `project_object`, `auto_build`,
    `notifications`, `builder_env` and `reset_on_run` are accepted and unused. A library entry
    point: a function named by a string is looked up in the library session."""
    if isinstance(function, str):
        from engine.api import session

        functions = session().functions
        if function not in functions:
            known = ", ".join(sorted(functions)) or "none"
            raise ValueError(f"function {function!r} was not made by new_function(name=...) in this process "
                             f"(known: {known})")
        function = functions[function]
    task = base_task.copy() if base_task is not None else RunTemplate()
    task.outputs += list(outputs or [])
    if selector:
        task.hyper_options["selector"] = selector
    return function.run(task, handler=handler, name=name or None, params=params, inputs=inputs,
                        workdir=workdir or None, artifact_path=artifact_path, watch=watch, schedule=schedule,
                        hyperparams=hyperparams, hyper_param_options=hyper_param_options, verbose=verbose,
                        local=local, returns=returns, labels=labels, **options)
