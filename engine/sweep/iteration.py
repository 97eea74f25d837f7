"""What a worker does with one requested iteration: run it as a run of its own."""

from __future__ import annotations

import time
from collections.abc import Sequence
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
    seconds: float = 0.0  # how long the handler's run took where it ran


def run_iteration(svc: Services, spec: RunSpec) -> IterationOutcome:
    """Execute one iteration in a worker with the worker's services `svc`; its events (its console
    output too, unless the settings turn capture off) go straight from here to the bus, flushed
    before it returns (a flush that fails raises here, so the driver never counts an iteration
    whose events are not in the log), and its uid, state and results go back to the driver."""
    (outcome,) = run_iterations(svc, [spec])
    return outcome


def run_iterations(svc: Services, specs: Sequence[RunSpec]) -> list[IterationOutcome]:
    """Execute several iterations one after another in a worker, then flush once: every one of
    their events is on the bus before this returns (EventsNotWritten otherwise, and the driver
    counts none of them), at the cost of one flush instead of one per iteration."""
    outcomes = [_execute(svc, spec, flush=False) for spec in specs]
    svc.writer.sync(f"the events of iterations {', '.join(str(o.iteration) for o in outcomes)}")
    return outcomes


def run_iterations_in_driver(svc: Services, specs: Sequence[RunSpec]) -> list[IterationOutcome]:
    """Execute iterations in the driver's process; the driver flushes once when the sweep ends
    (a crash loses at most the writer's last interval, as for any run)."""
    return [_execute(svc, spec, flush=False) for spec in specs]


def _execute(svc: Services, spec: RunSpec, flush: bool) -> IterationOutcome:
    handler = cloudpickle.loads(spec.handler) if isinstance(spec.handler, bytes) else spec.handler
    began = time.perf_counter()
    context = spec.new_context(svc)
    local.execute(handler, context, flush=flush, capture_console=spec.settings.capture_console)
    return IterationOutcome(spec.iteration, context.uid, context.state, dict(context.results),
                            time.perf_counter() - began)
