"""Functions: a handler plus where it runs. `new_function().run(task)` executes a task."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from engine.bootstrap import services
from engine.loader import describe_handler, load_handler
from engine.run import RunObject
from engine.runspec import RunSpec
from engine.runtimes import local
from engine.runtimes.pools import open_pool
from engine.secrets import resolve_all
from engine.sweep.iteration import run_iteration
from engine.sweep.runner import run_sweep
from engine.sweep.spec import SweepSpec
from engine.task import RunTemplate
from producers.artifact_store import file_sha256
from producers.data_item import DataItem


class Function:
    """Runs tasks on a runtime: in-process (default) or, with command='dask://', on Dask."""

    def __init__(self, command: str | None = None, name: str | None = None,
                 project: str | None = None, handler: Callable[..., Any] | str | None = None) -> None:
        self.command = command
        self.name = name
        self.project = project
        self.handler = handler
        self.runtime = "local"
        if command and command.startswith("dask://"):
            self.runtime = command
        elif command and not command.endswith(".py"):
            raise ValueError(f"command {command!r} must be a .py file or a dask:// URL")

    def run(self, task: RunTemplate | None = None, handler: Callable[..., Any] | str | None = None,
            name: str | None = None, project: str | None = None,
            params: Mapping[str, Any] | None = None, inputs: Mapping[str, str] | None = None,
            labels: Mapping[str, Any] | None = None, hyperparams: Mapping[str, Any] | None = None,
            **sweep_options: Any) -> RunObject:
        """Run `task` (or a task built from the arguments); returns when the run has ended.

        With hyper-params (here or on the task) the run is a sweep: `selector`, `strategy`,
        `stop_condition`, `max_errors`, `parallel_runs`, `max_iterations`, `seed`, `quiet`.
        """
        task = task.copy() if task is not None else RunTemplate()
        task.params.update(params or {})
        task.inputs.update({k: str(v) for k, v in (inputs or {}).items()})
        task.labels.update({k: str(v) for k, v in (labels or {}).items()})
        if hyperparams is not None:
            task.with_hyper_params(hyperparams, **sweep_options)
        elif sweep_options:
            options = {**task.hyper_options, **sweep_options}
            if not task.hyper_params:
                raise TypeError(f"sweep options without hyperparams: {', '.join(sweep_options)}")
            task.hyper_options = options
        sweep = SweepSpec.from_options(task.hyper_params, task.hyper_options) if task.hyper_params else None
        spec = self._spec(self._handler(handler or task.handler or self.handler), task, name, project)
        if sweep is not None:
            return RunObject.from_context(run_sweep(spec, sweep))
        if self.runtime == "local":
            context = spec.new_context()
            local.execute(spec.handler, context)
            return RunObject.from_context(context)
        return self._run_on_pool(spec)

    def _run_on_pool(self, spec: RunSpec) -> RunObject:
        pool = open_pool(self.runtime, 1, spec.settings)
        try:
            outcome = pool.submit(run_iteration, pool.prepare(spec)).result()
        finally:
            pool.close()
        svc = services(spec.settings)
        return RunObject.from_record(svc.run_db().read_run(outcome.uid), str(svc.artifact_store.root))

    def _handler(self, handler: Callable[..., Any] | str | None) -> Callable[..., Any]:
        if callable(handler):
            return handler
        if isinstance(handler, str):
            command = self.command if self.command and self.command.endswith(".py") else None
            return load_handler(handler, command)
        if self.command and self.command.endswith(".py"):
            return load_handler("handler", self.command)
        raise ValueError("no handler: pass handler= to run(), NewRun() or new_function()")

    def _spec(self, handler: Callable[..., Any], task: RunTemplate, name: str | None,
              project: str | None) -> RunSpec:
        svc = services()
        reference, code_ref = describe_handler(handler)
        inputs = {key: _as_uri(path) for key, path in task.inputs.items()}
        return RunSpec(
            svc.settings, handler, reference,
            name=name or task.name or self.name or getattr(handler, "__name__", "run"),
            project=project or task.project or self.project or svc.settings.project,
            runtime=self.runtime, params=dict(task.params), inputs=inputs,
            input_digests=_digests(inputs), secrets=resolve_all(task.secret_sources),
            labels=dict(task.labels), code_ref=code_ref)


def _as_uri(path: str) -> str:
    if "://" in path:
        return path
    return Path(path).resolve().as_uri()


def _digests(inputs: Mapping[str, str]) -> dict[str, str]:
    found = {}
    for key, uri in inputs.items():
        local_path = Path(DataItem(key, uri).local()) if uri.startswith("file://") else None
        if local_path is not None and local_path.is_file():
            found[key] = file_sha256(local_path)
    return found


def new_function(command: str | None = None, name: str | None = None, project: str | None = None,
                 handler: Callable[..., Any] | str | None = None, **_ignored: Any) -> Function:
    """A function: `command` is None (in-process), 'file.py' or 'dask://[host:port]'."""
    return Function(command, name, project, handler)
