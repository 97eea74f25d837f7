"""RunTemplate (the MLRun task): what to run, with which params, inputs, secrets and labels.

`new_task` / `NewRun` take MLRun's keywords in MLRun's order; `task.metadata` and `task.spec` are
MLRun's views of the same task (writing through them changes it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from engine.secrets import SecretSource

Handler = Callable[..., Any] | str


def check_name(what: str, value: str | None) -> str | None:
    """`value` (None stays None) when it can name a run, function or project: MLRun uses names in
    paths and URIs (project/name), so ValueError names `what` when it holds '/', is blank or is not
    a string."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} {value!r} is blank")
    if "/" in value:
        raise ValueError(f"{what} {value!r} must not contain '/'")
    return value


@dataclass
class HyperParamOptions:
    """MLRun's hyper-param options (mlrun.model.HyperParamOptions): how a sweep runs."""

    param_file: str | None = None
    strategy: str | None = None
    selector: str | None = None
    stop_condition: str | None = None
    parallel_runs: int | None = None
    dask_cluster_uri: str | None = None
    max_iterations: int | None = None
    max_errors: int | None = None
    teardown_dask: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


class RunTemplate:
    """A reusable description of a run. The `with_*` methods change it in place and return it."""

    def __init__(self, name: str | None = None, project: str | None = None, handler: Handler | None = None,
                 params: Mapping[str, Any] | None = None,
                 hyper_params: Mapping[str, list[Any]] | None = None, param_file: str | None = None,
                 selector: str | None = None,
                 hyper_param_options: HyperParamOptions | Mapping[str, Any] | None = None,
                 inputs: Mapping[str, str] | None = None, outputs: Iterable[str] | None = None,
                 in_path: str | None = None, out_path: str | None = None, artifact_path: str | None = None,
                 secrets: Iterable[Mapping[str, Any] | SecretSource] | None = None,
                 base: RunTemplate | None = None, returns: Iterable[str] | None = None,
                 labels: Mapping[str, Any] | None = None) -> None:
        if base is not None:
            self.__dict__.update(base.copy().__dict__)
        else:
            self.handler: Handler | None = None
            self.name: str | None = None
            self.project: str | None = None
            self.params: dict[str, Any] = {}
            self.inputs: dict[str, str] = {}
            self.labels: dict[str, str] = {}
            self.secret_sources: list[SecretSource] = []
            self.hyper_params: dict[str, list[Any]] | None = None
            self.hyper_options: dict[str, Any] = {}
            self.param_file: str | None = None
            self.outputs: list[str] = []
            self.in_path = self.out_path = self.artifact_path = None
            self.returns: list[str] = []
        self.handler = handler if handler is not None else self.handler
        self.name = check_name("run name", name) if name else self.name
        self.project = check_name("project", project) if project else self.project
        self.params.update(params or {})
        self.inputs.update({k: str(v) for k, v in (inputs or {}).items()})
        self.labels.update({k: str(v) for k, v in (labels or {}).items()})
        for source in secrets or ():
            self.secret_sources.append(source if isinstance(source, SecretSource)
                                       else SecretSource(source["kind"], source["source"]))
        if hyper_param_options is not None:
            self.spec.hyper_param_options = hyper_param_options
        if hyper_params:
            self.hyper_params = {k: list(v) for k, v in hyper_params.items()}
        if selector:
            self.hyper_options["selector"] = selector
        if param_file:
            self.param_file = param_file
        self.outputs += list(outputs or [])
        self.returns += list(returns or [])
        self.in_path = in_path or self.in_path
        self.out_path = out_path or self.out_path
        self.artifact_path = artifact_path or self.artifact_path

    @property
    def metadata(self) -> TaskMetadata:
        """MLRun's `task.metadata`: name, project, labels (this task's own fields)."""
        return TaskMetadata(self)

    @property
    def spec(self) -> TaskSpec:
        """MLRun's `task.spec`: parameters, inputs, handler, hyperparams, param_file, selector..."""
        return TaskSpec(self)

    def with_params(self, **params: Any) -> RunTemplate:
        self.params.update(params)
        return self

    def with_input(self, key: str, path: str) -> RunTemplate:
        self.inputs[key] = str(path)
        return self

    def with_secrets(self, kind: str, source: Any) -> RunTemplate:
        """Add a secret source: 'file' (KEY=VALUE lines), 'env' (names), 'inline' (a dict)."""
        self.secret_sources.append(SecretSource(kind, source))
        return self

    def set_label(self, key: str, value: Any) -> RunTemplate:
        self.labels[key] = str(value)
        return self

    def with_hyper_params(self, hyperparams: Mapping[str, list[Any]], selector: str | None = None,
                          strategy: str | None = "grid", **options: Any) -> RunTemplate:
        """Run once per parameter set; `selector` ('min.loss', 'max.accuracy') picks the best.
        TypeError naming a param whose values are not a list."""
        from engine.sweep.spec import hyper_values

        self.hyper_params = hyper_values(hyperparams)
        self.hyper_options = {"selector": selector, "strategy": strategy or "grid", **options}
        return self

    def with_param_file(self, param_file: str, selector: str | None = None, strategy: str | None = None,
                        **options: Any) -> RunTemplate:
        """Run once per parameter set of a file, read when the run starts (MLRun's rules): a CSV
        file is one iteration a row (header: the param names); a JSON dict of lists is a grid (or
        `strategy` 'list'/'random'), a JSON list of dicts one iteration a dict."""
        self.param_file = str(param_file)
        self.hyper_options = {"selector": selector, "strategy": strategy, **options}
        return self

    def to_dict(self) -> dict[str, Any]:
        """The task in MLRun's shape ({'metadata': ..., 'spec': ...}); inline secrets by key only."""
        handler = self.handler if isinstance(self.handler, str) or self.handler is None else \
            getattr(self.handler, "__name__", repr(self.handler))
        secrets = [{"kind": s.kind, "source": sorted(map(str, s.source)) if s.kind == "inline" else s.source}
                   for s in self.secret_sources]
        spec = {"parameters": dict(self.params), "inputs": dict(self.inputs), "handler": handler,
                "hyperparams": dict(self.hyper_params or {}), "param_file": self.param_file,
                "hyper_param_options": self.spec.hyper_param_options.to_dict(), "secret_sources": secrets,
                "outputs": list(self.outputs), "input_path": self.in_path, "output_path": self.out_path,
                "artifact_path": self.artifact_path, "returns": list(self.returns)}
        return {"metadata": {"name": self.name, "project": self.project, "labels": dict(self.labels)},
                "spec": {key: value for key, value in spec.items() if value not in (None, [], {})}}

    def copy(self) -> RunTemplate:
        """A copy whose dicts and lists can change without changing this one. Param values are
        shared: a run copies them as JSON when it starts (a deep copy would recurse on any depth)."""
        twin = copy.copy(self)
        twin.params, twin.inputs, twin.labels = dict(self.params), dict(self.inputs), dict(self.labels)
        twin.secret_sources = list(self.secret_sources)
        twin.hyper_params = ({k: list(v) for k, v in self.hyper_params.items()}
                             if self.hyper_params is not None else None)
        twin.hyper_options = dict(self.hyper_options)
        twin.outputs, twin.returns = list(self.outputs), list(self.returns)
        return twin

    def __repr__(self) -> str:
        return f"RunTemplate(name={self.name!r}, params={self.params!r}, labels={self.labels!r})"


