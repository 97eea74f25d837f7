"""What a worker does with one requested iteration: run it as a run of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle

from engine.runspec import RunSpec
from engine.runtimes import local

if TYPE_CHECKING:
    from engine.bootstrap import Services


@dataclass(frozen=True)
class IterationOutcome:
    """How an iteration ended, with the results it logged (None for a command's iteration, whose
    own process logged them: the driver reads those from the bus)."""

    iteration: int
    uid: str
    state: str
    results: dict[str, Any] | None = None


def run_iteration(svc: Services, spec: RunSpec) -> IterationOutcome:
    """Execute one iteration in a worker with the worker's services `svc`; its events (its console
    output too, unless the settings turn capture off) go straight from here to the bus, flushed
    before it returns (a flush that fails raises here, so the driver never counts an iteration
    whose events are not in the log), and its uid, state and results go back to the driver."""
    handler = cloudpickle.loads(spec.handler) if isinstance(spec.handler, bytes) else spec.handler
    context = spec.new_context(svc)
    local.execute(handler, context, capture_console=spec.settings.capture_console)
    return IterationOutcome(spec.iteration, context.uid, context.state, dict(context.results))


def run_iteration_in_driver(svc: Services, spec: RunSpec) -> IterationOutcome:
    """Execute one iteration in the driver's process; the driver flushes once when the sweep ends
    (a crash loses at most the writer's last interval, as for any run)."""
    context = spec.new_context(svc)
    local.execute(spec.handler, context, flush=False, capture_console=spec.settings.capture_console)
    return IterationOutcome(spec.iteration, context.uid, context.state, dict(context.results))
