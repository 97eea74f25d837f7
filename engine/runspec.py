"""RunSpec: everything needed to start one run, in a form that can travel to a worker process."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from engine.settings import Settings
from producers.context import RunContext
from producers.data_item import DataItem

if TYPE_CHECKING:
    from engine.bootstrap import Services

C = TypeVar("C", bound=RunContext)


@dataclass(frozen=True)
class RunSpec:
    settings: Settings
    # bytes: cloudpickled, for workers that cannot import it; None: a script or command, not a handler
    handler: Callable[..., Any] | bytes | None
    handler_ref: str
    name: str
    project: str
    runtime: str = "local"
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    input_digests: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)  # a repr lands in logs (Dask's too)
    labels: dict[str, str] = field(default_factory=dict)
    code_ref: str | None = None
    parent_uid: str | None = None
    iteration: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # signed as this home's own (see engine.loader.RunSigner): not what only --trust let run
    signed: bool = True

    def new_context(self, svc: Services, uid: str | None = None,
                    context_class: type[C] = RunContext) -> C:  # type: ignore[assignment]
        """A context (of `context_class`) writing through `svc` (this process's services, built from
        `settings` by its entry point)."""
        return context_class(
            svc.writer, svc.artifact_store, uid=uid or uuid.uuid4().hex, name=self.name,
            project=self.project, handler=self.handler_ref, runtime=self.runtime, params=self.params,
            inputs=self.inputs, input_digests=self.input_digests, secrets=self.secrets,
            labels=self.labels, parent_uid=self.parent_uid, iteration=self.iteration,
            code_ref=self.code_ref, extra=self.extra, iterations_recorder=_record_iterations,
            sign=svc.run_signer() if self.signed else None)

    def for_iteration(self, parent_uid: str, iteration: int, params: dict[str, Any]) -> RunSpec:
        return replace(self, parent_uid=parent_uid, iteration=iteration,
                       params={**self.params, **params}, extra={})


class _IterationsRecorder:
    """engine.sweep.summary.record_iterations, imported when a run makes its first child
    (`prepare`): it needs pandas and numpy, which a run without children never loads, and a
    script's run records its iterations at exit, when Python refuses the atexit hooks pandas'
    imports register."""

    def prepare(self) -> None:
        import engine.sweep.summary  # noqa: F401

    def __call__(self, parent: RunContext, iterations: Any, best: int | None,
                 best_artifacts: Sequence[DataItem] = ()) -> None:
        from engine.sweep.summary import record_iterations

        record_iterations(parent, iterations, best, best_artifacts)


_record_iterations = _IterationsRecorder()
