"""Functions: a handler plus where it runs. `new_function().run(task)` executes a task."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from engine.bootstrap import services
from engine.loader import describe_handler, load_handler
from engine.run import RunObject
from engine.runtimes import local
from engine.secrets import resolve_all
from engine.task import RunTemplate
from producers.artifact_store import file_sha256
from producers.context import RunContext
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
            labels: Mapping[str, Any] | None = None, **hyper_options: Any) -> RunObject:
        """Run `task` (or a task built from the arguments); returns when the run has ended."""
        task = task.copy() if task is not None else RunTemplate()
        task.params.update(params or {})
        task.inputs.update({k: str(v) for k, v in (inputs or {}).items()})
        task.labels.update({k: str(v) for k, v in (labels or {}).items()})
        if hyper_options.get("hyperparams") is not None:
            task.with_hyper_params(hyper_options.pop("hyperparams"), **hyper_options)
        elif hyper_options:
            raise TypeError(f"unexpected arguments: {', '.join(hyper_options)}")
        target = self._handler(handler or task.handler or self.handler)
        run_name = name or task.name or self.name or getattr(target, "__name__", "run")
        if task.hyper_params:
            raise NotImplementedError("hyper-parameter sweeps are not available yet")
        context = self._new_context(target, task, run_name, project)
        local.execute(target, context)
        return RunObject(context.uid, context.name, context.project, context.state,
                         dict(context.results), dict(context.artifacts), dict(context.labels),
                         dict(context.parameters), context.error, context.traceback)

    def _handler(self, handler: Callable[..., Any] | str | None) -> Callable[..., Any]:
        if callable(handler):
            return handler
        if isinstance(handler, str):
            command = self.command if self.command and self.command.endswith(".py") else None
            return load_handler(handler, command)
        if self.command and self.command.endswith(".py"):
            return load_handler("handler", self.command)
        raise ValueError("no handler: pass handler= to run(), NewRun() or new_function()")

    def _new_context(self, handler: Callable[..., Any], task: RunTemplate, name: str,
                     project: str | None) -> RunContext:
        svc = services()
        reference, code_ref = describe_handler(handler)
        inputs = {key: _as_uri(path) for key, path in task.inputs.items()}
        return RunContext(
            svc.writer, svc.artifact_store, uid=uuid.uuid4().hex, name=name,
            project=project or task.project or self.project or svc.settings.project,
            handler=reference, runtime=self.runtime, params=task.params, inputs=inputs,
            input_digests=_digests(inputs), secrets=resolve_all(task.secret_sources),
            labels=task.labels, code_ref=code_ref)


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