class TaskMetadata:
    """`task.metadata`: reads and writes the task's name, project and labels."""

    def __init__(self, task: RunTemplate) -> None:
        self._task = task

    @property
    def name(self) -> str | None:
        return self._task.name

    @name.setter
    def name(self, value: str | None) -> None:
        self._task.name = check_name("run name", value)

    @property
    def project(self) -> str | None:
        return self._task.project

    @project.setter
    def project(self, value: str | None) -> None:
        self._task.project = check_name("project", value)

    @property
    def labels(self) -> dict[str, str]:
        return self._task.labels

    @labels.setter
    def labels(self, value: Mapping[str, Any]) -> None:
        self._task.labels = {k: str(v) for k, v in value.items()}


class TaskSpec:
    """`task.spec`: reads and writes the task's parameters, inputs, handler, hyperparams,
    param_file, selector, strategy and paths."""

    def __init__(self, task: RunTemplate) -> None:
        self._task = task

    @property
    def parameters(self) -> dict[str, Any]:
        return self._task.params

    @parameters.setter
    def parameters(self, value: Mapping[str, Any]) -> None:
        self._task.params = dict(value)

    @property
    def inputs(self) -> dict[str, str]:
        return self._task.inputs

    @inputs.setter
    def inputs(self, value: Mapping[str, Any]) -> None:
        self._task.inputs = {k: str(v) for k, v in value.items()}

    @property
    def handler(self) -> Handler | None:
        return self._task.handler

    @handler.setter
    def handler(self, value: Handler | None) -> None:
        self._task.handler = value

    @property
    def hyperparams(self) -> dict[str, list[Any]]:
        if self._task.hyper_params is None:
            self._task.hyper_params = {}
        return self._task.hyper_params

    @hyperparams.setter
    def hyperparams(self, value: Mapping[str, Iterable[Any]] | None) -> None:
        self._task.hyper_params = {k: list(v) for k, v in value.items()} if value else None

    @property
    def param_file(self) -> str | None:
        return self._task.param_file

    @param_file.setter
    def param_file(self, value: str | None) -> None:
        self._task.param_file = str(value) if value else None

    @property
    def selector(self) -> str | None:
        return self._task.hyper_options.get("selector")

    @selector.setter
    def selector(self, value: str | None) -> None:
        self._task.hyper_options["selector"] = value

    @property
    def strategy(self) -> str | None:
        return self._task.hyper_options.get("strategy")

    @strategy.setter
    def strategy(self, value: str | None) -> None:
        self._task.hyper_options["strategy"] = value

    @property
    def hyper_param_options(self) -> HyperParamOptions:
        """A copy of the sweep options; assign one (or a dict) to change the task's."""
        known = {key: value for key, value in self._task.hyper_options.items()
                 if key in HyperParamOptions.__dataclass_fields__}
        return HyperParamOptions(**{**known, "param_file": self._task.param_file})

    @hyper_param_options.setter
    def hyper_param_options(self, value: HyperParamOptions | Mapping[str, Any]) -> None:
        options = value.to_dict() if isinstance(value, HyperParamOptions) else \
            {key: item for key, item in dict(value).items() if item is not None}
        param_file = options.pop("param_file", None)
        if param_file:
            self._task.param_file = str(param_file)
        self._task.hyper_options.update(options)

    @property
    def outputs(self) -> list[str]:
        return self._task.outputs

    @property
    def returns(self) -> list[str]:
        return self._task.returns

    @property
    def output_path(self) -> str | None:
        return self._task.out_path

    @output_path.setter
    def output_path(self, value: str | None) -> None:
        self._task.out_path = value

    @property
    def input_path(self) -> str | None:
        return self._task.in_path

    @input_path.setter
    def input_path(self, value: str | None) -> None:
        self._task.in_path = value

    @property
    def secret_sources(self) -> list[SecretSource]:
        return self._task.secret_sources


def new_task(name: str | None = None, project: str | None = None, handler: Handler | None = None,
             params: Mapping[str, Any] | None = None, hyper_params: Mapping[str, list[Any]] | None = None,
             param_file: str | None = None, selector: str | None = None,
             hyper_param_options: HyperParamOptions | Mapping[str, Any] | None = None,
             inputs: Mapping[str, str] | None = None, outputs: Iterable[str] | None = None,
             in_path: str | None = None, out_path: str | None = None, artifact_path: str | None = None,
             secrets: Iterable[Mapping[str, Any] | SecretSource] | None = None, base: RunTemplate | None = None,
             returns: Iterable[str] | None = None, labels: Mapping[str, Any] | None = None) -> RunTemplate:
    """A new RunTemplate, with MLRun's `new_task` arguments in MLRun's order (`labels` is Runbus's;
    `secrets` is a list of {'kind', 'source'}; `base` a task to start from). `in_path`, `out_path`,
    `artifact_path`, `outputs` are kept on the task: artifacts always go to the content store."""
    return RunTemplate(name, project, handler, params, hyper_params, param_file, selector, hyper_param_options,
                       inputs, outputs, in_path, out_path, artifact_path, secrets, base, returns, labels)


NewRun = new_task
