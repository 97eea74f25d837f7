"""RunTemplate (the MLRun task): what to run, with which params, inputs, secrets and labels."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from engine.secrets import SecretSource


class RunTemplate:
    """A reusable description of a run. The `with_*` methods change it in place and return it."""

    def __init__(self, handler: Callable[..., Any] | str | None = None, name: str | None = None,
                 project: str | None = None, params: Mapping[str, Any] | None = None,
                 inputs: Mapping[str, str] | None = None, labels: Mapping[str, Any] | None = None,
                 hyper_params: Mapping[str, list[Any]] | None = None,
                 selector: str | None = None) -> None:
        self.handler = handler
        self.name = name
        self.project = project
        self.params: dict[str, Any] = dict(params or {})
        self.inputs: dict[str, str] = {k: str(v) for k, v in (inputs or {}).items()}
        self.labels: dict[str, str] = {k: str(v) for k, v in (labels or {}).items()}
        self.secret_sources: list[SecretSource] = []
        self.hyper_params: dict[str, list[Any]] | None = dict(hyper_params) if hyper_params else None
        self.hyper_options: dict[str, Any] = {"selector": selector} if selector else {}

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
                          strategy: str = "grid", **options: Any) -> RunTemplate:
        """Run once per parameter set; `selector` ('min.loss', 'max.accuracy') picks the best."""
        self.hyper_params = {k: list(v) for k, v in hyperparams.items()}
        self.hyper_options = {"selector": selector, "strategy": strategy, **options}
        return self

    def copy(self) -> RunTemplate:
        """A copy whose dicts and lists can change without changing this one. Param values are
        shared: a run copies them as JSON when it starts (a deep copy would recurse on any depth)."""
        twin = copy.copy(self)
        twin.params, twin.inputs, twin.labels = dict(self.params), dict(self.inputs), dict(self.labels)
        twin.secret_sources = list(self.secret_sources)
        twin.hyper_params = ({k: list(v) for k, v in self.hyper_params.items()}
                             if self.hyper_params is not None else None)
        twin.hyper_options = dict(self.hyper_options)
        return twin

    def __repr__(self) -> str:
        return f"RunTemplate(name={self.name!r}, params={self.params!r}, labels={self.labels!r})"


def new_task(handler: Callable[..., Any] | str | None = None, name: str | None = None,
             project: str | None = None, params: Mapping[str, Any] | None = None,
             inputs: Mapping[str, str] | None = None, labels: Mapping[str, Any] | None = None,
             hyper_params: Mapping[str, list[Any]] | None = None,
             selector: str | None = None) -> RunTemplate:
    """A new RunTemplate (MLRun's `NewRun` / `new_task`)."""
    return RunTemplate(handler, name, project, params, inputs, labels, hyper_params, selector)


NewRun = new_task
