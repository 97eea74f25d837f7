"""Workload 2: a sweep of N child runs, each with 3 params, 2 results and a label (in-process runtime)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Outcome, fresh_home, median
from engine import NewRun, new_function
from engine.api import close_session, session


def child(context: Any, p1: int = 0, p2: float = 0.0, p3: str = "") -> None:
    context.log_result("accuracy", (p1 % 100) / 100)
    context.log_result("loss", 1 - (p1 % 100) / 100 + p2)
    context.set_label("kind", p3)


def hyperparams(children: int) -> dict[str, list[Any]]:
    """Three params per child, taken together (strategy 'list')."""
    return {"p1": list(range(children)), "p2": [i * 0.001 for i in range(children)],
            "p3": [f"k{i % 7}" for i in range(children)]}


def measure_once(children: int) -> float:
    """Milliseconds per child run, from run() until the sweep (parent included) has completed."""
    fresh_home()
    session()  # build the bus and writer before the clock starts
    began = time.perf_counter()
    run = new_function().run(NewRun(handler=child, name="bench-children"), hyperparams=hyperparams(children),
                             strategy="list", selector="max.accuracy", quiet=True)
    elapsed = time.perf_counter() - began
    if run.state != "completed":
        raise RuntimeError(f"sweep ended {run.state}: {run.error}")
    close_session()
    return elapsed * 1000 / children


def run(children: int, repeat: int) -> Outcome:
    samples = [measure_once(children) for _ in range(repeat)]
    return Outcome(figures={"child_run_ms": median(samples)},
                   details={"children": children, "samples_ms": samples})
