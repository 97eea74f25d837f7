"""What a worker does with one requested iteration: run it as a run of its own."""

from __future__ import annotations

from dataclasses import dataclass

import cloudpickle

from engine.runspec import RunSpec
from engine.runtimes import local


@dataclass(frozen=True)
class IterationOutcome:
    iteration: int
    uid: str
    state: str


def run_iteration(spec: RunSpec) -> IterationOutcome:
    """Execute one iteration in this process; its events go straight from here to the bus."""
    handler = cloudpickle.loads(spec.handler) if isinstance(spec.handler, bytes) else spec.handler
    context = spec.new_context()
    local.execute(handler, context)
    return IterationOutcome(spec.iteration, context.uid, context.state)
